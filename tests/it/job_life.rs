//! A job's life beyond completion: progress reports, failure, deadlines, and the answers that
//! refuse what an end state does not allow.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{TestApp, WAIT, result_of};

async fn progress(app: &TestApp, id: &str, body: Value) -> reqwest::Response {
    app.api_post(&format!("/api/jobs/{id}/progress"), Some(body))
        .await
}

async fn fail(app: &TestApp, id: &str, body: Option<Value>) -> reqwest::Response {
    app.api_post(&format!("/api/jobs/{id}/fail"), body).await
}

async fn error_of(response: reqwest::Response) -> String {
    let body: Value = response.json().await.expect("a JSON error");
    body["error"].as_str().expect("an error text").to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn progress_reports_reach_a_stream_in_order_and_a_late_tab_sees_the_latest_at_connect() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let mut early = app.connected_stream(&id).await;
    for (percent, message) in [
        (10, "Starting"),
        (40, "Rendering page 3 of 7"),
        (70, "Almost"),
    ] {
        let answer = progress(&app, &id, json!({ "percent": percent, "message": message })).await;
        assert_eq!(answer.status(), 200);
        let job: Value = answer.json().await.unwrap();
        assert_eq!(job["status"], "pending");
        assert_eq!(job["progress"]["percent"], percent as f64);
        let (event, data) = early.next_event(WAIT).await.expect("a progress event");
        assert_eq!(event, "progress");
        assert_eq!(
            data,
            json!({ "status": "progress", "percent": percent as f64, "message": message, "id": id })
        );
    }

    let mut late = app.connected_stream(&id).await;
    let (event, data) = late.next_event(WAIT).await.expect("the latest report");
    assert_eq!(
        (event.as_str(), &data["percent"]),
        ("progress", &json!(70.0))
    );

    // A lower percent is allowed (jobs have phases), and a report may have no percent.
    assert_eq!(
        progress(&app, &id, json!({ "percent": 5 })).await.status(),
        200
    );
    assert_eq!(early.next_event(WAIT).await.unwrap().1["percent"], 5.0);
    assert_eq!(
        progress(&app, &id, json!({ "message": "Phase 2" }))
            .await
            .status(),
        200
    );
    let (_, data) = early.next_event(WAIT).await.unwrap();
    assert_eq!(
        data,
        json!({ "status": "progress", "percent": null, "message": "Phase 2", "id": id })
    );

    app.complete(&id).await;
    for stream in [&mut early, &mut late] {
        let (event, data) = loop {
            let (event, data) = stream.next_event(WAIT).await.expect("the result");
            if event != "progress" {
                break (event, data);
            }
        };
        assert_eq!(
            (event.as_str(), &data["status"]),
            ("result", &json!("result"))
        );
        assert_eq!(stream.next_block(WAIT).await, None, "the stream ends");
    }
    assert_eq!(app.metric("handoff_progress_reports_total").await, 5.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_latest_progress_is_stored_and_shown_by_the_api_and_to_a_stream_opened_later() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    assert_eq!(app.job(&id).await["progress"], Value::Null);
    progress(&app, &id, json!({ "percent": 40, "message": "Rendering" })).await;
    // Stored within a quarter of a second; give it a few.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let job = app.job(&id).await;
    assert_eq!(job["progress"]["percent"], 40.0, "{job}");
    assert_eq!(job["progress"]["message"], "Rendering", "{job}");
    assert!(job["progress"]["at"].is_string(), "{job}");
    assert!(job["deadline"].is_string(), "{job}");
    // No stream has the report in this instance's hub any more: it comes from the store.
    let mut stream = app.connected_stream(&id).await;
    let (event, data) = stream.next_event(WAIT).await.unwrap();
    assert_eq!(
        (event.as_str(), &data["message"]),
        ("progress", &json!("Rendering"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_job_tells_its_stream_and_page_b_shows_the_message_escaped() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let mut stream = app.connected_stream(&id).await;
    let why = "Disk <full> & \"stuck\"";
    let answer = fail(&app, &id, Some(json!({ "message": why }))).await;
    assert_eq!(answer.status(), 200);
    let job: Value = answer.json().await.unwrap();
    assert_eq!(
        (job["status"].as_str(), job["message"].as_str()),
        (Some("failed"), Some(why))
    );
    let (event, data) = stream.next_event(WAIT).await.unwrap();
    assert_eq!(event, "result");
    assert_eq!(
        data,
        json!({
            "status": "failed", "moveUrl": format!("/test.do?id={id}"), "message": why, "id": id
        })
    );
    assert_eq!(stream.next_block(WAIT).await, None);

    let page = app.page_b(&id).await;
    assert!(page.contains("The job failed"), "{page}");
    assert!(
        page.contains("Disk &#60;full&#62; &#38; &#34;stuck&#34;"),
        "{page}"
    );
    assert!(!page.contains("<full>"), "{page}");

    // Connect-and-send covers a failed job too.
    let mut later = app.connected_stream(&id).await;
    assert_eq!(later.next_event(WAIT).await.unwrap().1["status"], "failed");
    assert_eq!(app.metric("handoff_jobs_failed_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_pending_at_its_deadline_expires_within_a_second_and_its_stream_is_told() {
    let app = TestApp::spawn().await;
    let id = app.job_with_deadline(2).await;
    let started = Instant::now();
    let mut stream = app.connected_stream(&id).await;
    let (event, data) = stream.next_event(Duration::from_secs(6)).await.unwrap();
    let took = started.elapsed();
    assert_eq!(event, "result");
    assert_eq!(
        data,
        json!({ "status": "expired", "moveUrl": format!("/test.do?id={id}"), "id": id })
    );
    assert!(
        took < Duration::from_secs(3) + Duration::from_millis(500),
        "expired {took:?} after creation, for a 2 s deadline"
    );
    assert_eq!(app.job(&id).await["status"], "expired");
    let page = app.page_b(&id).await;
    assert!(page.contains("The job expired"), "{page}");
    assert_eq!(app.metric("handoff_jobs_expired_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_state_conflict_answers_409_saying_which_state() {
    let app = TestApp::spawn().await;
    let complete = app.job_id().await;
    app.complete(&complete).await;
    let failed = app.job_id().await;
    assert_eq!(fail(&app, &failed, None).await.status(), 200);
    assert_eq!(
        fail(&app, &failed, None).await.status(),
        200,
        "failing again is fine"
    );

    let conflicts = [
        (fail(&app, &complete, None).await, "complete"),
        (
            progress(&app, &complete, json!({ "percent": 1 })).await,
            "complete",
        ),
        (app.complete(&failed).await, "failed"),
        (
            progress(&app, &failed, json!({ "percent": 1 })).await,
            "failed",
        ),
    ];
    for (answer, state) in conflicts {
        assert_eq!(answer.status(), 409);
        let error = error_of(answer).await;
        assert!(error.contains(state), "{error}");
    }
    assert_eq!(app.job(&complete).await["status"], "complete");
    assert_eq!(app.job(&failed).await["status"], "failed");
}

#[tokio::test(flavor = "multi_thread")]
async fn completing_an_expired_job_answers_409() {
    let app = TestApp::spawn().await;
    let id = app.job_with_deadline(1).await;
    assert!(
        crate::support::eventually(Duration::from_secs(5), || async {
            app.job(&id).await["status"] == "expired"
        })
        .await
    );
    let answer = app.complete(&id).await;
    assert_eq!(answer.status(), 409);
    assert!(error_of(answer).await.contains("expired"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_progress_fail_and_deadline_bodies_answer_400_saying_why() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let long = "x".repeat(201);
    for (body, why) in [
        (json!({ "percent": 101 }), "percent"),
        (json!({ "percent": -1 }), "percent"),
        (json!({ "percent": "40" }), "percent"),
        (json!({ "message": long }), "200"),
        (json!({ "message": "a\u{7}b" }), "control"),
        (json!({ "message": "line\nbreak" }), "control"),
    ] {
        let answer = progress(&app, &id, body.clone()).await;
        assert_eq!(answer.status(), 400, "{body}");
        let error = error_of(answer).await;
        assert!(error.contains(why), "{body}: {error}");
    }
    let answer = fail(
        &app,
        &id,
        Some(json!({ "moveUrl": "https://evil.example" })),
    )
    .await;
    assert_eq!(answer.status(), 400);
    for deadline in [0, 10_000_000_000u64] {
        let answer = app
            .api_post("/api/jobs", Some(json!({ "deadlineSecs": deadline })))
            .await;
        assert_eq!(answer.status(), 400, "deadline {deadline}");
        assert!(error_of(answer).await.contains("deadlineSecs"));
    }
    assert_eq!(app.job(&id).await["status"], "pending", "nothing changed");
    assert_eq!(app.job(&id).await["progress"], Value::Null);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_listens_only_for_result_events_still_moves_on_completion() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let mut stream = app.connected_stream(&id).await;
    progress(&app, &id, json!({ "percent": 50 })).await;
    app.complete(&id).await;
    // What the Spring client does: it handles `event: result` and acts on status "result".
    let mut results = Vec::new();
    while let Some(block) = stream.next_block(WAIT).await {
        if let Some(data) = result_of(&block) {
            results.push(data);
        }
    }
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["status"], "result");
    assert_eq!(results[0]["moveUrl"], format!("/test.do?id={id}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_job_reports_progress_by_itself_and_completes() {
    let app = TestApp::spawn().await;
    let created = app.client.post(app.url("/jobs")).send().await.unwrap();
    assert_eq!(created.status(), 303);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let id = location.trim_start_matches("/jobs/").to_owned();
    let mut stream = app.connected_stream(&id).await;
    let mut percents = Vec::new();
    let ending = loop {
        let (event, data) = stream.next_event(Duration::from_secs(15)).await.unwrap();
        if event == "progress" {
            percents.push(data["percent"].as_f64().unwrap());
        } else {
            break data;
        }
    };
    assert_eq!(ending["status"], "result");
    assert!(percents.len() >= 3, "{percents:?}");
    assert!(percents.windows(2).all(|w| w[0] < w[1]), "{percents:?}");
}
