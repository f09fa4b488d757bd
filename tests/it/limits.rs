//! Limits: the server-wide stream cap, the per-client cap and whose address counts; the write
//! lane's room for creations and for completions; retention.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Handoff, HttpConnection, Instance, SseReader, TestApp, WAIT, eventually};

async fn open_from(app: &TestApp, id: &str, forwarded_for: &str) -> SseReader {
    let response = app
        .client
        .get(app.url(&format!("/sse/connect/{id}")))
        .header("X-Forwarded-For", forwarded_for)
        .send()
        .await
        .expect("stream request");
    SseReader::from_response(response)
}

async fn refused(reader: SseReader) -> (u16, Option<String>, Value) {
    let retry_after = reader
        .headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let status = reader.response_status;
    let body = reader.into_body().await;
    (
        status,
        retry_after,
        serde_json::from_str(&body).expect("a JSON error"),
    )
}

#[tokio::test]
async fn beyond_the_stream_cap_new_streams_get_503_and_open_ones_keep_running() {
    let app = TestApp::spawn_with(|c| c.max_streams = Some(3)).await;
    let id = app.job_id().await;
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(app.connected_stream(&id).await);
    }

    let (status, retry_after, body) = refused(app.stream(&id).await).await;
    assert_eq!(status, 503);
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("3 event streams open"),
        "{body}"
    );
    assert_eq!(app.metric("handoff_streams_refused_total").await, 1.0);
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200, "the server stays healthy at the cap");

    assert_eq!(app.complete(&id).await.status(), 200);
    for s in &mut open {
        assert_eq!(s.next_result(WAIT).await.unwrap()["status"], "result");
        assert_eq!(s.next_block(WAIT).await, None);
    }
    assert!(app.metric_reaches("handoff_open_streams", 0.0, WAIT).await);
    let mut again = app.stream(&id).await;
    assert_eq!(
        again.response_status, 200,
        "places free up when streams end"
    );
    again.expect_connect_result_end(WAIT).await;
}

#[tokio::test]
async fn the_per_client_cap_counts_the_forwarded_address_of_a_trusted_proxy() {
    let app = TestApp::spawn_with(|c| {
        c.max_streams_per_client = Some(2);
        c.trusted_proxies = handoff::limits::TrustedProxies::parse("127.0.0.1").unwrap();
    })
    .await;
    let id = app.job_id().await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = open_from(&app, &id, "203.0.113.1").await;
        s.expect_connect().await;
        open.push(s);
    }
    let (status, retry_after, body) = refused(open_from(&app, &id, "203.0.113.1").await).await;
    assert_eq!(status, 429);
    assert!(retry_after.is_some());
    assert!(
        body["error"].as_str().unwrap().contains("this address"),
        "{body}"
    );

    let mut other = open_from(&app, &id, "203.0.113.2").await;
    assert_eq!(
        other.response_status, 200,
        "another client has its own allowance"
    );
    other.expect_connect().await;
}

#[tokio::test]
async fn with_the_defaults_one_address_holds_at_most_64_streams() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let mut open = Vec::new();
    for _ in 0..handoff::config::DEFAULT_STREAMS_PER_CLIENT {
        open.push(
            app.raw_connected_stream(&id, HttpConnection::KeepAlive)
                .await,
        );
    }
    let (status, retry_after, body) = refused(app.stream(&id).await).await;
    assert_eq!(status, 429, "the 65th stream from one address: {body}");
    assert_eq!(retry_after.as_deref(), Some("5"));
    assert!(
        body["error"].as_str().unwrap().contains("64 event streams"),
        "{body}"
    );
    drop(open.pop());
    let mut again = app.stream(&id).await;
    assert_eq!(
        again.response_status, 200,
        "a closed stream frees its place"
    );
    again.expect_connect().await;
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let app = TestApp::spawn_with(|c| c.max_streams_per_client = Some(2)).await;
    let id = app.job_id().await;
    let mut open = Vec::new();
    for client in ["203.0.113.1", "203.0.113.2"] {
        let mut s = open_from(&app, &id, client).await;
        s.expect_connect().await;
        open.push(s);
    }
    let third = open_from(&app, &id, "203.0.113.3").await;
    assert_eq!(
        third.response_status, 429,
        "all three come from 127.0.0.1, whatever they claim"
    );
}

