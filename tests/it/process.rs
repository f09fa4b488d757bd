//! The `handoff` binary as an operator runs it: start-up config errors, SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Instance, WAIT};

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

#[test]
fn a_weak_token_stops_start_up_saying_why_without_showing_it() {
    let weak = "abababababababababab";
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .current_dir(dir.path())
        .env("HANDOFF_ADDR", "127.0.0.1:0")
        .env("HANDOFF_API_TOKEN", weak)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run handoff");
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("handoff started with a weak token");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HANDOFF_API_TOKEN") && stderr.contains("different characters"),
        "{stderr}"
    );
    assert!(!stderr.contains(weak), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_streams_within_a_second_and_exits_within_five() {
    let dir = tempfile::tempdir().unwrap();
    let mut instance = Instance::start(dir.path(), &[]);
    let id = &instance.job_id().await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(instance.connected_stream(id).await);
    }
    let started = instance.sigterm();
    for s in &mut streams {
        assert_eq!(s.next_block(Duration::from_secs(2)).await, None);
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "streams ended after {:?}",
        started.elapsed()
    );
    let exited = instance.exit_within(started, Duration::from_secs(5)).await;
    assert!(exited.success(), "{exited:?}");

    // A restart on the same file keeps the job; completing it reaches a reconnecting browser.
    let mut restarted = Instance::start(dir.path(), &[]);
    let mut s = restarted.connected_stream(id).await;
    let completed = restarted.complete(id).await;
    assert_eq!(completed.status(), 200);
    assert_eq!(s.next_result(WAIT).await.unwrap()["status"], "result");
    restarted.kill();
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
