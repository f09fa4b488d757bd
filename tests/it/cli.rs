//! The `handoff` command line as a job runner and an operator use it: the real binary against a
//! real server, its output, its exit codes (0 done, 1 refused, 2 usage, 3 unreachable), and
//! `--help` on every command.

use std::collections::HashMap;
use std::process::Command;

use serde_json::Value;

use crate::support::{self, Instance, TOKEN, TestApp, WAIT};

/// What one run of the binary left behind.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The listing's lines, `label  value`, by label.
    fn listing(&self) -> HashMap<String, String> {
        assert_eq!(self.code, 0, "{self:?}");
        self.stdout
            .lines()
            .filter_map(|line| line.trim_start().split_once("  "))
            .map(|(label, value)| (label.trim().to_owned(), value.trim().to_owned()))
            .collect()
    }

    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "{self:?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    /// Checks a failed run: its exit code, and that stderr carries `message`.
    fn failed(&self, code: i32, message: &str) {
        assert_eq!(self.code, code, "{self:?}");
        assert!(self.stderr.contains(message), "{self:?}");
        assert!(self.stdout.is_empty(), "nothing on stdout: {self:?}");
    }
}

/// Runs `handoff args…` with `envs` and none of the caller's HANDOFF_ variables.
async fn handoff(envs: &[(&str, &str)], args: &[&str]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_handoff"));
    for (name, _) in std::env::vars() {
        if name.starts_with("HANDOFF_") || name == "DATABASE_URL" || name == "REDIS_URL" {
            command.env_remove(name);
        }
    }
    let out = tokio::time::timeout(WAIT, command.envs(envs.iter().copied()).args(args).output())
        .await
        .unwrap_or_else(|_| panic!("handoff {args:?} still running after {WAIT:?}"))
        .expect("run handoff");
    Run {
        code: out.status.code().expect("an exit code, not a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `handoff job args…` against `app`, with the API token.
async fn job(app: &TestApp, args: &[&str]) -> Run {
    let envs = [
        ("HANDOFF_URL", app.base.as_str()),
        ("HANDOFF_API_TOKEN", TOKEN),
    ];
    let args: Vec<&str> = std::iter::once("job").chain(args.iter().copied()).collect();
    handoff(&envs, &args).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runner_creates_reports_on_and_completes_a_job_and_its_page_hears_each_step() {
    let app = TestApp::spawn().await;
    let created = job(
        &app,
        &["create", "--move-url", "/orders/42", "--deadline", "600"],
    )
    .await;
    let lines = created.listing();
    let id = lines["id"].clone();
    assert_eq!(lines["wait url"], format!("{}/jobs/{id}", app.base));
    assert_eq!(lines["status"], "pending");
    let stored = app.job(&id).await;
    assert_eq!(stored["status"], "pending");

    let mut page_a = app.connected_stream(&id).await;
    let reported = job(
        &app,
        &["progress", &id, "--percent", "40", "--message", "Rendering"],
    )
    .await;
    assert_eq!(reported.listing()["status"], "pending");
    let (event, data) = page_a.next_event(WAIT).await.expect("the progress event");
    assert_eq!(event, "progress");
    assert_eq!(
        (data["percent"].as_f64(), data["message"].as_str()),
        (Some(40.0), Some("Rendering"))
    );

    // Reports are stored a moment later, apart from their delivery.
    assert!(
        support::eventually(WAIT, || async {
            app.job(&id).await["progress"].is_object()
        })
        .await
    );
    let shown = job(&app, &["show", &id]).await.listing();
    assert_eq!(
        shown["progress"].split(" (at ").next(),
        Some("40% Rendering")
    );

    let completed = job(&app, &["complete", &id]).await.listing();
    assert_eq!(completed["status"], "complete");
    assert_eq!(completed["move url"], "/orders/42");
    let (event, data) = page_a.next_event(WAIT).await.expect("the result");
    assert_eq!(
        (event.as_str(), &data["moveUrl"]),
        ("result", &Value::from("/orders/42"))
    );

    let shown = job(&app, &["show", &id]).await.listing();
    assert_eq!(shown["status"], "complete");
    assert!(shown.contains_key("ended"), "{shown:?}");
    assert_eq!(
        shown["progress"].split(' ').next(),
        Some("40%"),
        "{shown:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runner_fails_a_job_with_a_message_that_page_b_shows() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let failed = job(&app, &["fail", &id, "--message", "The bank declined"])
        .await
        .listing();
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["message"], "The bank declined");
    assert_eq!(app.job(&id).await["message"], "The bank declined");
    assert!(app.page_b(&id).await.contains("The bank declined"));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_output_is_the_servers_answer_with_its_fields() {
    let app = TestApp::spawn().await;
    let created = job(&app, &["create", "--json"]).await.json();
    let id = created["id"].as_str().expect("an id").to_owned();
    assert_eq!(created["waitUrl"], format!("/jobs/{id}"));
    assert_eq!(created["status"], "pending");
    // --json may come before the command too.
    let reported = job(&app, &["--json", "progress", &id, "--percent", "12.5"])
        .await
        .json();
    assert_eq!(reported["id"], id.as_str());
    // Reports are stored a moment later, apart from their delivery.
    assert!(
        support::eventually(WAIT, || async {
            app.job(&id).await["progress"].is_object()
        })
        .await
    );
    let shown = job(&app, &["show", &id, "--json"]).await.json();
    for field in [
        "id",
        "status",
        "moveUrl",
        "createdAt",
        "endedAt",
        "completedAt",
        "deadline",
        "progress",
    ] {
        assert!(shown.get(field).is_some(), "{field} missing: {shown}");
    }
    assert_eq!(shown["progress"]["percent"], 12.5, "{shown}");
    let completed = job(&app, &["complete", &id, "--json"]).await.json();
    assert_eq!(completed["status"], "complete");
    assert_eq!(completed["moveUrl"], format!("/test.do?id={id}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_exit_1_with_the_servers_message_and_usage_errors_exit_2() {
    let app = TestApp::spawn().await;
    let wrong = [
        ("HANDOFF_URL", app.base.as_str()),
        ("HANDOFF_API_TOKEN", "wrong-token-0123456789"),
    ];
    handoff(&wrong, &["job", "create"])
        .await
        .failed(1, "401 Unauthorized: missing or wrong API token");

    job(&app, &["complete", "AAAAAAAAAAAAAAAAAAAAAA"])
        .await
        .failed(1, "404 Not Found: no job with this id");
    // One id in 64 starts with `-`: it is an id, not an option.
    for command in ["complete", "fail", "progress", "show"] {
        job(&app, &[command, "-AAAAAAAAAAAAAAAAAAAAA"])
            .await
            .failed(1, "404 Not Found: no job with this id");
    }
    job(&app, &["show", "not-an-id"])
        .await
        .failed(1, "400 Bad Request");
    let id = app.job_id().await;
    job(&app, &["complete", &id]).await.listing();
    job(&app, &["fail", &id])
        .await
        .failed(1, "409 Conflict: the job is complete");
    job(&app, &["progress", &id, "--percent", "1"])
        .await
        .failed(1, "409 Conflict");
    let pending = app.job_id().await;
    job(&app, &["progress", &pending, "--percent", "101"])
        .await
        .failed(1, "400 Bad Request: percent");
    job(
        &app,
        &["complete", &pending, "--move-url", "https://evil.example"],
    )
    .await
    .failed(1, "400 Bad Request");
    assert_eq!(app.job(&pending).await["status"], "pending");

    let no_token = [("HANDOFF_URL", app.base.as_str())];
    handoff(&no_token, &["job", "complete", &pending])
        .await
        .failed(2, "HANDOFF_API_TOKEN is not set");
    job(&app, &["create", "--deadline", "soon"])
        .await
        .failed(2, "--deadline");
    job(&app, &["progress", &pending, "--percent", "nan"])
        .await
        .failed(2, "--percent");
    job(&app, &["complete"]).await.failed(2, "<ID>");
    job(&app, &["show", &pending, "--url", "127.0.0.1:8080"])
        .await
        .failed(2, "HANDOFF_URL");
    assert_eq!(
        app.job(&pending).await["status"],
        "pending",
        "nothing was sent"
    );
}

#[tokio::test]
async fn a_server_that_cannot_be_reached_exits_3_naming_it() {
    let nobody = format!("http://127.0.0.1:{}", support::free_port());
    let envs = [
        ("HANDOFF_URL", nobody.as_str()),
        ("HANDOFF_API_TOKEN", TOKEN),
    ];
    for args in [
        &["job", "create"][..],
        &["job", "show", "AAAAAAAAAAAAAAAAAAAAAA"],
    ] {
        handoff(&envs, args)
            .await
            .failed(3, &format!("cannot reach Handoff at {nobody}"));
    }
}

#[tokio::test]
async fn check_config_lists_the_settings_with_secrets_masked_and_refuses_a_weak_token() {
    let database = "postgres://app:dbsecret-123@db.internal/jobs";
    let run = handoff(
        &[
            ("HANDOFF_API_TOKEN", TOKEN),
            ("DATABASE_URL", database),
            ("HANDOFF_DEMO", "off"),
        ],
        &["check-config"],
    )
    .await;
    let settings = run.listing();
    assert_eq!(settings["HANDOFF_API_TOKEN"], "(set, not shown)");
    assert_eq!(
        settings["DATABASE_URL"],
        "postgres://app:***@db.internal/jobs"
    );
    assert_eq!(settings["HANDOFF_DEMO"], "off");
    assert_eq!(settings["HANDOFF_ADDR"], "127.0.0.1:8080", "the default");
    assert!(
        !run.stdout.contains(TOKEN) && !run.stdout.contains("dbsecret-123"),
        "{run:?}"
    );

    let weak = "abababababababababab";
    let refused = handoff(&[("HANDOFF_API_TOKEN", weak)], &["check-config"]).await;
    refused.failed(2, "HANDOFF_API_TOKEN");
    assert!(!refused.stderr.contains(weak), "{refused:?}");
    handoff(&[("HANDOFF_SSE_TIMEOUT_SECS", "soon")], &["check-config"])
        .await
        .failed(2, "HANDOFF_SSE_TIMEOUT_SECS");
}

#[tokio::test]
async fn check_config_prints_the_readme_table_and_an_env_file_naming_every_setting() {
    let table = handoff(&[], &["check-config", "--markdown"]).await;
    assert_eq!(table.code, 0, "{table:?}");
    assert!(
        include_str!("../../README.md").contains(&table.stdout),
        "README.md's settings table is not this:\n{}",
        table.stdout
    );
    // The env file is the declarations', whatever the environment holds, even an invalid value.
    let env = handoff(
        &[("HANDOFF_SSE_TIMEOUT_SECS", "soon")],
        &["check-config", "--env-file"],
    )
    .await;
    assert_eq!(env.code, 0, "{env:?}");
    let variables: Vec<&str> = table
        .stdout
        .lines()
        .skip(2)
        .filter_map(|row| row.split('`').nth(1))
        .collect();
    assert!(variables.len() > 20, "{variables:?}");
    for var in variables {
        assert!(
            env.stdout.contains(&format!("\n# {var}: ")),
            "{var}: {env:?}"
        );
        assert!(env.stdout.contains(&format!("\n#{var}=")), "{var}: {env:?}");
    }
    assert!(
        env.stdout.contains("\n#HANDOFF_SSE_TIMEOUT_SECS=60\n"),
        "{env:?}"
    );
    handoff(&[], &["check-config", "--env-file", "--markdown"])
        .await
        .failed(2, "cannot be used with");
}

#[tokio::test]
async fn every_command_has_help() {
    for command in [
        &[][..],
        &["serve"],
        &["check-config"],
        &["token"],
        &["hash-password"],
        &["health"],
        &["job"],
        &["job", "create"],
        &["job", "progress"],
        &["job", "complete"],
        &["job", "fail"],
        &["job", "show"],
    ] {
        let args: Vec<&str> = command.iter().copied().chain(["--help"]).collect();
        let run = handoff(&[], &args).await;
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        let usage = format!("Usage: handoff {}", command.join(" "));
        assert!(
            run.stdout.contains(usage.trim_end()),
            "{args:?}: {}",
            run.stdout
        );
    }
    let job_help = handoff(&[], &["job", "--help"]).await.stdout;
    assert!(
        job_help.contains("HANDOFF_URL") && job_help.contains("Exit codes"),
        "{job_help}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_the_server_as_no_command_does() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_handoff"));
    command.arg("serve");
    let mut instance = Instance::start_command(command, dir.path(), &[]);
    assert_eq!(instance.get("/healthz").await.status(), 200);
    instance.sigterm();
    let status = instance.exit_within(std::time::Instant::now(), WAIT).await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn several_ids_from_the_command_line_a_file_and_stdin_go_in_a_batch() {
    let app = TestApp::spawn().await;
    let ids = crate::batch::job_ids(&app, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ids.txt");
    std::fs::write(&file, format!("{}\n\n  {}  \n", ids[2], ids[3])).unwrap();
    let done = job(
        &app,
        &[
            "complete",
            &ids[0],
            &ids[1],
            "--from-file",
            file.to_str().unwrap(),
            "--move-url",
            "/orders/7",
        ],
    )
    .await;
    let lines: Vec<&str> = done.stdout.lines().collect();
    let expected: Vec<String> = ids[..4]
        .iter()
        .map(|id| format!("{id}  complete"))
        .collect();
    assert_eq!(
        (done.code, lines),
        (0, expected.iter().map(String::as_str).collect())
    );
    for id in &ids[..4] {
        assert_eq!(app.job(id).await["moveUrl"], "/orders/7");
    }

    // From stdin, with refusals named on stderr and exit 1; the others still fail.
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_handoff"));
    command
        .env("HANDOFF_URL", app.base.as_str())
        .env("HANDOFF_API_TOKEN", TOKEN)
        .args(["job", "fail", "--from-file", "-", "--message", "disk full"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("run handoff");
    let unknown = "AAAAAAAAAAAAAAAAAAAAAA";
    let input = format!("{}\n{unknown}\n{}\n", ids[4], ids[0]);
    tokio::io::AsyncWriteExt::write_all(&mut child.stdin.take().unwrap(), input.as_bytes())
        .await
        .unwrap();
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("done in time")
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), format!("{}  failed", ids[4]));
    assert!(
        stderr.contains(&format!("{unknown}: 404 no job with this id")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{}: 409 the job is complete already", ids[0])),
        "{stderr}"
    );
    assert!(stderr.contains("refused 2 of 3 job(s)"), "{stderr}");
    assert_eq!(app.job(&ids[4]).await["message"], "disk full");
}

/// `handoff hash-password` with `input` on standard input.
fn hash_password(input: &str) -> Run {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_handoff"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run handoff hash-password");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(input.as_bytes())
        .expect("write the password");
    drop(stdin);
    let out = child.wait_with_output().expect("its output");
    Run {
        code: out.status.code().expect("an exit code, not a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hash_password_prints_a_hash_that_logs_the_admin_in_where_the_api_token_no_longer_does() {
    let password = "a long admin password";
    let run = hash_password(&format!("{password}\n"));
    assert_eq!(run.code, 0, "{run:?}");
    let hash = run.stdout.trim().to_owned();
    assert!(hash.starts_with("$argon2id$v=19$"), "{run:?}");
    assert!(!run.stdout.contains(password) && !run.stderr.contains(password));
    hash_password("too short\n").failed(2, "at least 12 characters");

    let app = TestApp::spawn_with(|c| c.admin_password_hash = Some(hash.clone().into())).await;
    let login = app.url("/admin/login");
    let with_token = support::post_form(&app.client, &login, &[("token", TOKEN)]).await;
    assert_eq!(
        with_token.status(),
        401,
        "the API token opens /admin no more"
    );
    let with_password = support::post_form(&app.client, &login, &[("token", password)]).await;
    assert_eq!(with_password.status(), 303);
    let created = app.api_post("/api/jobs", None).await;
    assert_eq!(created.status(), 201, "and still calls the API");
    let page = support::page_text(&app.client, app.url("/admin")).await;
    assert!(page.contains("HANDOFF_ADMIN_PASSWORD_HASH"), "{page}");

    let checked = handoff(
        &[
            ("HANDOFF_API_TOKEN", TOKEN),
            ("HANDOFF_ADMIN_PASSWORD_HASH", &hash),
        ],
        &["check-config"],
    )
    .await;
    assert!(!checked.stderr.contains("admin password"), "{checked:?}");
    let legacy = handoff(&[("HANDOFF_API_TOKEN", TOKEN)], &["check-config"]).await;
    assert_eq!(legacy.code, 0, "{legacy:?}");
    assert!(
        legacy
            .stderr
            .contains("warning: HANDOFF_API_TOKEN also serves as the admin password"),
        "{legacy:?}"
    );
}
