//! [`Handoff`]: the one client the tests talk to a Handoff through, wherever it runs (in this
//! process, as a process of its own, behind nginx): its API as a job runner calls it, its pages
//! and `/metrics`, its event streams read with [`SseReader`] or over a raw socket.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::sse::{EventSource, SseReader};
use super::{TOKEN, WAIT, eventually};

/// A Handoff at `base` (`http://127.0.0.1:PORT`, no trailing slash) and the HTTP client that
/// reaches it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Handoff {
    pub base: String,
    /// Follows no redirect, keeps no idle connection (a test that restarts or kills a server
    /// must not reuse a connection to the old one).
    pub client: reqwest::Client,
}

impl Handoff {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            client: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The port in [`base`](Self::base).
    pub fn port(&self) -> u16 {
        self.base
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .unwrap_or_else(|| panic!("no port in {}", self.base))
    }

    /// `GET path`, as an anonymous browser sends it.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        let url = self.url(path);
        self.client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }

    /// `POST path` on the API with the token and, when given, `body` as JSON; the answer as it
    /// comes.
    pub async fn api_post(&self, path: &str, body: Option<Value>) -> reqwest::Response {
        let request = self.client.post(self.url(path)).bearer_auth(TOKEN);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path} on {}: {e}", self.base))
    }

    /// `POST /api/jobs` with `{"moveUrl": move_url}` when given; the answer, whatever its status.
    pub async fn post_job(&self, move_url: Option<&str>) -> reqwest::Response {
        self.api_post("/api/jobs", move_url_body(move_url)).await
    }

    /// Creates a job through the API; returns its JSON.
    pub async fn create_job(&self, move_url: Option<&str>) -> Value {
        let created = self.post_job(move_url).await;
        assert_eq!(created.status(), 201, "creating a job on {}", self.base);
        created.json().await.expect("job JSON")
    }

    /// Creates a job through the API; returns its id.
    pub async fn job_id(&self) -> String {
        id_of(&self.create_job(None).await)
    }

    /// Creates a job through the API that expires `secs` after its creation; returns its id.
    pub async fn job_with_deadline(&self, secs: u64) -> String {
        let created = self
            .api_post(
                "/api/jobs",
                Some(serde_json::json!({ "deadlineSecs": secs })),
            )
            .await;
        assert_eq!(created.status(), 201, "creating a job with a deadline");
        id_of(&created.json().await.expect("job JSON"))
    }

    /// Completes job `id` through the API, with no body.
    pub async fn complete(&self, id: &str) -> reqwest::Response {
        self.api_post(&format!("/api/jobs/{id}/complete"), None)
            .await
    }

    /// Completes job `id` through the API, with `{"moveUrl": move_url}`.
    pub async fn complete_with(&self, id: &str, move_url: &str) -> reqwest::Response {
        let body = move_url_body(Some(move_url));
        self.api_post(&format!("/api/jobs/{id}/complete"), body)
            .await
    }

    pub async fn get_job(&self, id: &str) -> reqwest::Response {
        self.get(&format!("/api/jobs/{id}")).await
    }

    /// Job `id` as the API shows it.
    pub async fn job(&self, id: &str) -> Value {
        self.get_job(id).await.json().await.expect("job JSON")
    }

    /// Page B of job `id`, as HTML.
    pub async fn page_b(&self, id: &str) -> String {
        let page = self.get(&format!("/test.do?id={id}")).await;
        assert_eq!(page.status(), 200, "page B of {id}");
        page.text().await.expect("page B's HTML")
    }

    /// `/healthz`: its status and body.
    pub async fn health(&self) -> (u16, String) {
        let answer = self.get("/healthz").await;
        let status = answer.status().as_u16();
        (status, answer.text().await.expect("healthz body"))
    }

    /// Waits until `/healthz` says `ok` (the database answers and, with Redis, the subscriber
    /// is subscribed).
    pub async fn wait_healthy(&self) {
        let healthy = eventually(Duration::from_secs(10), || async {
            self.health().await.0 == 200
        });
        assert!(
            healthy.await,
            "{} never became healthy: {:?}",
            self.base,
            self.health().await
        );
    }

    /// A client logged in on the admin page with the API token, as a browser would be.
    pub async fn admin_session(&self) -> reqwest::Client {
        let admin = cookie_client();
        let login = post_form(&admin, self.url("/admin/login"), &[("token", TOKEN)]).await;
        assert_eq!(login.status(), 303, "logging in on the admin page");
        admin
    }

    /// A metric's current value from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let (value, text) = self.metric_and_text(name).await;
        value.unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }

    /// A metric's current value, `None` while it is not in `/metrics` (a labelled one appears
    /// once its label is first counted).
    pub async fn metric_if_shown(&self, name: &str) -> Option<f64> {
        self.metric_and_text(name).await.0
    }

    async fn metric_and_text(&self, name: &str) -> (Option<f64>, String) {
        let text = self
            .get("/metrics")
            .await
            .text()
            .await
            .expect("metrics text");
        let value = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok());
        (value, text)
    }

    /// Whether metric `name` reaches `value` within `within` (polled every 20 ms).
    pub async fn metric_reaches(&self, name: &str, value: f64, within: Duration) -> bool {
        eventually(within, || async { self.metric(name).await == value }).await
    }

    /// The stream at `path` (e.g. `/sse/watch?ids=…`), as answered.
    pub async fn stream_at(&self, path: &str) -> SseReader {
        SseReader::open(&self.client, &self.url(path)).await
    }

    /// The stream of job `id`, as answered.
    pub async fn stream(&self, id: &str) -> SseReader {
        self.stream_at(&format!("/sse/connect/{id}")).await
    }

    /// A stream on `id` that has been answered `200` and has sent its connect event.
    pub async fn connected_stream(&self, id: &str) -> SseReader {
        let mut stream = self.stream(id).await;
        stream.expect_connect().await;
        stream
    }

    /// A browser's `EventSource` on job `id`, not yet connected.
    pub fn event_source(&self, id: &str) -> EventSource {
        EventSource::new(&self.client, &self.url(&format!("/sse/connect/{id}")))
    }

    /// Sends `GET /sse/connect/{id}` over a raw socket and returns the socket unread: a client
    /// no HTTP library would be, one that never reads, or closes or resets at will.
    pub async fn raw_stream(&self, id: &str, connection: HttpConnection) -> TcpStream {
        let addr = self.base.trim_start_matches("http://");
        let socket = TcpStream::connect(addr).await.expect("connect");
        request_stream(socket, &format!("/sse/connect/{id}"), connection).await
    }

    /// Sends `GET path` (an event stream) and returns the socket unread: a client that stopped
    /// reading. Its receive buffer is as small as the kernel allows, and its segments as large
    /// as over Ethernet (1460 bytes), not loopback's 64 KiB: the server's kernel sizes the send
    /// buffer by segments, and would otherwise take megabytes before the socket is full.
    pub async fn unread_stream_at(&self, path: &str) -> TcpStream {
        let addr: std::net::SocketAddr = self
            .base
            .trim_start_matches("http://")
            .parse()
            .expect("an address");
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("a socket");
        socket.set_recv_buffer_size(1).expect("SO_RCVBUF");
        socket.set_tcp_mss(1460).expect("TCP_MAXSEG");
        socket.set_nonblocking(true).expect("non-blocking");
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into())
            .connect(addr)
            .await
            .expect("connect");
        request_stream(socket, path, HttpConnection::KeepAlive).await
    }

    /// [`raw_stream`](Self::raw_stream), read until its connect event arrived after a `200`.
    pub async fn raw_connected_stream(&self, id: &str, connection: HttpConnection) -> TcpStream {
        let mut socket = self.raw_stream(id, connection).await;
        let seen = read_until(&mut socket, r#""status":"connect""#).await;
        assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
        socket
    }
}