/// The write lane's waiting requests of one kind, from `/metrics`.
async fn writes_waiting(app: &TestApp, kind: &str) -> f64 {
    app.metric(&format!("handoff_writes_waiting{{kind=\"{kind}\"}}"))
        .await
}

/// With SQLite's write lock held by another process, the write lane cannot write and what comes
/// meanwhile queues: creations fill their room and the rest are refused at once, while a
/// completion finds room of its own, waits, and goes through once the lock goes.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_creations_gets_503_while_a_completion_keeps_its_room_and_goes_through() {
    const ROOM: usize = 8;
    // Enough to fill the blocked batch (up to a room's worth) and the room behind it, and few
    // enough to be sent well within the lane's 5 s busy timeout: once it passes, the blocked
    // batch fails and the room empties before it could be seen full. `scripts/test.sh` runs this
    // test on its own, away from the load of the others.
    const FLOOD: usize = 2 * ROOM + 6;
    let app = TestApp::spawn_with(|c| c.write_queue = ROOM).await;
    let id = app.job_id().await;
    let mut stream = app.connected_stream(&id).await;

    // Held for well under the lane's 5 s busy timeout: the lane waits instead of failing.
    let mut locker = app.lock_sqlite_writes().await;
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| {
            let handoff = Handoff::clone(&app);
            tokio::spawn(async move { handoff.post_job(None).await })
        })
        .collect();
    let full = eventually(WAIT, || async {
        writes_waiting(&app, "create").await == ROOM as f64
    });
    assert!(full.await, "the creations fill their room");

    let completion = tokio::spawn({
        let (handoff, id) = (Handoff::clone(&app), id.clone());
        async move { handoff.complete(&id).await }
    });
    let queued = eventually(WAIT, || async { writes_waiting(&app, "end").await == 1.0 });
    assert!(queued.await, "the completion waits in a room of its own");
    let late = app.post_job(None).await;
    assert_eq!(late.status(), 503, "the creations' room is still full");
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();

    assert_eq!(completion.await.unwrap().status(), 200);
    let result = stream.next_result(WAIT).await.expect("the result");
    assert_eq!(result["status"], "result");
    let (mut created, mut refused) = (0, 0);
    for answer in flood {
        let answer = answer.await.unwrap();
        match answer.status().as_u16() {
            201 => created += 1,
            503 => {
                refused += 1;
                assert_eq!(answer.headers()["retry-after"], "1");
                let body: Value = answer.json().await.unwrap();
                let error = body["error"].as_str().unwrap();
                assert!(
                    error.contains(&format!("{ROOM} job creations are waiting")),
                    "{error}"
                );
            }
            other => panic!("a creation answered {other}"),
        }
    }
    // At most a room's worth waited and a room's worth was taken into the blocked batch.
    assert!(created <= 2 * ROOM, "{created} created");
    assert_eq!(created + refused, FLOOD);
    assert!(
        app.metric_reaches("handoff_writes_waiting{kind=\"create\"}", 0.0, WAIT)
            .await
    );
}

#[tokio::test]
async fn a_job_past_its_retention_is_purged_and_answers_like_an_unknown_one() {
    let app = TestApp::spawn_with(|c| c.retention = Duration::from_secs(1)).await;
    let id = app.job_id().await;
    assert_eq!(app.get_job(&id).await.status(), 200, "a fresh job is kept");
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.get_job(&id).await.status() == 404
        })
        .await,
        "the job was not purged within 5 s of a 1 s retention"
    );
    let unknown = "AAAAAAAAAAAAAAAAAAAAAA";
    for path in [
        "/api/jobs/{}",
        "/sse/connect/{}",
        "/jobs/{}",
        "/test.do?id={}",
    ] {
        let purged = app.get(&path.replace("{}", &id)).await;
        let never = app.get(&path.replace("{}", unknown)).await;
        assert_eq!(purged.status(), 404, "{path}");
        assert_eq!(
            purged.text().await.unwrap(),
            never.text().await.unwrap().replace(unknown, &id),
            "{path}"
        );
    }
    assert_eq!(app.complete(&id).await.status(), 404);
}

