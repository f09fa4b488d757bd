//! `POST /api/jobs/batch` against the real server: each operation answered as its single call
//! would be, in order; a bad batch refused whole; endings durable across a SIGKILL right after
//! the answer, delivered to every stream, and reported by webhooks like single completions.

use serde_json::{Value, json};

use crate::support::{Handoff, Instance, TOKEN, TestApp, WAIT};
use crate::webhooks::{Receiver, app_reporting_to};

/// A job id no job has.
const UNKNOWN: &str = "AAAAAAAAAAAAAAAAAAAAAA";

/// Posts `body` (as it is) to the batch endpoint; the status and the JSON answer.
async fn post_batch(handoff: &Handoff, body: String) -> (u16, Value) {
    let answer = handoff
        .client
        .post(handoff.url("/api/jobs/batch"))
        .bearer_auth(TOKEN)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("batch request");
    let status = answer.status().as_u16();
    (status, answer.json().await.expect("a JSON answer"))
}

async fn batch(app: &TestApp, operations: Value) -> Vec<Value> {
    let body = json!({ "operations": operations }).to_string();
    let (status, answer) = post_batch(app, body).await;
    assert_eq!(status, 200, "{answer}");
    answer["results"].as_array().expect("results").clone()
}

/// The `error` text of a single call's answer, checking its status.
async fn single_error(app: &TestApp, path: &str, body: Value, status: u16) -> String {
    let answer = app.api_post(path, Some(body)).await;
    assert_eq!(answer.status(), status, "{path}");
    let body: Value = answer.json().await.expect("JSON");
    body["error"].as_str().expect("an error text").to_owned()
}

/// `n` new jobs' ids.
pub(crate) async fn job_ids(app: &TestApp, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(app.job_id().await);
    }
    ids
}

