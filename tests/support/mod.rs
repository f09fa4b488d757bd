//! Test support: the real app on a real port against a fresh database, and a raw SSE reader.
#![allow(dead_code)] // each test binary uses its own part of this module

use std::time::Duration;

use handoff::config::Config;
use handoff::startup::Application;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token-0123456789";

/// A running Handoff on 127.0.0.1:<port 0>, with its own SQLite file (or PostgreSQL database).
pub struct TestApp {
    pub base: String,
    pub port: u16,
    pub database_url: String,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: Option<tempfile::TempDir>,
}

/// Settings a test may change before the app starts.
pub fn test_config(database_url: &str) -> Config {
    let mut config = Config::from_lookup(|_| None).expect("defaults are valid");
    config.addr = "127.0.0.1:0".parse().expect("valid address");
    config.database_url = database_url.to_owned();
    config.api_token = Some(TOKEN.to_owned());
    config.workers = Some(2);
    config
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Spawns with a fresh database, letting `tweak` change the config first.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/handoff.db", dir.path().display());
        let mut app = Self::spawn_on(&url, tweak).await;
        app._dir = Some(dir);
        app
    }

    /// Spawns on an existing database (for restart tests).
    pub async fn spawn_on(database_url: &str, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(database_url);
        tweak(&mut config);
        let app = Application::build(config).await.expect("the app builds");
        let port = app.port();
        let shutdown = app.shutdown_token();
        let server = tokio::spawn(app.run_until_stopped());
        Self {
            base: format!("http://127.0.0.1:{port}"),
            port,
            database_url: database_url.to_owned(),
            client: client(),
            shutdown,
            server: Some(server),
            _dir: None,
        }
    }

    /// Stops the app (streams end, server stops) and waits for it; keeps the database.
    pub async fn stop(&mut self) -> Option<tempfile::TempDir> {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        }
        self._dir.take()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Creates a job through the API; returns its JSON.
    pub async fn create_job(&self, move_url: Option<&str>) -> Value {
        let mut req = self.client.post(self.url("/api/jobs")).bearer_auth(TOKEN);
        if let Some(url) = move_url {
            req = req.json(&serde_json::json!({ "moveUrl": url }));
        }
        let resp = req.send().await.expect("create request");
        assert_eq!(resp.status(), 201, "creating a job");
        resp.json().await.expect("job JSON")
    }

    pub async fn job_id(&self) -> String {
        self.create_job(None).await["id"].as_str().expect("id").to_owned()
    }

    pub async fn complete(&self, id: &str) -> reqwest::Response {
        self.client
            .post(self.url(&format!("/api/jobs/{id}/complete")))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("complete request")
    }

    pub async fn get_job(&self, id: &str) -> reqwest::Response {
        self.client.get(self.url(&format!("/api/jobs/{id}"))).send().await.expect("get job")
    }

    pub async fn stream(&self, id: &str) -> SseReader {
        SseReader::open(&self.client, &self.url(&format!("/sse/connect/{id}"))).await
    }

    /// A metric's current value from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        metric(&self.client, &self.base, name).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

pub async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
}

/// Polls `cond` every 20 ms for up to `within`; true once it holds.
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One block of an event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseBlock {
    Retry(u64),
    Comment(String),
    Event { event: String, data: String },
}

impl SseBlock {
    /// The parsed `data` of a `result` event.
    pub fn result(&self) -> Option<Value> {
        match self {
            SseBlock::Event { event, data } if event == "result" => serde_json::from_str(data).ok(),
            _ => None,
        }
    }
}

/// Reads a raw `text/event-stream` response block by block.
pub struct SseReader {
    pub response_status: u16,
    pub headers: reqwest::header::HeaderMap,
    response: Option<reqwest::Response>,
    buf: String,
}

impl SseReader {
    pub async fn open(client: &reqwest::Client, url: &str) -> Self {
        let response = client
            .get(url)
            .header("Accept", "text/event-stream")
            .send()
            .await
            .expect("stream request");
        Self {
            response_status: response.status().as_u16(),
            headers: response.headers().clone(),
            response: Some(response),
            buf: String::new(),
        }
    }

    /// The next block, `None` when the stream ended, panics after `within`.
    pub async fn next_block(&mut self, within: Duration) -> Option<SseBlock> {
        tokio::time::timeout(within, self.next_block_inner())
            .await
            .unwrap_or_else(|_| panic!("no SSE block within {within:?}; buffered: {:?}", self.buf))
    }

    async fn next_block_inner(&mut self) -> Option<SseBlock> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                return Some(parse_block(block.trim_end_matches('\n')));
            }
            let chunk = self.response.as_mut()?.chunk().await.ok().flatten();
            match chunk {
                Some(bytes) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                None => {
                    self.response = None;
                    return None;
                }
            }
        }
    }

    /// The next `result` event's data, skipping comments.
    pub async fn next_result(&mut self, within: Duration) -> Option<Value> {
        loop {
            match self.next_block(within).await? {
                SseBlock::Comment(_) | SseBlock::Retry(_) => continue,
                block => return Some(block.result().unwrap_or_else(|| panic!("not a result event: {block:?}"))),
            }
        }
    }

    /// Reads the connect event, then the result event, then the end of the stream.
    pub async fn expect_connect_result_end(&mut self, within: Duration) -> Value {
        let connect = self.next_result(within).await.expect("a connect event");
        assert_eq!(connect["status"], "connect", "{connect}");
        assert_eq!(connect["moveUrl"], "", "{connect}");
        let result = self.next_result(within).await.expect("a result event");
        assert_eq!(result["status"], "result", "{result}");
        assert_eq!(self.next_block(within).await, None, "the stream ends after the result");
        result
    }
}

fn parse_block(block: &str) -> SseBlock {
    let mut event = String::from("message");
    let mut data: Vec<&str> = Vec::new();
    for line in block.lines() {
        if let Some(comment) = line.strip_prefix(':') {
            return SseBlock::Comment(comment.trim().to_owned());
        } else if let Some(retry) = line.strip_prefix("retry:") {
            return SseBlock::Retry(retry.trim().parse().expect("numeric retry"));
        } else if let Some(name) = line.strip_prefix("event:") {
            event = name.trim().to_owned();
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push(d.strip_prefix(' ').unwrap_or(d));
        }
    }
    SseBlock::Event { event, data: data.join("\n") }
}
