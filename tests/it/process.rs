//! The `handoff` binary as an operator runs it: start-up config errors, SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support;
use crate::support::{SseReader, TOKEN};

/// Starts the binary on port 0 with `envs`; returns the child and its base URL.
fn start(dir: &std::path::Path, envs: &[(&str, &str)]) -> (Child, String) {
    let (child, base, _log) = support::start_binary(dir, envs);
    (child, base)
}

#[test]
fn an_invalid_setting_stops_start_up_naming_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .env("HANDOFF_SSE_TIMEOUT_SECS", "soon")
        .output()
        .expect("run handoff");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("HANDOFF_SSE_TIMEOUT_SECS"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_streams_within_a_second_and_exits_within_five() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base) = start(dir.path(), &[]);
    let client = support::client();
    let id = &support::job_id_at(&client, &base).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut s = SseReader::open(&client, &format!("{base}/sse/connect/{id}")).await;
        assert_eq!(
            s.next_result(Duration::from_secs(5)).await.unwrap()["status"],
            "connect"
        );
        streams.push(s);
    }
    let started = support::sigterm(&child);
    for s in &mut streams {
        assert_eq!(s.next_block(Duration::from_secs(2)).await, None);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "streams ended after {:?}",
        started.elapsed()
    );
    let exited = support::exit_within(&mut child, started, Duration::from_secs(5)).await;
    assert!(exited.success(), "{exited:?}");

    // A restart on the same file keeps the job; completing it reaches a reconnecting browser.
    let (mut child, base) = start(dir.path(), &[]);
    let mut s = SseReader::open(&client, &format!("{base}/sse/connect/{id}")).await;
    assert_eq!(
        s.next_result(Duration::from_secs(5)).await.unwrap()["status"],
        "connect"
    );
    client
        .post(format!("{base}/api/jobs/{id}/complete"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        s.next_result(Duration::from_secs(5)).await.unwrap()["status"],
        "result"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_setup_it_creates_its_database_and_logs_a_generated_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .current_dir(dir.path())
        .env_remove("HANDOFF_API_TOKEN")
        .env_remove("DATABASE_URL")
        .env("HANDOFF_ADDR", "127.0.0.1:0")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut saw_token_note = false;
    for line in lines.by_ref() {
        let line = line.unwrap();
        saw_token_note |= line.contains("HANDOFF_API_TOKEN is not set");
        if line.contains("listening on") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        saw_token_note,
        "the generated token is logged with a note on how to set one"
    );
    assert!(
        dir.path().join("data/handoff.db").exists(),
        "data/handoff.db was created"
    );
}