#[test]
fn the_default_stream_cap_comes_from_the_open_file_limit_raised_to_the_hard_one() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .expect("the hard open-file limit in /proc/self/limits");
    let dir = tempfile::tempdir().unwrap();
    // Start it with a low soft limit: Handoff raises it to the hard one and sizes the cap from that.
    let mut command = std::process::Command::new("prlimit");
    command.args(["--nofile=256:", "--", env!("CARGO_BIN_EXE_handoff")]);
    let mut instance = Instance::start_command(command, dir.path(), &[]);
    instance.kill();
    let log = instance.log_text();
    let want = format!(
        "at most {} streams, open-file limit {hard}",
        handoff::limits::default_max_streams(hard)
    );
    assert!(log.contains(&want), "expected {want:?} in:\n{log}");
}

/// The latencies of `n` lookups of `id` by `client`, one at a time, each answered `200`.
async fn lookup_latencies(app: &TestApp, id: &str, client: &str, n: usize) -> Vec<Duration> {
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let started = std::time::Instant::now();
        let answer = app
            .client
            .get(app.url(&format!("/api/jobs/{id}")))
            .header("X-Forwarded-For", client)
            .send()
            .await
            .expect("lookup");
        assert_eq!(answer.status(), 200, "{client}'s own job is served");
        took.push(started.elapsed());
    }
    took.sort();
    took
}

fn median_and_p99(sorted: &[Duration]) -> (Duration, Duration) {
    (sorted[sorted.len() / 2], sorted[sorted.len() * 99 / 100])
}

