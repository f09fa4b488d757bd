//! What `/metrics` measures, and the monitoring Handoff ships (`deploy/`), checked against a real
//! Prometheus: `promtool` checks the scrape config and the alert rules and runs their unit tests;
//! then Prometheus scrapes two real `handoff` processes (PostgreSQL, Redis, webhooks on) while the
//! test drives jobs and streams through them, and every expression of the Grafana dashboard is
//! evaluated through Prometheus's HTTP API. A renamed metric breaks this test, not the dashboard.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use std::process::Child;

use crate::support::{self, TestApp, WAIT, eventually, free_port};
use crate::webhooks::{Receiver, two_instances_reporting_to};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// How often the test's Prometheus scrapes and evaluates: often, so the test is short.
const SCRAPE_EVERY: &str = "1s";

/// Grafana's own variables, as the dashboard's expressions use them, and what Prometheus gets
/// in their place.
const GRAFANA_VARIABLES: [(&str, &str); 1] = [("$__rate_interval", "1m")];

#[tokio::test(flavor = "multi_thread")]
async fn each_histogram_counts_what_it_measures_under_route_templates_never_ids() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let mut stream = app.connected_stream(&id).await;
    assert_eq!(app.complete(&id).await.status(), 200);
    stream.next_result(WAIT).await.expect("the result");
    drop(stream);
    let local = r#"handoff_delivery_seconds_count{path="local"}"#;
    assert_eq!(app.metric(local).await, 1.0, "one stream took the ending");
    // An ending the stream finds at connect is no delivery.
    let ended = app.job_id().await;
    assert_eq!(app.complete(&ended).await.status(), 200);
    let mut late = app.stream(&ended).await;
    late.expect_connect_result_end(WAIT).await;
    assert_eq!(
        app.metric(local).await,
        1.0,
        "a connect-and-send is not timed"
    );
    for path in ["redis", "catchup"] {
        let name = format!(r#"handoff_delivery_seconds_count{{path="{path}"}}"#);
        assert_eq!(
            app.metric(&name).await,
            0.0,
            "{path} is shown before it is taken"
        );
    }
    let streams = "handoff_stream_duration_seconds_count";
    assert!(
        eventually(WAIT, || async { app.metric(streams).await == 2.0 }).await,
        "each stream's lifetime is recorded when it ends"
    );
    let ends = r#"handoff_store_commit_seconds_count{lane="write",kind="end"}"#;
    assert_eq!(
        app.metric(ends).await,
        2.0,
        "one commit per completion here"
    );
    let rows = r#"handoff_store_batch_rows_sum{lane="write",kind="end"}"#;
    assert_eq!(app.metric(rows).await, 2.0);
    let completions = r#"handoff_http_request_duration_seconds_count{route="/api/jobs/{id}/complete",status="2xx"}"#;
    assert_eq!(app.metric(completions).await, 2.0);
    app.get("/api/jobs/AAAAAAAAAAAAAAAAAAAAAA").await;
    app.get(&format!("/nothing/{id}")).await;
    let text = app.get("/metrics").await.text().await.unwrap();
    for line in [
        r#"handoff_http_request_duration_seconds_count{route="/api/jobs/{id}",status="4xx"} 1"#,
        r#"handoff_http_request_duration_seconds_count{route="unmatched",status="4xx"} 1"#,
    ] {
        assert!(text.contains(line), "{line} in:\n{text}");
    }
    assert!(!text.contains(&id), "no job id in /metrics");
}

/// Runs `promtool` with `args` in `deploy/prometheus`, failing with its output unless it succeeds.
fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(Path::new(DEPLOY).join("prometheus"))
        .output()
        .expect("run promtool (Debian's prometheus package; scripts/test.sh installs it)");
    assert!(
        output.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every panel expression of the dashboard, with its panel's title.
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(DEPLOY).join("grafana/handoff.json"))
        .expect("deploy/grafana/handoff.json");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut expressions = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        let targets = panel["targets"].as_array().expect("each panel has targets");
        assert!(!targets.is_empty(), "panel {title:?} shows nothing");
        for target in targets {
            let mut expr = target["expr"].as_str().expect("an expr").to_owned();
            for (variable, value) in GRAFANA_VARIABLES {
                expr = expr.replace(variable, value);
            }
            expressions.push((title.to_owned(), expr));
        }
    }
    expressions
}

/// A child process, killed when dropped, whether its test passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Prometheus on a loopback port with its storage in a temporary folder, scraping `targets`
/// and evaluating the shipped alert rules.
struct Prometheus {
    base: String,
    client: reqwest::Client,
    _process: Killed,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(targets: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets
            .iter()
            .map(|base| format!("'{}'", base.trim_start_matches("http://")))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_EVERY}\n  evaluation_interval: {SCRAPE_EVERY}\n\
             rule_files:\n  - {DEPLOY}/prometheus/handoff-alerts.yml\n\
             scrape_configs:\n  - job_name: handoff\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let process = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (Debian's prometheus package; scripts/test.sh installs it)");
        let prometheus = Self {
            base: format!("http://{address}"),
            client: support::client(),
            _process: Killed(process),
            _dir: dir,
        };
        let ready = eventually(Duration::from_secs(20), || async {
            let url = format!("{}/-/ready", prometheus.base);
            matches!(prometheus.client.get(url).send().await, Ok(r) if r.status() == 200)
        })
        .await;
        assert!(ready, "prometheus was not ready within 20 s");
        prometheus
    }

