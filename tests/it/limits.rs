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
