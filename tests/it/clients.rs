//! Slow, vanishing and misbehaving clients: none of them blocks anyone else, each is let go in
//! bounded time, and ten thousand of them leave nothing behind.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::HttpConnection::KeepAlive;
use crate::support::{Handoff, Instance, TestApp, WAIT, eventually};

async fn drained(handoff: &Handoff, within: Duration) -> bool {
    eventually(within, || async {
        handoff.metric("handoff_open_streams").await == 0.0
            && handoff.metric("handoff_watched_jobs").await == 0.0
    })
    .await
}

#[tokio::test]
async fn a_client_that_closes_is_let_go_at_once_not_at_the_next_keep_alive() {
    // A keep-alive far beyond the wait below: the close itself must end the stream.
    let keep_alive = Duration::from_secs(30);
    let app = TestApp::spawn_with(|c| c.keep_alive = keep_alive).await;
    let id = app.job_id().await;
    let mut socket = app.raw_connected_stream(&id, KeepAlive).await;
    assert_eq!(app.metric("handoff_open_streams").await, 1.0);
    // A clean close (FIN), as when page A leaves or nginx drops the browser's request.
    socket.shutdown().await.unwrap();
    drop(socket);
    let gone = Instant::now();
    assert!(
        drained(&app, Duration::from_secs(3)).await,
        "the stream and its hub entry outlived its client's close by over 3 s \
         (keep-alive {keep_alive:?})"
    );
    eprintln!("closed client let go after {:?}", gone.elapsed());
}

#[tokio::test]
async fn a_client_that_never_reads_delays_no_one_and_is_dropped_at_the_stream_timeout() {
    let app = TestApp::spawn_with(|c| c.sse_timeout = Duration::from_secs(2)).await;
    let id = app.job_id().await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(app.raw_stream(&id, KeepAlive).await);
    }
    let mut reader = app.connected_stream(&id).await;
    assert!(app.metric_reaches("handoff_open_streams", 51.0, WAIT).await);
    let completed = Instant::now();
    assert_eq!(app.complete(&id).await.status(), 200);
    assert_eq!(reader.next_result(WAIT).await.unwrap()["status"], "result");
    eprintln!(
        "the reading stream got its result {:?} after completion",
        completed.elapsed()
    );
    // The non-readers' streams end (result sent, or timed out) though their sockets stay open.
    assert!(drained(&app, Duration::from_secs(4)).await);
    drop(idle);
}

/// Connect/disconnect cycle number `i`, in one of three manners by turns.
async fn cycle(handoff: &Handoff, id: &str, i: usize) -> Option<TcpStream> {
    match i % 3 {
        // Clean close after the connect event.
        0 => {
            let mut s = handoff.raw_connected_stream(id, KeepAlive).await;
            let _ = s.shutdown().await;
            None
        }
        // Reset mid-stream: SO_LINGER 0 turns the close into an RST.
        1 => {
            let s = handoff.raw_connected_stream(id, KeepAlive).await;
            s.set_zero_linger().expect("SO_LINGER 0");
            None
        }
        // Never reads; one in 50 of these stays open, unread, until the end of the run.
        _ => {
            let s = handoff.raw_stream(id, KeepAlive).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            (i % 150 == 2).then_some(s)
        }
    }
}

async fn run_cycles(handoff: &Handoff, ids: &[String], n: usize) {
    let held: Vec<TcpStream> = futures_util::stream::iter(0..n)
        .map(|i| cycle(handoff, &ids[i % ids.len()], i))
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
    let mut instance = Instance::start(
        dir.path(),
        &[
            ("HANDOFF_KEEPALIVE_SECS", "1"),
            ("HANDOFF_SSE_TIMEOUT_SECS", "2"),
            ("HANDOFF_WORKERS", "2"),
            // 64 cycles at a time plus the held non-readers, all from this one address.
            ("HANDOFF_MAX_STREAMS_PER_CLIENT", "off"),
        ],
    );
    let mut ids = Vec::new();
    for _ in 0..100 {
        ids.push(instance.job_id().await);
    }

    let started = Instant::now();
    // Warm-up: pools sized by the peak concurrency seen so far (allocator arenas, the runtime's
    // I/O slab) keep growing for a while, by less each time. Measured RSS after 5k, 15k, 25k,
    // 35k, 45k cycles: 40, 47, 51, 52, 53 MiB; a leak would grow by the same amount each time.
    // So warm up in rounds until one round adds under 2 %.
    let mut warm = instance.rss_kib();
    let mut warm_cycles = 0;
    for _ in 0..8 {
        run_cycles(&instance, &ids, 5_000).await;
        warm_cycles += 5_000;
        let now = instance.rss_kib();
        let settled = now * 100 < warm * 102;
        warm = now;
        if settled {
            break;
        }
    }
    assert!(drained(&instance, WAIT).await, "warm-up left streams open");
    run_cycles(&instance, &ids, 10_000).await;
    assert!(
        drained(&instance, WAIT).await,
        "streams or hub entries leaked"
    );
    let after = instance.rss_kib();
    eprintln!(
        "{warm_cycles} + 10,000 cycles in {:?}; RSS after warm-up {warm} KiB, then {after} KiB",
        started.elapsed()
    );
    assert_eq!(instance.get("/healthz").await.status(), 200);
    instance.kill();
    assert!(
        after * 10 <= warm * 11,
        "resident memory grew more than 10 %: {warm} KiB -> {after} KiB"
    );
}
