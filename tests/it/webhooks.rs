//! Delivery webhooks, received by a real HTTP server that the test runs: `delivered` with the
//! streams that took the ending, `unclaimed` when none did in time, signed with the deployment's
//! secret (checked here with an HMAC of the test's own), retried after failures, kept across a
//! SIGKILL, and sent once by two instances sharing PostgreSQL.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use handoff::config::{Config, WebhookConfig};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::redis::{fresh_channel, shared_redis};
use crate::support::{FreshDb, Handoff, Instance, TestApp, WAIT, eventually};

const SECRET: &str = "whsec-test-0123456789";

/// One webhook as the receiver got it.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    /// Header names in lower case, as they came.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// What the receiver answered.
    answered: u16,
}

impl Received {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, once its `Handoff-Signature` is checked: HMAC-SHA256 under [`SECRET`]
    /// over `<t>.<body>`, with `t` within a minute of now, as the README tells a receiver to.
    fn verified(&self) -> Value {
        let signature = self
            .header("handoff-signature")
            .expect("a signature header");
        let mut t = None;
        let mut v1 = None;
        for part in signature.split(',') {
            match part.split_once('=') {
                Some(("t", value)) => t = Some(value),
                Some(("v1", value)) => v1 = Some(value),
                _ => panic!("unexpected part {part:?} in {signature:?}"),
            }
        }
        let (t, v1) = (t.expect("t="), v1.expect("v1="));
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(&self.body);
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(v1, expected, "the signature holds");
        let sent: i64 = t.parse().expect("a numeric timestamp");
        let now = std::time::UNIX_EPOCH.elapsed().unwrap().as_secs() as i64;
        assert!((now - sent).abs() <= 60, "signed at {sent}, now {now}");
        let body: Value = serde_json::from_slice(&self.body).expect("a JSON body");
        assert_eq!(
            self.header("handoff-webhook-id"),
            body["id"].as_str(),
            "the id header names the body's webhook"
        );
        assert_eq!(self.header("content-type"), Some("application/json"));
        body
    }
}

/// A webhook receiver on 127.0.0.1:<port 0>: a minimal HTTP/1.1 server that records every
/// request and answers each with the next status of its script (200 once the script is done).
pub(crate) struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub(crate) async fn start(script: &[u16]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!(
            "http://{}/hooks/handoff?from=test",
            listener.local_addr().unwrap()
        );
        let got = Arc::<Mutex<Vec<Received>>>::default();
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let sink = Arc::clone(&got);
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (sink, script) = (Arc::clone(&sink), Arc::clone(&script));
                tokio::spawn(async move { serve(socket, sink, script).await });
            }
        });
        Self { url, got, task }
    }

    pub(crate) fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    fn accepted(&self) -> Vec<Received> {
        self.all()
            .into_iter()
            .filter(|r| r.answered == 200)
            .collect()
    }

    /// The bodies of the accepted webhooks once there are `n` of them, their signatures checked;
    /// panics after `within`.
    pub(crate) async fn accepted_bodies(&self, n: usize, within: Duration) -> Vec<Value> {
        let arrived = eventually(within, || async { self.accepted().len() >= n }).await;
        assert!(
            arrived,
            "{n} accepted webhook(s) within {within:?}; got {:?}",
            self.all()
        );
        self.accepted().iter().map(Received::verified).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request (head, then `Content-Length` bytes of body), records it, answers it and
/// closes the connection.
async fn serve(
    mut socket: TcpStream,
    sink: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).into_owned();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default().to_owned();
    assert!(
        request_line.starts_with("POST /hooks/handoff?from=test "),
        "{request_line}"
    );
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .expect("a Content-Length");
    let mut body = seen[head_end + 4..].to_vec();
    while body.len() < length {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&buf[..n]),
        }
    }
    let answered = script.lock().unwrap().pop_front().unwrap_or(200);
    sink.lock().unwrap().push(Received {
        headers,
        body,
        answered,
    });
    let answer = format!("HTTP/1.1 {answered} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = socket.write_all(answer.as_bytes()).await;
    let _ = socket.shutdown().await;
}

fn webhook_config(receiver: &Receiver, unclaimed_secs: u64) -> WebhookConfig {
    WebhookConfig {
        url: receiver.url.parse().expect("the receiver's URL"),
        secret: SECRET.into(),
        unclaimed: Duration::from_secs(unclaimed_secs),
        first_retry: Duration::from_millis(200),
        attempts: 5,
        max_age: Duration::from_secs(3600),
    }
}

