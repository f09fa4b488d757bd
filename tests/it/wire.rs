//! The streams' exact bytes, from a real server: what the Spring client, stock `EventSource`s and
//! checks from outside read. A test failing here is a change of the wire protocol, not a detail.

use std::time::Duration;

use serde_json::json;

use crate::support::{TestApp, WAIT, client};

const KEEP_ALIVE: &str = ": keep-alive\n\n";

/// A stream's body as text, read from the socket as it arrives.
struct Body {
    response: reqwest::Response,
    seen: String,
}

impl Body {
    /// Opens `path` and checks the answer is an event stream no proxy buffers.
    async fn open(app: &TestApp, path: &str) -> Self {
        let response = client()
            .get(app.url(path))
            .header("Accept", "text/event-stream")
            .send()
            .await
            .expect("stream request");
        assert_eq!(response.status(), 200);
        for (name, value) in [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
            ("x-accel-buffering", "no"),
        ] {
            assert_eq!(response.headers()[name], value, "{name}");
        }
        Self {
            response,
            seen: String::new(),
        }
    }

    /// Reads until what arrived contains `marker`.
    async fn until(&mut self, marker: &str) {
        while !self.seen.contains(marker) {
            let chunk = tokio::time::timeout(WAIT, self.response.chunk())
                .await
                .unwrap_or_else(|_| panic!("no {marker:?} within {WAIT:?}: {:?}", self.seen))
                .expect("read")
                .unwrap_or_else(|| panic!("ended before {marker:?}: {:?}", self.seen));
            self.seen
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
        }
    }

    /// Reads to the end of the stream, which must come within [`WAIT`]; without its keep-alive
    /// comments, which may come between any two events (the stream's timer also fires when a
    /// progress report held back may go), and whose bytes are pinned on an idle stream.
    async fn read_events_to_end(self) -> String {
        self.read_to_end().await.replace(KEEP_ALIVE, "")
    }

    /// Reads to the end of the stream, which must come within [`WAIT`].
    async fn read_to_end(mut self) -> String {
        let rest = tokio::time::timeout(WAIT, self.response.text())
            .await
            .unwrap_or_else(|_| panic!("the stream did not end: {:?}", self.seen))
            .expect("read");
        self.seen.push_str(&rest);
        self.seen
    }
}

async fn post(app: &TestApp, path: String, body: serde_json::Value) {
    assert_eq!(
        app.api_post(&path, Some(body)).await.status(),
        200,
        "{path}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_stream_writes_retry_connect_progress_and_the_ending_byte_for_byte_then_ends() {
    let app = TestApp::spawn().await;
    let id = app.create_job(Some("/receipt?order=7")).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let mut body = Body::open(&app, &format!("/sse/connect/{id}")).await;
    body.until(r#""status":"connect""#).await;
    let report = json!({ "percent": 42.5, "message": "half \"way\"" });
    post(&app, format!("/api/jobs/{id}/progress"), report).await;
    body.until(r#""status":"progress""#).await;
    assert_eq!(app.complete(&id).await.status(), 200);
    assert_eq!(
        body.read_events_to_end().await,
        format!(
            "retry: 1000\n\n\
             event: result\ndata: {{\"status\":\"connect\",\"moveUrl\":\"\",\"id\":\"{id}\"}}\n\n\
             event: progress\ndata: {{\"status\":\"progress\",\"percent\":42.5,\"message\":\"half \\\"way\\\"\",\"id\":\"{id}\"}}\n\n\
             event: result\ndata: {{\"status\":\"result\",\"moveUrl\":\"/receipt?order=7\",\"id\":\"{id}\"}}\n\n"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connect_to_a_failed_job_writes_connect_and_the_failure_byte_for_byte_then_ends() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    post(
        &app,
        format!("/api/jobs/{id}/fail"),
        json!({ "message": "no <paper>" }),
    )
    .await;
    assert_eq!(
        Body::open(&app, &format!("/sse/connect/{id}"))
            .await
            .read_events_to_end()
            .await,
        format!(
            "retry: 1000\n\n\
             event: result\ndata: {{\"status\":\"connect\",\"moveUrl\":\"\",\"id\":\"{id}\"}}\n\n\
             event: result\ndata: {{\"status\":\"failed\",\"moveUrl\":\"/test.do?id={id}\",\"message\":\"no <paper>\",\"id\":\"{id}\"}}\n\n"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_streams_write_keep_alive_comments_and_end_cleanly_at_their_timeout() {
    let app = TestApp::spawn_with(|c| {
        c.sse_timeout = Duration::from_secs(1);
        c.keep_alive = Duration::from_millis(200);
    })
    .await;
    let id = app.job_id().await;
    let idle = |path: String, connect: String| {
        let app = &app;
        async move {
            let body = Body::open(app, &path).await.read_to_end().await;
            let start = format!("retry: 1000\n\nevent: result\ndata: {connect}\n\n");
            let keep_alives = body
                .strip_prefix(&start)
                .unwrap_or_else(|| panic!("{body:?}"));
            let count = keep_alives.len() / KEEP_ALIVE.len();
            assert!(count >= 1, "{body:?}");
            assert_eq!(keep_alives, KEEP_ALIVE.repeat(count), "{body:?}");
        }
    };
    tokio::join!(
        idle(
            format!("/sse/connect/{id}"),
            format!("{{\"status\":\"connect\",\"moveUrl\":\"\",\"id\":\"{id}\"}}"),
        ),
        idle(
            format!("/sse/watch?ids={id}"),
            format!("{{\"status\":\"connect\",\"ids\":[\"{id}\"]}}"),
        ),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_stream_writes_connect_unknown_ended_progress_and_endings_byte_for_byte_then_ends()
{
    let app = TestApp::spawn().await;
    let unknown = "AAAAAAAAAAAAAAAAAAAAAA";
    let ended = app.job_id().await;
    assert_eq!(app.complete(&ended).await.status(), 200);
    let (waiting, expiring) = (app.job_id().await, app.job_with_deadline(3).await);
    let mut body = Body::open(
        &app,
        &format!("/sse/watch?ids={unknown},{ended},{waiting},{expiring}"),
    )
    .await;
    body.until(r#""status":"result""#).await;
    let report = json!({ "percent": 7, "message": null });
    post(&app, format!("/api/jobs/{waiting}/progress"), report).await;
    body.until(r#""status":"progress""#).await;
    post(&app, format!("/api/jobs/{waiting}/fail"), json!({})).await;
    body.until(r#""status":"failed""#).await;
    assert_eq!(
        body.read_events_to_end().await,
        format!(
            "retry: 1000\n\n\
             event: result\ndata: {{\"status\":\"connect\",\"ids\":[\"{unknown}\",\"{ended}\",\"{waiting}\",\"{expiring}\"]}}\n\n\
             event: result\ndata: {{\"status\":\"unknown\",\"id\":\"{unknown}\"}}\n\n\
             event: result\ndata: {{\"status\":\"result\",\"moveUrl\":\"/test.do?id={ended}\",\"id\":\"{ended}\"}}\n\n\
             event: progress\ndata: {{\"status\":\"progress\",\"percent\":7.0,\"message\":null,\"id\":\"{waiting}\"}}\n\n\
             event: result\ndata: {{\"status\":\"failed\",\"moveUrl\":\"/test.do?id={waiting}\",\"message\":null,\"id\":\"{waiting}\"}}\n\n\
             event: result\ndata: {{\"status\":\"expired\",\"moveUrl\":\"/test.do?id={expiring}\",\"id\":\"{expiring}\"}}\n\n"
        )
    );
}
