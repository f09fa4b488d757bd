//! Slow, vanishing and misbehaving clients: none of them blocks anyone else, each is let go in
//! bounded time, and ten thousand of them leave nothing behind.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support;
use crate::support::{TestApp, eventually, metric};

const WITHIN: Duration = Duration::from_secs(5);

/// Opens a stream over a raw socket; with `read_connect`, reads until the connect event arrived.
async fn raw_stream(addr: &str, id: &str, read_connect: bool) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /sse/connect/{id} HTTP/1.1\r\nHost: handoff.test\r\nAccept: text/event-stream\r\n\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    if read_connect {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains(r#""status":"connect""#) {
            let n = tokio::time::timeout(WITHIN, socket.read(&mut buf))
                .await
                .expect("a connect event within 5 s")
                .expect("read");
            assert!(
                n > 0,
                "stream closed before the connect event: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(
            seen.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&seen)
        );
    }
    socket
}

async fn drained(client: &reqwest::Client, base: &str, within: Duration) -> bool {
    eventually(within, || async {
        metric(client, base, "handoff_open_streams").await == 0.0
            && metric(client, base, "handoff_watched_jobs").await == 0.0
    })
    .await
}

#[tokio::test]
async fn a_client_that_closes_is_let_go_at_once_not_at_the_next_keep_alive() {
    // A keep-alive far beyond the wait below: the close itself must end the stream.
    let keep_alive = Duration::from_secs(30);
    let app = TestApp::spawn_with(|c| c.keep_alive = keep_alive).await;
    let id = app.job_id().await;
    let addr = format!("127.0.0.1:{}", app.port);
    let mut socket = raw_stream(&addr, &id, true).await;
    assert_eq!(app.metric("handoff_open_streams").await, 1.0);
    // A clean close (FIN), as when page A leaves or nginx drops the browser's request.
    socket.shutdown().await.unwrap();
    drop(socket);
    let gone = Instant::now();
    assert!(
        drained(&app.client, &app.base, Duration::from_secs(3)).await,
        "the stream and its hub entry outlived its client's close by over 3 s \
         (keep-alive {keep_alive:?})"
    );
    eprintln!("closed client let go after {:?}", gone.elapsed());
}

#[tokio::test]
async fn a_client_that_never_reads_delays_no_one_and_is_dropped_at_the_stream_timeout() {
    let app = TestApp::spawn_with(|c| c.sse_timeout = Duration::from_secs(2)).await;
    let id = app.job_id().await;
    let addr = format!("127.0.0.1:{}", app.port);
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(raw_stream(&addr, &id, false).await);
    }
    let mut reader = app.stream(&id).await;
    assert_eq!(
        reader.next_result(WITHIN).await.unwrap()["status"],
        "connect"
    );
    assert!(
        app.metric_reaches("handoff_open_streams", 51.0, WITHIN)
            .await
    );
    let completed = Instant::now();
    assert_eq!(app.complete(&id).await.status(), 200);
    assert_eq!(
        reader.next_result(WITHIN).await.unwrap()["status"],
        "result"
    );
    eprintln!(
        "the reading stream got its result {:?} after completion",
        completed.elapsed()
    );
    // The non-readers' streams end (result sent, or timed out) though their sockets stay open.
    assert!(drained(&app.client, &app.base, Duration::from_secs(4)).await);
    drop(idle);
}

/// Connect/disconnect cycle number `i`, in one of three manners by turns.
async fn cycle(addr: &str, id: &str, i: usize) -> Option<TcpStream> {
    match i % 3 {
        // Clean close after the connect event.
        0 => {
            let mut s = raw_stream(addr, id, true).await;
            let _ = s.shutdown().await;
            None
        }
        // Reset mid-stream: SO_LINGER 0 turns the close into an RST.
        1 => {
            let s = raw_stream(addr, id, true).await;
            s.set_zero_linger().expect("SO_LINGER 0");
            None
        }
        // Never reads; one in 50 of these stays open, unread, until the end of the run.
        _ => {
            let s = raw_stream(addr, id, false).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            (i % 150 == 2).then_some(s)
        }
    }
}

async fn run_cycles(addr: &str, ids: &[String], n: usize) {
    let held: Vec<TcpStream> = futures_util::stream::iter(0..n)
        .map(|i| cycle(addr, &ids[i % ids.len()], i))
        .buffer_unordered(64)
        .filter_map(|held| async { held })
        .collect()
        .await;
    // Held non-readers keep their sockets until their streams timed out on the server.
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connects_and_disconnects_leave_no_stream_no_hub_entry_and_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, _log) = support::start_binary(
        dir.path(),
        &[
            ("HANDOFF_KEEPALIVE_SECS", "1"),
            ("HANDOFF_SSE_TIMEOUT_SECS", "2"),
            ("HANDOFF_WORKERS", "2"),
        ],
    );
    let client = support::client();
    let addr = base.trim_start_matches("http://").to_owned();
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(support::job_id_at(&client, &base).await);
    }

    let started = Instant::now();
    // Warm-up: pools sized by the peak concurrency seen so far (allocator arenas, the runtime's
    // I/O slab) keep growing for a while, by less each time. Measured RSS after 5k, 15k, 25k,
    // 35k, 45k cycles: 40, 47, 51, 52, 53 MiB; a leak would grow by the same amount each time.
    // So warm up in rounds until one round adds under 2 %.
    let mut warm = support::rss_kib(child.id());
    let mut warm_cycles = 0;
    for _ in 0..8 {
        run_cycles(&addr, &ids, 5_000).await;
        warm_cycles += 5_000;
        let now = support::rss_kib(child.id());
        let settled = now * 100 < warm * 102;
        warm = now;
        if settled {
            break;
        }
    }
    assert!(
        drained(&client, &base, WITHIN).await,
        "warm-up left streams open"
    );
    run_cycles(&addr, &ids, 10_000).await;
    assert!(
        drained(&client, &base, WITHIN).await,
        "streams or hub entries leaked"
    );
    let after = support::rss_kib(child.id());
    eprintln!(
        "{warm_cycles} + 10,000 cycles in {:?}; RSS after warm-up {warm} KiB, then {after} KiB",
        started.elapsed()
    );
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        after * 10 <= warm * 11,
        "resident memory grew more than 10 %: {warm} KiB -> {after} KiB"
    );
}