/// Sends `GET path` for an event stream on `socket`; the socket, unread.
async fn request_stream(
    mut socket: TcpStream,
    path: &str,
    connection: HttpConnection,
) -> TcpStream {
    let close = match connection {
        HttpConnection::KeepAlive => "",
        HttpConnection::Close => "Connection: close\r\n",
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: handoff.test\r\nAccept: text/event-stream\r\n{close}\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    socket
}

fn move_url_body(move_url: Option<&str>) -> Option<Value> {
    move_url.map(|url| serde_json::json!({ "moveUrl": url }))
}

fn id_of(job: &Value) -> String {
    job["id"].as_str().expect("an id").to_owned()
}

/// Whether a raw request lets the server keep its connection after the answer.
#[derive(Debug, Clone, Copy)]
pub enum HttpConnection {
    /// No `Connection` header: HTTP/1.1 keeps the connection for a next request, as a browser does.
    KeepAlive,
    /// `Connection: close`: the server closes the connection once the stream ends, so a reader
    /// can read to its end.
    Close,
}

/// Reads `socket` until what arrived contains `marker`; returns all of it. Panics when the
/// socket closes first, or nothing arrives for [`WAIT`].
pub async fn read_until(socket: &mut TcpStream, marker: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no {marker:?} within {WAIT:?}"))
            .expect("read");
        assert!(
            n > 0,
            "closed before {marker:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Reads `socket` until the server closes it; returns how long that took and what was read.
/// Panics if it is still open after `limit`.
pub async fn read_until_closed(socket: &mut TcpStream, limit: Duration) -> (Duration, String) {
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, socket.read(&mut buf)).await {
            Err(_) => panic!(
                "still open after {limit:?}; read: {}",
                String::from_utf8_lossy(&seen)
            ),
            Ok(Ok(0) | Err(_)) => {
                return (started.elapsed(), String::from_utf8_lossy(&seen).into());
            }
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// reqwest's builder, for every client of the tests. The server's reqwest brings rustls without a
/// crypto provider of its own (Cargo.toml), so ring is made the provider first, as the server does.
pub fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// The client [`Handoff`] uses, for requests a test shapes itself.
pub fn client() -> reqwest::Client {
    client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// A client that keeps cookies, as a browser does (for the admin session), and follows no redirect.
pub fn cookie_client() -> reqwest::Client {
    client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .build()
        .expect("client")
}

/// POSTs a form (a real urlencoded body, as a browser sends it).
pub async fn post_form(
    client: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    form: &[(&str, &str)],
) -> reqwest::Response {
    client.post(url).form(form).send().await.expect("form POST")
}

/// GETs a page's HTML.
pub async fn page_text(client: &reqwest::Client, url: impl reqwest::IntoUrl) -> String {
    client
        .get(url)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("page text")
}