/// A Handoff on SQLite sending webhooks to `receiver`, unclaimed after `unclaimed_secs`.
pub(crate) async fn app_reporting_to(receiver: &Receiver, unclaimed_secs: u64) -> TestApp {
    let hooks = webhook_config(receiver, unclaimed_secs);
    TestApp::spawn_with(move |config: &mut Config| config.webhook = Some(hooks)).await
}

/// A labelled metric's value, 0 while the label has not been counted yet.
async fn counted(handoff: &Handoff, name: &str) -> f64 {
    handoff.metric_if_shown(name).await.unwrap_or(0.0)
}

const REFUSED: &str = r#"handoff_webhook_attempts_total{outcome="refused"}"#;
const ACCEPTED: &str = r#"handoff_webhook_attempts_total{outcome="accepted"}"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_job_two_tabs_watch_yields_one_signed_delivered_webhook_counting_both_streams() {
    let receiver = Receiver::start(&[]).await;
    let app = app_reporting_to(&receiver, 30).await;
    let id = app.job_id().await;
    // One tab on the job's own stream, one on a shared stream (as handoff.js opens it).
    let mut shared = app.stream_at(&format!("/sse/watch?ids={id}")).await;
    shared.expect_connect().await;
    let mut tabs = [app.connected_stream(&id).await, shared];
    assert_eq!(app.complete(&id).await.status(), 200);
    for tab in &mut tabs {
        assert_eq!(tab.next_result(WAIT).await.unwrap()["status"], "result");
    }

    let bodies = receiver.accepted_bodies(1, WAIT).await;
    let hook = &bodies[0];
    assert_eq!(hook["type"], "delivered", "{hook}");
    assert_eq!(hook["jobId"], id.as_str());
    assert_eq!(hook["status"], "complete");
    assert_eq!(hook["streams"], 2, "{hook}");
    assert_eq!(hook["id"], format!("whk_{id}"));
    assert!(
        hook["endedAt"].is_string() && hook["deliveredAt"].is_string(),
        "{hook}"
    );
    assert_eq!(
        receiver.all()[0].header("handoff-webhook-attempt"),
        Some("1")
    );

    // Nothing more follows: one webhook per job.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.all().len(), 1, "{:?}", receiver.all());
    assert_eq!(
        app.metric(r#"handoff_webhooks_sent_total{type="delivered"}"#)
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_nobody_watches_yields_unclaimed_after_the_configured_time() {
    let receiver = Receiver::start(&[]).await;
    let app = app_reporting_to(&receiver, 2).await;
    let id = app.job_id().await;
    let completed = Instant::now();
    assert_eq!(app.complete(&id).await.status(), 200);

    let bodies = receiver.accepted_bodies(1, Duration::from_secs(6)).await;
    let waited = completed.elapsed();
    assert!(
        waited >= Duration::from_secs(2),
        "sent after {waited:?}, before its 2 s"
    );
    let hook = &bodies[0];
    assert_eq!(
        (&hook["type"], &hook["status"], &hook["streams"]),
        (&"unclaimed".into(), &"complete".into(), &0.into()),
        "{hook}"
    );
    assert!(hook.get("deliveredAt").is_none(), "{hook}");
    assert_eq!(hook["jobId"], id.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_failing_twice_gets_the_webhook_again_and_accepts_it_exactly_once() {
    let receiver = Receiver::start(&[500, 500]).await;
    let app = app_reporting_to(&receiver, 1).await;
    let id = app.job_id().await;
    assert_eq!(app.complete(&id).await.status(), 200);

    receiver.accepted_bodies(1, Duration::from_secs(8)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = receiver.all();
    let answered: Vec<u16> = all.iter().map(|r| r.answered).collect();
    assert_eq!(
        answered,
        [500, 500, 200],
        "three attempts, the last accepted"
    );
    let ids: HashSet<&str> = all
        .iter()
        .filter_map(|r| r.header("handoff-webhook-id"))
        .collect();
    assert_eq!(ids.len(), 1, "every attempt carries the same id: {ids:?}");
    let attempts: Vec<&str> = all
        .iter()
        .filter_map(|r| r.header("handoff-webhook-attempt"))
        .collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    for received in &all {
        assert_eq!(received.verified()["type"], "unclaimed");
    }
    assert_eq!(app.metric(REFUSED).await, 2.0);
    assert_eq!(app.metric(ACCEPTED).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_and_expired_jobs_yield_webhooks_with_their_status() {
    let receiver = Receiver::start(&[]).await;
    let app = app_reporting_to(&receiver, 2).await;
    let failing = app.job_id().await;
    let mut tab = app.connected_stream(&failing).await;
    let failed = app
        .api_post(
            &format!("/api/jobs/{failing}/fail"),
            Some(serde_json::json!({ "message": "disk full" })),
        )
        .await;
    assert_eq!(failed.status(), 200);
    assert_eq!(tab.next_result(WAIT).await.unwrap()["status"], "failed");
    let expiring = app.job_with_deadline(1).await;

    let bodies = receiver.accepted_bodies(2, Duration::from_secs(10)).await;
    let of = |job: &str| {
        bodies
            .iter()
            .find(|b| b["jobId"] == job)
            .unwrap_or_else(|| panic!("no webhook for {job}: {bodies:?}"))
            .clone()
    };
    let failed = of(&failing);
    assert_eq!(
        (&failed["type"], &failed["status"]),
        (&"delivered".into(), &"failed".into())
    );
    assert_eq!(failed["streams"], 1);
    let expired = of(&expiring);
    assert_eq!(
        (&expired["type"], &expired["status"]),
        (&"unclaimed".into(), &"expired".into())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_waiting_for_its_retry_when_handoff_is_sigkilled_is_sent_after_a_restart() {
    let receiver = Receiver::start(&[500]).await;
    let dir = tempfile::tempdir().unwrap();
    let envs = [
        ("HANDOFF_WEBHOOK_URL", receiver.url.as_str()),
        ("HANDOFF_WEBHOOK_SECRET", SECRET),
        ("HANDOFF_UNCLAIMED_SECS", "1"),
        // Long enough that the retry is still ahead at the kill, short enough for a test.
        ("HANDOFF_WEBHOOK_RETRY_MS", "2000"),
    ];
    let mut first = Instance::start(dir.path(), &envs);
    let id = first.job_id().await;
    assert_eq!(first.complete(&id).await.status(), 200);
    // The refusal is counted once the outbox holds the retry.
    let refused = eventually(WAIT, || async { counted(&first, REFUSED).await == 1.0 });
    assert!(
        refused.await,
        "the first attempt was refused: {:?}",
        receiver.all()
    );
    first.kill();
    assert_eq!(receiver.all().len(), 1);

    let restarted = Instance::start(dir.path(), &envs);
    let bodies = receiver.accepted_bodies(1, Duration::from_secs(8)).await;
    assert_eq!(bodies[0]["jobId"], id.as_str());
    assert_eq!(bodies[0]["type"], "unclaimed");
    assert_eq!(
        receiver.accepted()[0].header("handoff-webhook-attempt"),
        Some("2")
    );
    assert_eq!(counted(&restarted, ACCEPTED).await, 1.0);
}

/// Two instances on a fresh PostgreSQL database and a Redis channel of their own, sending
/// webhooks to `receiver` (unclaimed after `unclaimed_secs`).
pub(crate) async fn two_instances_reporting_to(
    receiver: &Receiver,
    unclaimed_secs: &str,
) -> (FreshDb, [Instance; 2]) {
    let db = FreshDb::postgres().await;
    let (redis_url, channel) = (shared_redis().await, fresh_channel());
    let envs = [
        ("HANDOFF_WEBHOOK_URL", receiver.url.as_str()),
        ("HANDOFF_WEBHOOK_SECRET", SECRET),
        ("HANDOFF_UNCLAIMED_SECS", unclaimed_secs),
    ];
    let instances = [
        Instance::in_fleet(&db, Some(redis_url), &channel, &envs),
        Instance::in_fleet(&db, Some(redis_url), &channel, &envs),
    ];
    (db, instances)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and Redis: run scripts/test.sh"]
async fn two_instances_on_postgresql_send_each_webhook_once() {
    let receiver = Receiver::start(&[]).await;
    let (_db, instances) = two_instances_reporting_to(&receiver, "2").await;
    let [a, b] = &instances;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(a.job_id().await);
    }
    // One job watched on each instance; the others unwatched.
    let mut on_b = b.connected_stream(&ids[0]).await;
    let mut on_a = a.connected_stream(&ids[1]).await;
    for (i, id) in ids.iter().enumerate() {
        let through = if i % 2 == 0 { a } else { b };
        assert_eq!(through.complete(id).await.status(), 200);
    }
    assert_eq!(on_b.next_result(WAIT).await.unwrap()["status"], "result");
    assert_eq!(on_a.next_result(WAIT).await.unwrap()["status"], "result");

    let bodies = receiver
        .accepted_bodies(ids.len(), Duration::from_secs(10))
        .await;
    // Time for a second copy to arrive, were the claim not exclusive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        receiver.all().len(),
        ids.len(),
        "each webhook once: {:?}",
        receiver.all()
    );
    let jobs: HashSet<&str> = bodies.iter().filter_map(|b| b["jobId"].as_str()).collect();
    assert_eq!(jobs.len(), ids.len());
    for body in &bodies {
        let watched = body["jobId"] == ids[0].as_str() || body["jobId"] == ids[1].as_str();
        let expected = if watched {
            ("delivered", 1)
        } else {
            ("unclaimed", 0)
        };
        assert_eq!(
            (body["type"].as_str(), body["streams"].as_i64()),
            (Some(expected.0), Some(expected.1)),
            "{body}"
        );
    }
    let mut sent = 0.0;
    for instance in &instances {
        sent += counted(instance, ACCEPTED).await;
    }
    assert_eq!(
        sent,
        ids.len() as f64,
        "the two instances' attempts add up to one per webhook"
    );
}

/// How many outbox rows the database at `url` holds.
async fn outbox_rows(url: &str) -> i64 {
    use sqlx::Connection;
    let sql = "SELECT COUNT(*) FROM webhooks";
    let (n,): (i64,) = if url.starts_with("sqlite:") {
        let mut db = sqlx::SqliteConnection::connect(url)
            .await
            .expect("the SQLite file");
        sqlx::query_as(sql).fetch_one(&mut db).await.expect("count")
    } else {
        let mut db = sqlx::PgConnection::connect(url)
            .await
            .expect("the database");
        sqlx::query_as(sql).fetch_one(&mut db).await.expect("count")
    };
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_webhook_url_endings_write_no_outbox_row_and_with_one_each_writes_one() {
    let off = TestApp::spawn().await;
    let receiver = Receiver::start(&[]).await;
    let on = app_reporting_to(&receiver, 30).await;
    for app in [&off, &on] {
        let watched = app.job_id().await;
        let mut tab = app.connected_stream(&watched).await;
        assert_eq!(app.complete(&watched).await.status(), 200);
        assert_eq!(tab.next_result(WAIT).await.unwrap()["status"], "result");
        let failing = app.job_id().await;
        let failed = app
            .api_post(&format!("/api/jobs/{failing}/fail"), None)
            .await;
        assert_eq!(failed.status(), 200);
        let expiring = app.job_with_deadline(1).await;
        let expired = eventually(WAIT, || async {
            app.job(&expiring).await["status"] == "expired"
        });
        assert!(expired.await, "the job with a 1 s deadline expired");
    }
    assert_eq!(
        outbox_rows(&off.database_url).await,
        0,
        "webhooks off: nothing written"
    );
    assert_eq!(outbox_rows(&on.database_url).await, 3, "one row per ending");
    assert!(
        receiver.all().len() <= 1,
        "only the watched job's is due yet"
    );
}

#[test]
fn a_webhook_url_that_is_not_http_or_lacks_its_secret_stops_start_up_saying_why() {
    for (envs, says) in [
        (
            vec![
                ("HANDOFF_WEBHOOK_URL", "ftp://hooks.example/x"),
                ("HANDOFF_WEBHOOK_SECRET", SECRET),
            ],
            "expected an https://",
        ),
        (
            vec![("HANDOFF_WEBHOOK_URL", "https://hooks.example/x")],
            "HANDOFF_WEBHOOK_SECRET",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_handoff"))
            .env("HANDOFF_ADDR", "127.0.0.1:0")
            .envs(envs.iter().copied())
            .output()
            .expect("run handoff");
        assert_eq!(
            out.status.code(),
            Some(2),
            "a configuration error: {envs:?}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{stderr}");
        assert!(
            !stderr.contains(SECRET),
            "the secret is never shown: {stderr}"
        );
    }
}