/// One address scans for job ids (32 unknown ids a watch, and single lookups on every route):
/// it gets `429` with `Retry-After` past its budget, while another address, polling its own job,
/// is served as before. The figures go to BENCHMARKS.md ("Lookups while one address scans").
#[tokio::test]
async fn an_address_scanning_for_job_ids_gets_429_while_another_is_served() {
    let app = TestApp::spawn_with(crate::support::behind_local_proxy).await;
    let own = app.job_id().await;
    let unknown = |_| handoff::domain::JobId::generate().to_string();
    let quiet = lookup_latencies(&app, &own, "198.51.100.2", 300).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scanners: Vec<_> = (0..8)
        .map(|_| {
            let (client, url, stop) =
                (app.client.clone(), app.url("/sse/watch?ids="), stop.clone());
            tokio::spawn(async move {
                let (mut served, mut refused) = (0_u32, 0_u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let ids: Vec<String> = (0..32).map(unknown).collect();
                    let answer = client
                        .get(format!("{url}{}", ids.join(",")))
                        .header("X-Forwarded-For", "203.0.113.9")
                        .send()
                        .await
                        .expect("scan");
                    match answer.status().as_u16() {
                        429 => {
                            assert!(answer.headers().contains_key("retry-after"));
                            refused += 1;
                        }
                        200 => served += 1,
                        other => panic!("a scan is served or refused, not {other}"),
                    }
                    let _ = answer.bytes().await;
                }
                (served, refused)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flooded = lookup_latencies(&app, &own, "198.51.100.2", 300).await;
    // Every route that looks a job up is refused to the scanner now.
    for path in [
        format!("/api/jobs/{}", unknown(0)),
        format!("/jobs/{}", unknown(0)),
        format!("/test.do?id={}", unknown(0)),
        format!("/sse/connect/{}", unknown(0)),
        format!("/sse/watch?ids={}", unknown(0)),
        format!("/api/jobs/{own}"),
    ] {
        let answer = app
            .client
            .get(app.url(&path))
            .header("X-Forwarded-For", "203.0.113.9")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 429, "{path}");
        let wait: u64 = answer.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(wait >= 1, "{path}");
        assert!(answer.text().await.unwrap().contains("do not exist"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut served, mut refused) = (0, 0);
    for scanner in scanners {
        let (s, r) = scanner.await.unwrap();
        served += s;
        refused += r;
    }
    assert!(
        refused > 0,
        "the scan was never refused ({served} watches served)"
    );
    assert!(
        u64::from(served) * 32 <= u64::from(handoff::limits::LOOKUP_BURST) + 32 * 8 + 32 * 30,
        "{served} watches of 32 unknown ids were served: the budget did not hold"
    );
    let other = app
        .client
        .get(app.url(&format!("/api/jobs/{}", unknown(0))))
        .header("X-Forwarded-For", "198.51.100.2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        404,
        "the other address keeps its own budget"
    );

    let ((qm, q99), (fm, f99)) = (median_and_p99(&quiet), median_and_p99(&flooded));
    eprintln!(
        "lookups by another address: quiet median {qm:?} p99 {q99:?}; while one address scans \
         (8 connections, {served} watches served, {refused} refused): median {fm:?} p99 {f99:?}"
    );
}

/// Ids the read lane has read so far (`handoff_store_batch_rows` of the read statement).
async fn ids_read(app: &TestApp) -> f64 {
    app.metric_if_shown(r#"handoff_store_batch_rows_sum{lane="read",kind="read"}"#)
        .await
        .unwrap_or(0.0)
}

/// `GET /api/jobs/{id}` from a client that gives up after `patience`: its status, or `None`
/// when it hung up first.
async fn lookup_with_patience(app: &TestApp, id: &str, patience: Duration) -> Option<u16> {
    let request = app.client.get(app.url(&format!("/api/jobs/{id}")));
    match request.timeout(patience).send().await {
        Ok(answer) => Some(answer.status().as_u16()),
        Err(err) if err.is_timeout() => None,
        Err(err) => panic!("lookup: {err}"),
    }
}

/// Waits until `n` reads on the database at `url` wait for a lock.
async fn reads_waiting_for_a_lock(url: &str, n: i64) {
    use sqlx::Connection as _;
    let mut watcher = sqlx::PgConnection::connect(url).await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE 'SELECT%'",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting == n {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "{waiting} reads wait for the lock, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The read lane's queue is bounded, so a flood of lookups waiting for a slow database gets
/// `503` instead of memory; and a lookup whose client hung up while it waited costs no read.
/// The database is held slow by a transaction of the test's own that locks the job table.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL at 127.0.0.1:5432; scripts/test.sh starts it"]
async fn a_full_read_queue_answers_503_and_a_read_whose_client_hung_up_is_skipped() {
    use sqlx::Connection as _;
    const ROOM: usize = 4;
    let db = crate::support::FreshDb::postgres().await;
    let app = TestApp::spawn_on(db.url(), |c| c.read_queue = ROOM).await;
    let id = app.job_id().await;
    let before = ids_read(&app).await;
    let mut locker = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let patience = Duration::from_secs(1);
    // The first lookup's read is taken by the lane and waits for the lock; the next ones fill
    // the queue behind it, and the one after them finds it full.
    let behind_the_first = async {
        reads_waiting_for_a_lock(db.url(), 1).await;
        let queued = (0..ROOM).map(|_| lookup_with_patience(&app, &id, patience));
        tokio::join!(futures_util::future::join_all(queued), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let request = app.client.get(app.url(&format!("/api/jobs/{id}")));
            request.timeout(WAIT).send().await
        })
    };
    let (first, (queued, refused)) =
        tokio::join!(lookup_with_patience(&app, &id, patience), behind_the_first);
    let refused = refused.expect("a lookup beyond the read queue's room is answered at once");
    assert_eq!(
        refused.status(),
        503,
        "a lookup beyond the read queue's room"
    );
    assert_eq!(refused.headers()["retry-after"], "1");
    let why: Value = refused.json().await.unwrap();
    assert_eq!(
        why["error"],
        format!("{ROOM} job reads are waiting for the database, the limit; try again shortly")
    );
    assert!(
        queued.iter().all(Option::is_none),
        "the queued lookups waited for the lock: {queued:?}"
    );
    assert_eq!(
        first, None,
        "the first lookup waited for the lock and hung up too"
    );
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    // Once the lane has caught up, a lookup is read again; of the hung-up ones, only the read
    // already under way was.
    assert!(
        eventually(WAIT, || async { app.get_job(&id).await.status() == 200 }).await,
        "the read lane caught up"
    );
    assert_eq!(
        ids_read(&app).await - before,
        2.0,
        "ids read: the first lookup's and the last one's, not the {ROOM} whose clients had gone"
    );
}
