//! The core flow against the real app on a real port: page A's stream, completion, page B.

use std::time::{Duration, Instant};

use crate::support::{Handoff, Sse, TOKEN, TestApp, WAIT, page_text, result_of};

/// The data of a `result` event, which carries no `id:` field: a browser never has a
/// Last-Event-ID to send back.
fn result_data(event: Option<Sse>) -> serde_json::Value {
    let event = event.expect("an event");
    let fields = (event.event.as_deref(), event.id.as_deref());
    assert_eq!(fields, (Some("result"), None), "{event:?}");
    result_of(&event).expect("JSON data")
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_then_complete_delivers_the_result_and_ends_the_stream() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let mut stream = app.stream(&id).await;
    assert_eq!(
        stream.next_block(WAIT).await,
        Some(Sse::default().retry(1000))
    );
    assert_eq!(
        result_data(stream.next_block(WAIT).await),
        serde_json::json!({"status": "connect", "moveUrl": "", "id": id})
    );
    assert_eq!(app.complete(&id).await.status(), 200);
    assert_eq!(
        result_data(stream.next_block(WAIT).await),
        serde_json::json!({"status": "result", "moveUrl": format!("/test.do?id={id}"), "id": id})
    );
    assert_eq!(stream.next_block(WAIT).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn completion_before_connect_is_delivered_on_connect() {
    let app = TestApp::spawn().await;
    let job = app.create_job(Some("/receipt?order=7")).await;
    let id = job["id"].as_str().unwrap();
    app.complete(id).await;
    let mut stream = app.stream(id).await;
    let result = stream.expect_connect_result_end(WAIT).await;
    assert_eq!(result["moveUrl"], "/receipt?order=7");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_tab_gets_the_result_and_the_hub_is_empty_afterwards() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(app.connected_stream(&id).await);
    }
    assert_eq!(app.metric("handoff_watched_jobs").await, 1.0);
    assert_eq!(app.metric("handoff_open_streams").await, 3.0);
    app.complete(&id).await;
    for s in &mut streams {
        assert_eq!(s.next_result(WAIT).await.unwrap()["status"], "result");
        assert_eq!(s.next_block(WAIT).await, None);
    }
    assert!(app.metric_reaches("handoff_watched_jobs", 0.0, WAIT).await);
    assert!(app.metric_reaches("handoff_open_streams", 0.0, WAIT).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_connects_and_completions_lose_nothing() {
    // 500 streams at once, all from this one address.
    let app = TestApp::spawn_with(|c| c.max_streams_per_client = None).await;
    let rounds = 500;
    let mut ids = Vec::new();
    for _ in 0..rounds {
        ids.push(app.job_id().await);
    }
    let mut tasks = Vec::new();
    for id in ids {
        let handoff = Handoff::clone(&app);
        tasks.push(tokio::spawn(async move {
            let reader = tokio::spawn({
                let (handoff, id) = (handoff.clone(), id.clone());
                async move {
                    let mut s = handoff.stream(&id).await;
                    loop {
                        match s.next_result(Duration::from_secs(20)).await {
                            Some(v) if v["status"] == "result" => {
                                return v["moveUrl"].as_str().map(str::to_owned);
                            }
                            Some(_) => continue,
                            None => return None,
                        }
                    }
                }
            });
            let status = handoff.complete(&id).await.status();
            assert_eq!(status, 200);
            (id, reader.await.unwrap())
        }));
    }
    let mut lost = 0;
    for task in tasks {
        let (id, got) = task.await.unwrap();
        if got != Some(format!("/test.do?id={id}")) {
            lost += 1;
        }
    }
    assert_eq!(lost, 0, "{lost} of {rounds} results lost");
    assert!(app.metric_reaches("handoff_watched_jobs", 0.0, WAIT).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_malformed_ids_get_4xx_never_500() {
    let app = TestApp::spawn().await;
    let unknown = app.get("/sse/connect/AAAAAAAAAAAAAAAAAAAAAA").await;
    assert_eq!(unknown.status(), 404);
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("no job"));
    let long = "x".repeat(1000);
    for raw in [
        "",
        &long,
        "..%2Fx",
        "%00",
        "%3Cscript%3E",
        "%C3%A9t%C3%A9",
        "<script>",
    ] {
        for path in [
            format!("/sse/connect/{raw}"),
            format!("/api/jobs/{raw}"),
            format!("/jobs/{raw}"),
            format!("/test.do?id={raw}"),
        ] {
            let status = app.get(&path).await.status().as_u16();
            assert!((400..500).contains(&status), "{path} answered {status}");
        }
    }
    assert_eq!(app.complete(&long).await.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_refuses_a_missing_or_wrong_token_and_changes_nothing() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let url = app.url(&format!("/api/jobs/{id}/complete"));
    let none = app.client.post(&url).send().await.unwrap();
    assert_eq!(none.status(), 401);
    let wrong = app
        .client
        .post(&url)
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let create = app
        .client
        .post(app.url("/api/jobs"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), 401);
    let job = app.job(&id).await;
    assert_eq!(job["status"], "pending");
    assert_eq!(job["moveUrl"], "");
    assert_eq!(job["completedAt"], serde_json::Value::Null);
    assert_eq!(job["endedAt"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn completing_twice_returns_the_stored_result_and_unknown_is_404() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let first: serde_json::Value = app.complete(&id).await.json().await.unwrap();
    let again = app.complete_with(&id, "/other").await;
    assert_eq!(again.status(), 200);
    let second: serde_json::Value = again.json().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first["status"], "complete");
    assert!(first["endedAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(first["completedAt"], first["endedAt"], "the old name, kept");
    assert_eq!(app.complete("AAAAAAAAAAAAAAAAAAAAAA").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_move_url_that_leaves_the_site_is_refused() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    for evil in [
        "https://evil.example",
        "//evil.example",
        "/\\evil.example",
        "javascript:alert(1)",
    ] {
        let create = app.post_job(Some(evil)).await;
        assert_eq!(create.status(), 400, "create with {evil}");
        let text = create.text().await.unwrap();
        assert!(text.contains("moveUrl"), "{text}");
        let complete = app.complete_with(&id, evil).await;
        assert_eq!(complete.status(), 400, "complete with {evil}");
    }
    assert_eq!(app.job(&id).await["status"], "pending");
    let garbage = app
        .client
        .post(app.url("/api/jobs"))
        .bearer_auth(TOKEN)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_after_its_timeout_and_a_reconnect_works() {
    let app = TestApp::spawn_with(|c| c.sse_timeout = Duration::from_secs(2)).await;
    let id = app.job_id().await;
    let started = Instant::now();
    let mut stream = app.connected_stream(&id).await;
    assert_eq!(
        stream.next_result(WAIT).await,
        None,
        "the stream ends by itself"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "ended after {took:?}"
    );
    let mut again = app.connected_stream(&id).await;
    app.complete(&id).await;
    assert_eq!(again.next_result(WAIT).await.unwrap()["status"], "result");
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_comments_flow_on_an_idle_stream() {
    let app = TestApp::spawn_with(|c| c.keep_alive = Duration::from_secs(1)).await;
    let id = app.job_id().await;
    let mut stream = app.connected_stream(&id).await;
    stream.expect_keep_alive(WAIT).await;
    stream.expect_keep_alive(WAIT).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_every_job_and_delivers_what_completed_meanwhile() {
    let mut app = TestApp::spawn().await;
    let id = app.job_id().await;
    let other = app.job_id().await;
    app.complete(&other).await;
    let url = app.database_url.clone();
    let dir = app.stop().await;
    let mut app = TestApp::spawn_on(&url, |_| {}).await;
    app.complete(&id).await;
    app.stop().await;
    let app = TestApp::spawn_on(&url, |_| {}).await;
    for job in [&id, &other] {
        let mut stream = app.stream(job).await;
        stream.expect_connect_result_end(WAIT).await;
    }
    drop(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stream_has_the_headers_proxies_need() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let stream = app.stream(&id).await;
    assert_eq!(stream.response_status, 200);
    let h = &stream.headers;
    assert_eq!(h["content-type"], "text/event-stream");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["x-accel-buffering"], "no");
    assert!(h.get("content-encoding").is_none_or(|v| v == "identity"));
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_a_and_b_and_the_landing_page_answer() {
    let app = TestApp::spawn().await;
    let landing = app.get("/").await;
    assert_eq!(landing.status(), 200);
    let text = landing.text().await.unwrap();
    assert!(text.contains("action=\"/jobs\"") && text.contains("href=\"/admin\""));

    let demo = app.client.post(app.url("/jobs")).send().await.unwrap();
    assert_eq!(demo.status(), 303);
    let page_a_path = demo.headers()["location"].to_str().unwrap().to_owned();
    let id = page_a_path.strip_prefix("/jobs/").unwrap().to_owned();
    let page_a = app.get(&page_a_path).await;
    assert_eq!(page_a.status(), 200);
    let csp = page_a.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let html = page_a.text().await.unwrap();
    assert!(html.contains(&format!("data-handoff-job=\"{id}\"")));
    assert!(html.contains("src=\"/static/handoff.js\""));
    assert!(!html.contains("<script>"), "no inline script on page A");
    let js = app.get("/static/handoff.js").await;
    assert_eq!(js.status(), 200);
    assert!(js.text().await.unwrap().contains("EventSource"));

    let pending = page_text(&app.client, app.url(&format!("/test.do?id={id}"))).await;
    assert!(
        pending.contains("Not finished yet") && pending.contains(&format!("href=\"/jobs/{id}\""))
    );
    app.complete(&id).await;
    let page_b = app.get(&format!("/test.do?id={id}")).await;
    assert_eq!(page_b.status(), 200);
    assert!(page_b.text().await.unwrap().contains("Job complete"));
    let unknown = app.get("/test.do?id=AAAAAAAAAAAAAAAAAAAAAA").await;
    assert_eq!(unknown.status(), 404);
    assert!(unknown.text().await.unwrap().contains("No such job"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_move_url_is_escaped_wherever_it_is_shown() {
    let raw = "/x?a=\"><script>alert(1)</script>&b=<i>";
    // askama's HTML escaping, which writes decimal references for `"`, `&`, `'`, `<` and `>`.
    let escaped = "/x?a=&#34;&#62;&#60;script&#62;alert(1)&#60;/script&#62;&#38;b=&#60;i&#62;";
    let app = TestApp::spawn().await;
    let job = app.create_job(Some(raw)).await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(app.complete(id).await.status(), 200);
    let mut stream = app.stream(id).await;
    let result = stream.expect_connect_result_end(WAIT).await;
    assert_eq!(
        result["moveUrl"], raw,
        "the stream carries the moveUrl as given"
    );

    let page_b = page_text(&app.client, app.url(&format!("/test.do?id={id}"))).await;
    let admin = page_text(&app.admin_session().await, app.url("/admin")).await;
    assert!(
        page_b.contains(&format!("<code>{escaped}</code>")),
        "page B shows the moveUrl, escaped, as code:\n{page_b}"
    );
    for (page, html) in [("page B", &page_b), ("the admin page", &admin)] {
        assert!(
            html.contains("Moves to"),
            "{page} says where the job moves to:\n{html}"
        );
        assert!(
            html.contains(escaped),
            "{page} shows the moveUrl escaped:\n{html}"
        );
        // The pages' own markup has `"><` (`<a href="…"><code>`): the attribute breakout is
        // looked for with the tag that follows it.
        for unescaped in [raw, "\"><script", "<script>", "<i>"] {
            assert!(
                !html.contains(unescaped),
                "{page} shows {unescaped:?} unescaped:\n{html}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_metrics_answer() {
    let app = TestApp::spawn().await;
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
    assert!(health.text().await.unwrap().starts_with("ok"));
    let id = app.job_id().await;
    app.complete(&id).await;
    assert_eq!(app.metric("handoff_jobs_created_total").await, 1.0);
    assert_eq!(app.metric("handoff_jobs_completed_total").await, 1.0);
    app.stream(&id).await.expect_connect_result_end(WAIT).await;
    assert_eq!(app.metric("handoff_events_sent_total").await, 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn shutting_down_ends_open_streams_within_a_second() {
    let mut app = TestApp::spawn().await;
    let id = app.job_id().await;
    let mut stream = app.connected_stream(&id).await;
    let started = Instant::now();
    let stopping = tokio::spawn(async move {
        app.stop().await;
        started.elapsed()
    });
    assert_eq!(stream.next_block(WAIT).await, None);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "stream ended after {:?}",
        started.elapsed()
    );
    let stopped_after = stopping.await.unwrap();
    assert!(
        stopped_after < Duration::from_secs(5),
        "server stopped after {stopped_after:?}"
    );
}

/// Completions and creations arriving together are stored in batches; a job named several times
/// in one batch is still completed exactly once, with the move URL of the call that won.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_completions_of_the_same_and_of_distinct_jobs_each_complete_once() {
    let app = TestApp::spawn().await;
    let shared = app.job_id().await;
    let mut distinct = Vec::new();
    for _ in 0..40 {
        distinct.push(app.job_id().await);
    }
    let calls = (0..24)
        .map(|i| (shared.clone(), format!("/shared/{i}")))
        .chain(
            distinct
                .iter()
                .map(|id| (id.clone(), format!("/done/{id}"))),
        );
    let app = &app;
    let answers = futures_util::future::join_all(calls.map(|(id, target)| async move {
        let response = app.complete_with(&id, &target).await;
        assert_eq!(response.status(), 200);
        let job: serde_json::Value = response.json().await.unwrap();
        (id, job["moveUrl"].as_str().unwrap().to_owned())
    }))
    .await;
    // Every call on the shared job got the one stored result, whichever call stored it.
    let stored = app.job(&shared).await;
    let winner = stored["moveUrl"].as_str().unwrap();
    assert!(winner.starts_with("/shared/"), "{stored}");
    for (id, move_url) in &answers {
        if *id == shared {
            assert_eq!(move_url, winner);
        } else {
            assert_eq!(*move_url, format!("/done/{id}"));
        }
    }
    assert!(
        app.metric_reaches("handoff_jobs_completed_total", 41.0, Duration::from_secs(2))
            .await,
        "each job counts one completion"
    );
}
