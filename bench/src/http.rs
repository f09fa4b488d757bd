//! The HTTP/1.1 plumbing: one hyper connection per stream, and a few keep-alive publisher
//! connections that work through a numbered list of requests.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout_at};

pub type Body = Full<Bytes>;

/// How many loopback source addresses (127.0.0.2, 127.0.0.3, …) the streams are spread over.
const SOURCES: usize = 16;

/// The source ports the streams use, below the kernel's ephemeral range (32768–60999), so that
/// they never meet the ports the kernel hands out itself.
const PORTS: std::ops::Range<u16> = 20_000..32_768;

/// Where stream `index` connects from, for an IPv4 loopback target; `None` leaves it to the OS.
///
/// From one address, 19,000 streams plus the TIME_WAIT left by the runs before exhaust the
/// ephemeral ports, and with tens of thousands of TIME_WAIT entries the kernel's own port search
/// at `bind` slowed connecting twentyfold. So each stream gets an explicit address and port:
/// 16 addresses × 12,768 ports, starting at a point that moves with every run.
pub fn source_for(target: SocketAddr, index: usize, run: usize) -> Option<SocketAddr> {
    match target.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            let span = usize::from(PORTS.end - PORTS.start);
            // Both below their bounds (SOURCES + 2, PORTS.end), so the conversions cannot fail.
            let octet = u8::try_from(2 + index % SOURCES).unwrap_or(2);
            let port = u16::try_from(usize::from(PORTS.start) + (run + index / SOURCES) % span)
                .unwrap_or(PORTS.start);
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet)),
                port,
            ))
        }
        _ => None,
    }
}

/// Opens one HTTP/1.1 connection, from `source` if given; its driver runs as its own task until
/// both ends let go.
pub async fn connect(
    addr: SocketAddr,
    source: Option<SocketAddr>,
) -> Result<SendRequest<Body>, String> {
    let tcp = match source {
        None => TcpStream::connect(addr).await,
        Some(source) => {
            // SO_REUSEADDR: the port may still hold a TIME_WAIT entry from an earlier run.
            let bound = TcpSocket::new_v4().and_then(|socket| {
                socket.set_reuseaddr(true)?;
                socket.bind(source)?;
                Ok(socket)
            });
            match bound {
                Ok(socket) => socket.connect(addr).await,
                Err(e) => Err(e),
            }
        }
    }
    .map_err(|e| format!("connect from {source:?}: {e}"))?;
    // Small requests and events must leave at once, not wait for Nagle.
    tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A request with the headers every target needs.
pub fn request(method: &str, host: &str, path: &str, token: Option<&str>) -> Request<Body> {
    request_with_body(method, host, path, token, Bytes::new())
}

pub fn request_with_body(
    method: &str,
    host: &str,
    path: &str,
    token: Option<&str>,
    body: Bytes,
) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if !body.is_empty() {
        builder = builder.header("content-type", "text/plain");
    }
    // Method, path and headers come from parsed templates and fixed names: they cannot be invalid.
    builder.body(Full::new(body)).unwrap_or_default()
}

/// How one numbered request went, on the one clock of this process.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub sent_at: Instant,
    pub done_at: Instant,
    pub result: Result<(StatusCode, Bytes), String>,
}

/// Sends requests `0..count` over `connections` keep-alive connections, each waiting for its
/// answer before sending the next; a broken connection is reopened for the next request. Stops
/// at `deadline`; requests not sent by then have no outcome.
pub async fn drive(
    addr: SocketAddr,
    connections: usize,
    count: usize,
    deadline: Instant,
    make: Arc<dyn Fn(usize) -> Request<Body> + Send + Sync>,
) -> Vec<Option<Outcome>> {
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes = Arc::new(Mutex::new(vec![None; count]));
    let workers: Vec<_> = (0..connections.clamp(1, count.max(1)))
        .map(|_| {
            let (next, outcomes, make) = (next.clone(), outcomes.clone(), make.clone());
            tokio::spawn(async move {
                let mut sender: Option<SendRequest<Body>> = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || Instant::now() >= deadline {
                        return;
                    }
                    let outcome = timeout_at(deadline, send(addr, &mut sender, make(i)))
                        .await
                        .unwrap_or_else(|_| Outcome {
                            sent_at: deadline,
                            done_at: deadline,
                            result: Err("timed out".into()),
                        });
                    if outcome.result.is_err() {
                        sender = None;
                    }
                    outcomes.lock().unwrap_or_else(PoisonError::into_inner)[i] = Some(outcome);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    std::mem::take(&mut *outcomes.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Sends `req` over `sender`'s connection, opening one first when there is none, and reads the
/// whole answer.
pub async fn send(
    addr: SocketAddr,
    sender: &mut Option<SendRequest<Body>>,
    req: Request<Body>,
) -> Outcome {
    let start = Instant::now();
    let failed = |why: String| Outcome {
        sent_at: start,
        done_at: Instant::now(),
        result: Err(why),
    };
    let conn = match sender {
        Some(conn) => conn,
        None => match connect(addr, None).await {
            Ok(conn) => sender.insert(conn),
            Err(why) => return failed(why),
        },
    };
    if let Err(e) = conn.ready().await {
        return failed(format!("connection closed: {e}"));
    }
    let sent_at = Instant::now();
    let result = match conn.send_request(req).await {
        Ok(resp) => {
            let status = resp.status();
            match resp.into_body().collect().await {
                Ok(body) => Ok((status, body.to_bytes())),
                Err(e) => Err(format!("reading the answer: {e}")),
            }
        }
        Err(e) => Err(format!("request: {e}")),
    };
    Outcome {
        sent_at,
        done_at: Instant::now(),
        result,
    }
}
