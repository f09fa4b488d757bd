//! The bench tool keeps working: a small run against a real Handoff, in each mode. No timing is
//! asserted; only that every expected event arrived exactly once and the tool said so.
//! (The write floor's test is in `examples/store_alone.rs`, beside what it runs.)

use std::process::Command;

use handoff::config::Config;
use handoff::startup::Application;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "test-token-0123456789";

/// A real Handoff on 127.0.0.1:<port 0> with a fresh SQLite file; dropping it stops the server.
struct TestApp {
    base: String,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl TestApp {
    async fn spawn() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = Config::from_lookup(|_| None).expect("defaults are valid");
        config.addr = "127.0.0.1:0".parse().expect("valid address");
        config.database_url = format!("sqlite://{}/handoff.db", dir.path().display());
        config.api_token = Some(TOKEN.into());
        config.workers = Some(2);
        let app = Application::build(config).await.expect("the app builds");
        let base = format!("http://127.0.0.1:{}", app.port());
        let shutdown = app.shutdown_token();
        tokio::spawn(app.run_until_stopped());
        Self {
            base,
            shutdown,
            _dir: dir,
        }
    }

    /// A metric's current value from `/metrics`.
    async fn metric(&self, name: &str) -> f64 {
        let addr = self.base.trim_start_matches("http://");
        let mut socket = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect for /metrics");
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        socket
            .write_all(request.as_bytes())
            .await
            .expect("send /metrics");
        let mut text = String::new();
        socket
            .read_to_string(&mut text)
            .await
            .expect("read /metrics");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `handoff-bench` against `app` and returns its JSON report, after checking it exited 0.
/// `leave_on_result`: the clients close each stream at its result, as `scripts/bench.sh` runs it.
async fn bench(app: &TestApp, mode: &str, streams: usize, leave_on_result: bool) -> Value {
    bench_with(app, mode, streams, leave_on_result, &[]).await
}

/// [`bench`] with more arguments.
async fn bench_with(
    app: &TestApp,
    mode: &str,
    streams: usize,
    leave_on_result: bool,
    more: &[&str],
) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("report.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_handoff-bench"));
    command.args([
        "--handoff",
        &app.base,
        "--token",
        TOKEN,
        "--mode",
        mode,
        "--timeout",
        "30",
    ]);
    command
        .args(["-n", &streams.to_string(), "--json"])
        .arg(&json);
    if leave_on_result {
        command.arg("--leave-on-result");
    }
    command.args(more);
    // The tool runs its own runtime and blocks; keep this test's runtime (and the app) free.
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the bench task")
        .expect("handoff-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "handoff-bench failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&json).expect("the JSON report was written");
    serde_json::from_str(&text).expect("the report is JSON")
}

fn assert_every_event_arrived_once(report: &Value, streams: u64) {
    assert_eq!(report["expected"], streams, "{report}");
    assert_eq!(report["delivered"], report["expected"], "{report}");
    assert_eq!(report["duplicates"], 0, "{report}");
    assert_eq!(report["opened"], streams, "{report}");
    assert_eq!(report["ok"], true, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_delivers_every_event_of_200_distinct_jobs_exactly_once() {
    let app = TestApp::spawn().await;
    let report = bench(&app, "distinct", 200, false).await;
    assert_every_event_arrived_once(&report, 200);
    assert_eq!(report["leave_on_result"], false, "{report}");
    assert_eq!(report["completions"], 200, "{report}");
    assert_eq!(app.metric("handoff_jobs_completed_total").await, 200.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_delivers_one_job_to_200_streams_exactly_once_when_each_leaves_at_its_result() {
    let app = TestApp::spawn().await;
    let report = bench(&app, "single", 200, true).await;
    assert_every_event_arrived_once(&report, 200);
    assert_eq!(report["leave_on_result"], true, "{report}");
    assert_eq!(report["completions"], 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_one_by_one_delivers_each_of_50_jobs_before_the_next_and_times_each() {
    let app = TestApp::spawn().await;
    let report = bench(&app, "one-by-one", 50, true).await;
    assert_every_event_arrived_once(&report, 50);
    assert_eq!(report["completions"], 50, "{report}");
    assert!(report["latency_ms"]["p50"].as_f64().is_some(), "{report}");
    assert!(report["answer_ms"]["p50"].as_f64().is_some(), "{report}");
    assert_eq!(app.metric("handoff_jobs_completed_total").await, 50.0);
}

#[tokio::test]
async fn bench_refuses_a_target_that_is_not_loopback() {
    let output = Command::new(env!("CARGO_BIN_EXE_handoff-bench"))
        .args([
            "--sub-url",
            "http://192.0.2.1:80/sub/{id}",
            "--pub-url",
            "http://192.0.2.1:80/pub/{id}",
        ])
        .output()
        .expect("handoff-bench runs");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("loopback"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_progress_flood_on_one_job_is_answered_and_every_stream_still_gets_its_result_once() {
    let app = TestApp::spawn().await;
    let more = ["--progress-rate", "200", "--progress-secs", "2"];
    let report = bench_with(&app, "single", 100, true, &more).await;
    assert_every_event_arrived_once(&report, 100);
    assert_eq!(report["progress_sent"], 400, "{report}");
    assert_eq!(report["progress_ok"], 400, "{report}");
    assert_eq!(app.metric("handoff_progress_reports_total").await, 400.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_gets_every_tenth_job_once_beside_the_streams_and_counts_in_the_verdict() {
    let app = TestApp::spawn().await;
    let watcher = format!("{}/sse/connect/{{id}}", app.base);
    let report = bench_with(&app, "distinct", 200, true, &["--watcher", &watcher]).await;
    assert_every_event_arrived_once(&report, 200);
    assert_eq!(report["watcher_expected"], 20, "{report}");
    assert_eq!(report["watcher_opened"], 20, "{report}");
    assert_eq!(report["watcher_delivered"], 20, "{report}");
    // A connect event and the result on each of the 200 + 20 streams.
    assert_eq!(app.metric("handoff_events_sent_total").await, 2.0 * 220.0);
}