    /// `/api/v1/query` for `expr` now: the `data` of a success, or why it failed.
    async fn query(&self, expr: &str) -> Result<Value, String> {
        let answer = self
            .client
            .post(format!("{}/api/v1/query", self.base))
            .form(&[("query", expr)])
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = answer.json().await.map_err(|e| e.to_string())?;
        if body["status"] == "success" {
            Ok(body["data"].clone())
        } else {
            Err(format!("{}: {}", body["errorType"], body["error"]))
        }
    }

    /// The sum of `expr`'s series now (0 without any).
    async fn sum(&self, expr: &str) -> f64 {
        let Ok(data) = self.query(expr).await else {
            return 0.0;
        };
        data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|series| series["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs prometheus: run by scripts/test.sh"]
async fn every_dashboard_expression_returns_series_from_a_real_prometheus_scraping_handoff() {
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "rules", "handoff-alerts.yml"]);
    promtool(&["test", "rules", "handoff-alerts.test.yml"]);

    // Two instances on one PostgreSQL and Redis, so that deliveries take both the local path and
    // the Redis one, and webhooks on, so that the webhook panels have something to show.
    let receiver = Receiver::start(&[]).await;
    let (_db, instances) = two_instances_reporting_to(&receiver, "1").await;
    let bases: Vec<String> = instances.iter().map(|i| i.base.clone()).collect();
    let prometheus = Prometheus::start(&bases).await;
    let [a, b] = &instances;

    // Streams on A, their jobs completed half through A (local), half through B (Redis); one
    // unknown job asked for (a 4xx).
    let client = support::client();
    let jobs = 20;
    let mut streams = Vec::new();
    for i in 0..jobs {
        let id = a.job_id().await;
        let stream = a.connected_stream(&id).await;
        streams.push((id, stream, if i % 2 == 0 { a } else { b }));
    }
    // Another job, watched by nobody: a progress report, then a failure.
    let other = b.job_id().await;
    for (call, body) in [
        ("progress", serde_json::json!({"percent": 50})),
        ("fail", serde_json::json!({})),
    ] {
        let answer = client
            .post(b.url(&format!("/api/jobs/{other}/{call}")))
            .bearer_auth(support::TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{call}");
    }
    for (id, _, through) in &streams {
        let answer = through.complete(id).await;
        assert_eq!(answer.status(), 200);
    }
    for (id, stream, _) in &mut streams {
        let ended = stream.next_result(WAIT).await;
        assert!(ended.is_some(), "job {id} reached its stream");
    }
    drop(streams);
    let unknown = client
        .get(a.url("/api/jobs/AAAAAAAAAAAAAAAAAAAAAA"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    receiver
        .accepted_bodies(jobs, Duration::from_secs(10))
        .await;

    // Until Prometheus has seen all of it, and then a few scrapes more so that every rate has
    // two samples with the traffic between them.
    let seen = eventually(Duration::from_secs(30), || async {
        let redis = r#"handoff_delivery_seconds_count{path="redis"}"#;
        let webhooks = r#"handoff_webhook_attempts_total{outcome="accepted"}"#;
        let sent = "handoff_webhook_send_seconds_count";
        prometheus.sum(redis).await >= (jobs / 2) as f64
            && prometheus.sum(webhooks).await > jobs as f64
            && prometheus.sum(sent).await > jobs as f64
    })
    .await;
    assert!(seen, "prometheus scraped the deliveries and the webhooks");
    tokio::time::sleep(Duration::from_secs(3)).await;

    let expressions = dashboard_expressions();
    let mut failures = Vec::new();
    for (panel, expr) in &expressions {
        match prometheus.query(expr).await {
            Ok(data) if data["result"].as_array().is_some_and(|r| !r.is_empty()) => {}
            Ok(_) => failures.push(format!("{panel}: `{expr}` returns no series")),
            Err(why) => failures.push(format!("{panel}: `{expr}` fails: {why}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} dashboard expressions:\n{}",
        failures.len(),
        expressions.len(),
        failures.join("\n")
    );

    // The real Prometheus loaded the shipped rules and evaluates them without error.
    let rules: Value = client
        .get(format!("{}/api/v1/rules", prometheus.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_array().into_iter().flatten())
        .collect();
    assert_eq!(loaded.len(), 6, "{rules}");
    for rule in loaded {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    eprintln!(
        "{} dashboard expressions checked against Prometheus",
        expressions.len()
    );
}
