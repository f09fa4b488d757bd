//! A slow network link on loopback: a TCP relay that holds every chunk for a fixed time in each
//! direction before passing it on, without limiting throughput (chunks keep their order, and
//! the next one is read while earlier ones wait).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub struct SlowLink {
    pub port: u16,
    relay: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    /// Relays every connection made to `port` to `upstream`, each byte arriving `delay` late.
    pub async fn to(upstream: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("an address").port();
        let relay = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(late(client_read, server_write, delay));
                tokio::spawn(late(server_read, client_write, delay));
            }
        });
        Self { port, relay }
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
async fn late(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0
            || tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
