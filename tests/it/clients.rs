//! Slow, vanishing and misbehaving clients: none of them blocks anyone else, each is let go in
//! bounded time, and ten thousand of them leave nothing behind.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::HttpConnection::KeepAlive;
use crate::support::{Handoff, Instance, TestApp, WAIT, eventually, read_until_closed};

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

/// Jobs whose runner reports progress on each of them every 50 ms, twice as often as a stream
/// writes a job's progress (the rest are coalesced), each report with a message as long in
/// bytes as the API takes (200 characters of 4 bytes): the fastest a stream's socket fills.
struct BusyJobs {
    ids: Vec<String>,
    runner: tokio::task::JoinHandle<()>,
}

impl BusyJobs {
    async fn start(app: &TestApp, n: usize) -> Self {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(app.job_id().await);
        }
        let (handoff, reported) = (Handoff::clone(app), ids.clone());
        let runner = tokio::spawn(async move {
            let message = "\u{1F600}".repeat(200);
            for round in 0u64.. {
                let operations: Vec<_> = reported
                    .iter()
                    .map(|id| {
                        serde_json::json!({
                            "op": "progress", "id": id, "percent": round % 101, "message": message,
                        })
                    })
                    .collect();
                let body = serde_json::json!({ "operations": operations });
                let answer = handoff.api_post("/api/jobs/batch", Some(body)).await;
                assert_eq!(answer.status(), 200, "reporting progress");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Self { ids, runner }
    }

    /// `/sse/watch` on every job.
    fn watch_path(&self) -> String {
        format!("/sse/watch?ids={}", self.ids.join(","))
    }
}

impl Drop for BusyJobs {
    fn drop(&mut self) {
        self.runner.abort();
    }
}

/// A client watching 32 busy jobs that never reads, once its socket is full.
struct Unread {
    socket: TcpStream,
    jobs: BusyJobs,
    /// When it sent its request.
    opened: Instant,
    /// When the server last sent it an event: about when its socket was full.
    full: Instant,
}

impl Unread {
    /// Opens the watch and waits until `handoff_events_sent_total` has not grown for a second
    /// while the jobs go on reporting: the socket is full, and actix-http no longer polls the
    /// stream. Panics if that has not happened within `within` of the request.
    async fn until_full(app: &TestApp, within: Duration) -> Self {
        let jobs = BusyJobs::start(app, 32).await;
        let opened = Instant::now();
        let socket = app.unread_stream_at(&jobs.watch_path()).await;
        assert!(app.metric_reaches("handoff_open_streams", 1.0, WAIT).await);
        let mut sent = app.metric("handoff_events_sent_total").await;
        let mut full = Instant::now();
        while full.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = app.metric("handoff_events_sent_total").await;
            if now != sent {
                (sent, full) = (now, Instant::now());
            }
            assert!(
                opened.elapsed() < within,
                "the unread stream's socket was not full within {within:?}: {sent} events \
                 sent, the last {:?} ago",
                full.elapsed()
            );
        }
        eprintln!(
            "the socket was full {:?} after the request, after {sent} events",
            full - opened
        );
        Self {
            socket,
            jobs,
            opened,
            full,
        }
    }

    /// Stops the jobs' reports, reads the socket to its end, which must come within [`WAIT`],
    /// and checks that the server cut the stream rather than ended it (an ended stream's answer
    /// ends with the empty last chunk).
    async fn cut_off(self) {
        let Self {
            mut socket, jobs, ..
        } = self;
        drop(jobs);
        let (took, read) = read_until_closed(&mut socket, WAIT).await;
        assert!(
            !read.ends_with("\r\n0\r\n\r\n"),
            "the stream ended cleanly: its socket was never full"
        );
        eprintln!("{} bytes were still queued, read in {took:?}", read.len());
    }
}

/// Waits until no stream is open; when that was seen.
async fn no_stream_left(app: &TestApp, within: Duration) -> Instant {
    let gone = eventually(within, || async {
        app.metric("handoff_open_streams").await == 0.0
    });
    assert!(
        gone.await,
        "the unread stream is still open after {within:?}"
    );
    Instant::now()
}

#[tokio::test]
async fn a_watch_whose_client_never_reads_ends_at_its_timeout_though_its_socket_is_full() {
    // Long enough for the socket to fill first, and far shorter than the write deadline.
    let timeout = Duration::from_secs(5);
    let app = TestApp::spawn_with(|c| c.sse_timeout = timeout).await;
    let unread = Unread::until_full(&app, timeout - Duration::from_millis(500)).await;
    let lived = no_stream_left(&app, timeout + Duration::from_secs(5)).await - unread.opened;
    eprintln!("the stream lived {lived:?} (timeout {timeout:?})");
    assert!(
        lived < timeout + Duration::from_millis(1500),
        "the unread stream lived {lived:?}, its timeout being {timeout:?}"
    );
    unread.cut_off().await;
}

#[tokio::test]
async fn a_stream_whose_client_stops_reading_is_closed_at_the_write_deadline() {
    let write_deadline = handoff::startup::TIMING.write;
    let app = TestApp::spawn_with(|c| c.sse_timeout = write_deadline * 4).await;
    let unread = Unread::until_full(&app, write_deadline).await;
    let after = no_stream_left(&app, write_deadline + Duration::from_secs(5)).await - unread.full;
    eprintln!("the stream ended {after:?} after its socket was full");
    // Writes stalled a little before the last event went in (actix-http buffers up to 32 KiB
    // past a full socket): never much later than the deadline, never much earlier.
    assert!(
        after > write_deadline - Duration::from_secs(2)
            && after < write_deadline + Duration::from_secs(2),
        "the stream ended {after:?} after its socket filled; the write deadline is \
         {write_deadline:?}"
    );
    unread.cut_off().await;
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
