//! `GET /sse/watch?ids=…`: one stream for several jobs, as `handoff.js` shares it between tabs.

use serde_json::{Value, json};

use crate::support::{Sse, SseReader, TestApp, WAIT};

async fn watch(app: &TestApp, ids: &[&str]) -> SseReader {
    app.stream_at(&format!("/sse/watch?ids={}", ids.join(",")))
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_stream_tells_each_job_apart_and_ends_when_every_job_has_ended() {
    let app = TestApp::spawn().await;
    let done = app.job_id().await;
    app.complete(&done).await;
    let waiting = app.job_id().await;
    let failing = app.job_id().await;
    let unknown = handoff::domain::JobId::generate().to_string();

    let mut stream = watch(&app, &[&waiting, &done, &unknown, &failing]).await;
    assert_eq!(stream.response_status, 200);
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    assert_eq!(stream.headers["x-accel-buffering"], "no");
    assert_eq!(
        stream.next_block(WAIT).await,
        Some(Sse::default().retry(1000))
    );
    let (event, connect) = stream.next_event(WAIT).await.unwrap();
    assert_eq!(event, "result");
    assert_eq!(
        connect,
        json!({ "status": "connect", "ids": [&waiting, &done, &unknown, &failing] })
    );
    // At once: what is known already, in the order of the list.
    let (_, first) = stream.next_event(WAIT).await.unwrap();
    assert_eq!(
        first,
        json!({ "status": "result", "moveUrl": format!("/test.do?id={done}"), "id": &done })
    );
    let (_, second) = stream.next_event(WAIT).await.unwrap();
    assert_eq!(second, json!({ "status": "unknown", "id": &unknown }));

    assert_eq!(app.metric("handoff_open_streams").await, 1.0, "one stream");
    assert_eq!(
        app.metric("handoff_watched_jobs").await,
        2.0,
        "its two waiting jobs"
    );

    let report = json!({ "percent": 30, "message": "Halfway there" });
    app.api_post(&format!("/api/jobs/{waiting}/progress"), Some(report))
        .await;
    let (event, progress) = stream.next_event(WAIT).await.unwrap();
    assert_eq!(event, "progress");
    assert_eq!(progress["id"], waiting.as_str());
    assert_eq!(progress["percent"], 30.0);

    app.api_post(&format!("/api/jobs/{failing}/fail"), None)
        .await;
    let (_, failed) = stream.next_event(WAIT).await.unwrap();
    assert_eq!(
        (failed["id"].as_str(), failed["status"].as_str()),
        (Some(failing.as_str()), Some("failed"))
    );
    // Still open: the last pending job's news comes on it.
    app.complete(&waiting).await;
    let (_, result) = loop {
        let (event, data) = stream.next_event(WAIT).await.unwrap();
        if event == "result" {
            break (event, data);
        }
    };
    assert_eq!(
        (result["id"].as_str(), result["status"].as_str()),
        (Some(waiting.as_str()), Some("result"))
    );
    assert_eq!(stream.next_block(WAIT).await, None, "every job has ended");
    assert!(
        crate::support::eventually(WAIT, || async {
            app.metric("handoff_watched_jobs").await == 0.0
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_watch_list_gets_400_naming_the_problem() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let many: Vec<String> = (0..33)
        .map(|_| handoff::domain::JobId::generate().to_string())
        .collect();
    for (query, why) in [
        ("".to_owned(), "empty"),
        ("ids=".to_owned(), "empty"),
        (format!("ids={}", many.join(",")), "at most 32"),
        (format!("ids={id},{id}"), "twice"),
        (format!("ids={id},not-an-id"), "malformed"),
    ] {
        let answer = app.get(&format!("/sse/watch?{query}")).await;
        assert_eq!(answer.status(), 400, "{query}");
        let body: Value = answer.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(error.contains(why), "{query}: {error}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shared_stream_counts_as_one_stream_for_the_per_client_cap() {
    let app = TestApp::spawn_with(|c| c.max_streams_per_client = Some(1)).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(app.job_id().await);
        }
        ids
    };
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut shared = watch(&app, &refs).await;
    assert_eq!(shared.response_status, 200);
    assert_eq!(
        shared.next_block(WAIT).await,
        Some(Sse::default().retry(1000))
    );
    let second = watch(&app, &refs[..1]).await;
    assert_eq!(
        second.response_status, 429,
        "the client's one place is taken"
    );
}