fn refused(result: &Value) -> (u64, &str) {
    assert!(result.get("job").is_none(), "{result}");
    (
        result["status"].as_u64().expect("a status"),
        result["error"].as_str().expect("an error text"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn each_operation_is_answered_in_order_as_its_single_call_would_be() {
    let app = TestApp::spawn().await;
    let ids = job_ids(&app, 4).await;
    let (a, b, c, d) = (&ids[0], &ids[1], &ids[2], &ids[3]);
    let results = batch(
        &app,
        json!([
            { "op": "progress", "id": a, "percent": 40, "message": "Page 3 of 7" },
            { "op": "complete", "id": a, "moveUrl": "/orders/42" },
            { "op": "progress", "id": a, "percent": 50 },
            { "op": "fail", "id": b, "message": "disk full" },
            { "op": "complete", "id": b },
            { "op": "complete", "id": UNKNOWN },
            { "op": "complete", "id": "not-an-id" },
            { "op": "complete", "id": c, "moveUrl": "https://evil.example/" },
            { "op": "complete", "id": c },
            { "op": "complete", "id": c },
            { "op": "progress", "id": d, "percent": 101 },
            { "op": "fail", "id": d, "message": "bad\u{7}bell" },
        ]),
    )
    .await;
    assert_eq!(results.len(), 12);
    let ids_back: Vec<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids_back,
        [a.as_str(), a, a, b, b, UNKNOWN, "not-an-id", c, c, c, d, d],
        "one result per operation, in order"
    );

    // Done: the job as its single call answers it.
    let progressed = &results[0];
    assert_eq!(progressed["status"], 200);
    assert_eq!(progressed["job"]["status"], "pending");
    assert_eq!(progressed["job"]["progress"]["percent"], 40.0);
    let completed = &results[1]["job"];
    assert_eq!(
        (&completed["status"], &completed["moveUrl"]),
        (&json!("complete"), &json!("/orders/42"))
    );
    assert_eq!(results[3]["job"]["status"], "failed");
    assert_eq!(results[3]["job"]["message"], "disk full");
    assert_eq!(results[8]["job"]["status"], "complete");
    assert_eq!(
        results[9]["status"], 200,
        "completing again changes nothing"
    );
    assert_eq!(results[9]["job"], results[8]["job"]);

    // Refused: the single call's status and text.
    let ended = single_error(&app, &format!("/api/jobs/{a}/progress"), json!({}), 409).await;
    assert_eq!(refused(&results[2]), (409, ended.as_str()));
    let failed = single_error(&app, &format!("/api/jobs/{b}/complete"), json!({}), 409).await;
    assert_eq!(refused(&results[4]), (409, failed.as_str()));
    let unknown = format!("/api/jobs/{UNKNOWN}/complete");
    let unknown = single_error(&app, &unknown, json!({}), 404).await;
    assert_eq!(refused(&results[5]), (404, unknown.as_str()));
    let malformed = single_error(&app, "/api/jobs/not-an-id/complete", json!({}), 400).await;
    assert_eq!(refused(&results[6]), (400, malformed.as_str()));
    let evil = json!({ "moveUrl": "https://evil.example/" });
    let evil = single_error(&app, &format!("/api/jobs/{d}/complete"), evil, 400).await;
    assert_eq!(refused(&results[7]), (400, evil.as_str()));
    let too_far = format!("/api/jobs/{d}/progress");
    let too_far = single_error(&app, &too_far, json!({ "percent": 101 }), 400).await;
    assert_eq!(refused(&results[10]), (400, too_far.as_str()));
    let bell = json!({ "message": "bad\u{7}bell" });
    let bell = single_error(&app, &format!("/api/jobs/{d}/fail"), bell, 400).await;
    assert_eq!(refused(&results[11]), (400, bell.as_str()));

    // And stored so: what the batch answered is what a read shows.
    assert_eq!(app.job(a).await["status"], "complete");
    assert_eq!(app.job(b).await["status"], "failed");
    assert_eq!(app.job(c).await["status"], "complete");
    assert_eq!(
        app.job(d).await["status"],
        "pending",
        "its refused operations did nothing"
    );
    assert_eq!(app.metric("handoff_jobs_completed_total").await, 2.0);
    assert_eq!(app.metric("handoff_jobs_failed_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_batch_is_refused_whole_saying_why_and_applies_nothing() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let complete = json!({ "op": "complete", "id": id });
    let too_many: Vec<Value> = (0..1001).map(|_| complete.clone()).collect();
    for (body, status, why) in [
        ("moveUrl=/x".to_owned(), 400, "must be JSON like"),
        (
            json!({ "operations": [] }).to_string(),
            400,
            "no operations",
        ),
        (json!({ "ops": [complete] }).to_string(), 400, "operations"),
        (
            json!({ "operations": [complete, { "op": "delete", "id": id }] }).to_string(),
            400,
            "unknown variant `delete`",
        ),
        (
            json!({ "operations": [complete, { "id": id }] }).to_string(),
            400,
            "missing field `op`",
        ),
        (
            json!({ "operations": too_many }).to_string(),
            413,
            "at most 1000 operations",
        ),
        (
            json!({ "operations": [{ "op": "fail", "id": id, "message": "x".repeat(1_100_000) }] })
                .to_string(),
            413,
            "larger than the limit of 1048576 bytes",
        ),
    ] {
        let (got, answer) = post_batch(&app, body).await;
        let text = answer["error"].as_str().unwrap_or_default();
        assert_eq!(got, status, "{answer}");
        assert!(text.contains(why), "{why:?} not in {text:?}");
    }
    assert_eq!(app.job(&id).await["status"], "pending", "nothing applied");

    let anonymous = app
        .client
        .post(app.url("/api/jobs/batch"))
        .json(&json!({ "operations": [complete] }))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert_eq!(app.job(&id).await["status"], "pending");

    // A full batch of 1000 goes through.
    let ids = job_ids(&app, 10).await;
    let full: Vec<Value> = (0..1000)
        .map(|n| json!({ "op": "complete", "id": ids[n % 10] }))
        .collect();
    let results = batch(&app, json!(full)).await;
    assert_eq!(results.len(), 1000);
    assert!(results.iter().all(|r| r["status"] == 200));
    assert_eq!(app.metric("handoff_jobs_completed_total").await, 10.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_stream_receives_its_jobs_ending_from_a_batch() {
    let app = TestApp::spawn().await;
    let ids = job_ids(&app, 6).await;
    let mut own = Vec::new();
    for id in &ids {
        own.push(app.connected_stream(id).await);
    }
    let shared = format!("/sse/watch?ids={}", ids.join(","));
    let mut shared = app.stream_at(&shared).await;
    shared.expect_connect().await;
    let operations: Vec<Value> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            if n % 2 == 0 {
                json!({ "op": "complete", "id": id, "moveUrl": format!("/done/{n}") })
            } else {
                json!({ "op": "fail", "id": id, "message": "no" })
            }
        })
        .collect();
    let results = batch(&app, json!(operations)).await;
    assert!(results.iter().all(|r| r["status"] == 200), "{results:?}");

    for (n, stream) in own.iter_mut().enumerate() {
        let result = stream.next_result(WAIT).await.expect("the ending");
        if n % 2 == 0 {
            assert_eq!(result["status"], "result", "{result}");
            assert_eq!(result["moveUrl"], format!("/done/{n}"));
        } else {
            assert_eq!(result["status"], "failed", "{result}");
        }
    }
    let mut told = std::collections::HashSet::new();
    while told.len() < ids.len() {
        let (event, data) = shared.next_event(WAIT).await.expect("an event");
        if let Some(job) = data["id"].as_str()
            && event == "result"
            && data["status"] != "connect"
        {
            told.insert(job.to_owned());
        }
    }
    assert_eq!(told.len(), ids.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_ending_without_moveurl_or_message_keeps_its_target_whether_or_not_others_name_one() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for n in 0..7 {
        let created = app.create_job(Some(&format!("/orders/{n}"))).await;
        ids.push(created["id"].as_str().expect("an id").to_owned());
    }
    // Nobody names a moveUrl or a message; then a batch where some do, among others that do not.
    let plain = batch(
        &app,
        json!([
            { "op": "complete", "id": ids[0] },
            { "op": "fail", "id": ids[1] },
        ]),
    )
    .await;
    let mixed = batch(
        &app,
        json!([
            { "op": "complete", "id": ids[2] },
            { "op": "complete", "id": ids[3], "moveUrl": "/elsewhere" },
            { "op": "fail", "id": ids[4], "message": "disk full" },
            { "op": "fail", "id": ids[5] },
            { "op": "fail", "id": ids[6], "moveUrl": "/retry", "message": "try again" },
        ]),
    )
    .await;
    let expected = [
        ("complete", "/orders/0", None),
        ("failed", "/orders/1", None),
        ("complete", "/orders/2", None),
        ("complete", "/elsewhere", None),
        ("failed", "/orders/4", Some("disk full")),
        ("failed", "/orders/5", None),
        ("failed", "/retry", Some("try again")),
    ];
    assert_eq!(plain.len() + mixed.len(), expected.len());
    let answered = plain
        .iter()
        .chain(&mixed)
        .map(|result| result["job"].clone());
    for ((id, answered), (status, target, message)) in ids.iter().zip(answered).zip(expected) {
        let stored = app.job(id).await;
        for job in [&answered, &stored] {
            assert_eq!(job["status"], status, "{job}");
            assert_eq!(job["moveUrl"], target, "{job}");
            assert_eq!(job["message"].as_str(), message, "{job}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_endings_acknowledged_right_before_sigkill_are_there_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let mut instance = Instance::start(dir.path(), &[]);
        let mut ids = Vec::new();
        for _ in 0..100 {
            ids.push(instance.job_id().await);
        }
        let operations: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| {
                let op = if n % 10 == 9 { "fail" } else { "complete" };
                json!({ "op": op, "id": id })
            })
            .collect();
        let body = json!({ "operations": operations }).to_string();
        let (status, answer) = post_batch(&instance, body).await;
        assert_eq!(status, 200, "{answer}");
        // No grace: the process dies right after the answer.
        instance.kill();
        let mut restarted = Instance::start(dir.path(), &[]);
        for (n, id) in ids.iter().enumerate() {
            let want = if n % 10 == 9 { "failed" } else { "complete" };
            assert_eq!(
                restarted.job(id).await["status"],
                want,
                "round {round}: lost the ending of {id}"
            );
        }
        restarted.kill();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_yields_one_webhook_per_ended_job_as_single_calls_do() {
    let receiver = Receiver::start(&[]).await;
    let app = app_reporting_to(&receiver, 2).await;
    let (watched, unwatched, failing) =
        (app.job_id().await, app.job_id().await, app.job_id().await);
    let mut tab = app.connected_stream(&watched).await;
    let results = batch(
        &app,
        json!([
            { "op": "complete", "id": watched },
            { "op": "complete", "id": unwatched },
            { "op": "fail", "id": failing, "message": "disk full" },
            { "op": "complete", "id": watched },
        ]),
    )
    .await;
    assert!(results.iter().all(|r| r["status"] == 200), "{results:?}");
    assert_eq!(tab.next_result(WAIT).await.unwrap()["status"], "result");

    let bodies = receiver
        .accepted_bodies(3, std::time::Duration::from_secs(8))
        .await;
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(
        receiver.all().len(),
        3,
        "one webhook per job: {:?}",
        receiver.all()
    );
    let of = |id: &str| {
        bodies
            .iter()
            .find(|b| b["jobId"] == id)
            .unwrap_or_else(|| panic!("no webhook for {id}: {bodies:?}"))
            .clone()
    };
    let hook = of(&watched);
    assert_eq!(
        (&hook["type"], &hook["streams"]),
        (&json!("delivered"), &json!(1)),
        "{hook}"
    );
    let hook = of(&unwatched);
    assert_eq!(
        (&hook["type"], &hook["status"]),
        (&json!("unclaimed"), &json!("complete"))
    );
    let hook = of(&failing);
    assert_eq!(
        (&hook["type"], &hook["status"]),
        (&json!("unclaimed"), &json!("failed"))
    );
}
