//! The log as an operator and a log shipper read it: `HANDOFF_LOG_FORMAT=json` gives one JSON
//! object per line with the fields a shipper indexes on, and no secret reaches the log in either
//! format, even at debug level.

use std::time::Duration;

use serde_json::Value;

use crate::support::instance::Instance;
use crate::support::redis::{fresh_channel, shared_redis};
use crate::support::{FreshDb, TOKEN, WAIT, cookie_client, eventually, free_port, post_form};

/// Creates and completes a job with a stream waiting on it, then stops the instance with SIGTERM
/// and waits for its exit, so that its log is complete; returns the job's id.
async fn one_job_then_stop(instance: &mut Instance) -> String {
    let id = instance.job_id().await;
    let mut stream = instance.connected_stream(&id).await;
    assert_eq!(instance.complete(&id).await.status(), 200);
    assert_eq!(stream.next_result(WAIT).await.unwrap()["status"], "result");
    let signalled = instance.sigterm();
    let exit = instance.exit_within(signalled, WAIT).await;
    assert!(exit.success(), "{exit}");
    id
}

#[tokio::test]
async fn every_json_log_line_is_an_object_with_time_level_target_message_and_instance() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/handoff.db", dir.path().display());
    let mut instance = Instance::start(
        dir.path(),
        &[
            ("DATABASE_URL", &db),
            ("HANDOFF_LOG_FORMAT", "json"),
            ("RUST_LOG", "debug"),
        ],
    );
    let id = one_job_then_stop(&mut instance).await;
    let log = instance.log_text();
    let lines: Vec<Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(lines.len() > 5, "{log}");
    let mut instances = std::collections::BTreeSet::new();
    for line in &lines {
        for field in ["time", "level", "target", "message"] {
            assert!(line[field].is_string(), "{field} in {line}");
        }
        let time = line["time"].as_str().unwrap();
        assert!(
            time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "RFC 3339 with milliseconds, UTC: {line}"
        );
        if let Some(instance) = line["instance"].as_str() {
            instances.insert(instance.to_owned());
        }
    }
    assert_eq!(
        instances.len(),
        1,
        "one instance id on its lines: {instances:?}"
    );
    let about_the_job: Vec<&Value> = lines.iter().filter(|l| l["job"] == id.as_str()).collect();
    for (level, words) in [
        ("INFO", "created"),
        ("INFO", "completed"),
        ("DEBUG", "stream opened"),
    ] {
        assert!(
            about_the_job
                .iter()
                .any(|l| l["level"] == level && l["message"].as_str().unwrap().contains(words)),
            "a {level} line with job {id} saying {words:?}: {about_the_job:?}"
        );
    }
    let completed = about_the_job
        .iter()
        .find(|l| l["message"].as_str().unwrap().contains("completed"))
        .unwrap();
    assert_eq!(completed["streams"], 1, "{completed}");
    assert_eq!(completed["target"], "handoff::jobs", "{completed}");
}

#[tokio::test]
async fn the_text_log_stays_as_it_was_with_no_fields_appended() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/handoff.db", dir.path().display());
    let mut instance = Instance::start(dir.path(), &[("DATABASE_URL", &db)]);
    let id = one_job_then_stop(&mut instance).await;
    let log = instance.log_text();
    let created = log
        .lines()
        .find(|line| line.contains(&format!("job {id} created")))
        .unwrap_or_else(|| panic!("a line saying the job was created: {log}"));
    assert!(
        created.starts_with('['),
        "env_logger's text line: {created}"
    );
    assert!(created.ends_with(&format!("job {id} created")), "{created}");
    assert!(log.lines().all(|line| !line.starts_with('{')), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and Redis: run scripts/test.sh"]
async fn no_secret_reaches_the_log_in_either_format_even_at_debug_level() {
    const FANOUT_KEY: &str = "fanout-key-secret-0123456789abcdefXYZ";
    const WEBHOOK_SECRET: &str = "webhook-signing-secret-0123456789";
    const DB_PASSWORD: &str = "db-password-secret-4711";
    const REDIS_PASSWORD: &str = "redis-password-secret-4711";
    // A webhook receiver's URL may carry its own secret in the path or the query.
    const HOOK_PATH: &str = "hook-path-secret-4711";
    const HOOK_QUERY: &str = "hook-query-secret-4711";
    let redis = shared_redis().await;
    let db = FreshDb::postgres().await;
    // PostgreSQL trusts the tests' connections, and Redis's default user has no password, so
    // both accept these passwords without checking them: they reach the servers all the same.
    let database_url = db
        .url()
        .replace("postgres@", &format!("postgres:{DB_PASSWORD}@"));
    let redis_url = redis.replace("redis://", &format!("redis://default:{REDIS_PASSWORD}@"));
    // Nothing listens there: every webhook attempt fails and is logged.
    let hook = format!(
        "http://127.0.0.1:{}/{HOOK_PATH}?token={HOOK_QUERY}",
        free_port()
    );
    for format in ["text", "json"] {
        let mut instance = Instance::start(
            &std::env::temp_dir(),
            &[
                ("DATABASE_URL", &database_url),
                ("REDIS_URL", &redis_url),
                ("HANDOFF_REDIS_CHANNEL", &fresh_channel()),
                ("HANDOFF_FANOUT_KEY", FANOUT_KEY),
                ("HANDOFF_WEBHOOK_URL", &hook),
                ("HANDOFF_WEBHOOK_SECRET", WEBHOOK_SECRET),
                ("HANDOFF_UNCLAIMED_SECS", "1"),
                ("HANDOFF_LOG_FORMAT", format),
                ("RUST_LOG", "debug"),
            ],
        );
        instance.wait_healthy().await;
        // The API with the right token and a wrong one.
        let unclaimed = instance.job_id().await;
        assert_eq!(instance.complete(&unclaimed).await.status(), 200);
        let wrong = instance
            .client
            .post(instance.url("/api/jobs"))
            .bearer_auth("wrong-token-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401);
        // The admin page: a wrong login, a right one, the page.
        let browser = cookie_client();
        let refused = post_form(
            &browser,
            instance.url("/admin/login"),
            &[("token", "wrong-token-0123456789")],
        )
        .await;
        assert_ne!(refused.status(), 303);
        let admin = instance.admin_session().await;
        let page = admin.get(instance.url("/admin")).send().await.unwrap();
        assert_eq!(page.status(), 200);
        // The webhook of the unclaimed job is attempted, signed, and fails.
        let attempted = eventually(Duration::from_secs(10), || async {
            let log = instance.log_text();
            log.lines()
                .any(|line| line.contains(&unclaimed) && line.contains("attempt 1 of"))
        });
        assert!(
            attempted.await,
            "a webhook attempt is logged: {}",
            instance.log_text()
        );
        // A job delivered across the Redis link (to this instance's own stream).
        let id = one_job_then_stop(&mut instance).await;
        let log = instance.log_text();
        assert!(log.contains(&id), "the log is at debug level: {log}");
        for secret in [
            TOKEN,
            FANOUT_KEY,
            WEBHOOK_SECRET,
            DB_PASSWORD,
            REDIS_PASSWORD,
            HOOK_PATH,
            HOOK_QUERY,
        ] {
            assert!(
                !log.contains(secret),
                "{format} log shows {secret}:\n{}",
                log.lines()
                    .filter(|line| line.contains(secret))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
}
