//! Test support: the real app on a real port against a fresh database (or the `handoff` binary
//! as a process), its API as a job runner calls it, event streams read block by block or over a
//! raw socket, and an admin session.

pub mod browser;
pub mod nginx;
pub mod redis_cluster;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use handoff::config::Config;
use handoff::startup::Application;
use serde_json::Value;
use sqlx::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token-0123456789";

/// How long a test waits for what should happen at once (an event, a metric settling).
pub const WAIT: Duration = Duration::from_secs(5);

/// A running Handoff on 127.0.0.1:<port 0>, with its own SQLite file (or PostgreSQL database).
pub struct TestApp {
    pub base: String,
    pub port: u16,
    pub database_url: String,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _db: Option<FreshDb>,
}

/// Where the tests' PostgreSQL databases are created and dropped.
pub const POSTGRES_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database made for one test: a SQLite file in a temporary folder, or a PostgreSQL database
/// `handoff_t_<random>`. Dropping it removes it.
pub enum FreshDb {
    Sqlite {
        _dir: tempfile::TempDir,
        url: String,
    },
    Postgres {
        name: String,
        url: String,
    },
}

impl FreshDb {
    /// The kind `HANDOFF_TEST_DB` asks for: `sqlite` (the default) or `postgres`.
    pub async fn from_env() -> Self {
        match std::env::var("HANDOFF_TEST_DB").as_deref() {
            Err(_) | Ok("" | "sqlite") => Self::sqlite(),
            Ok("postgres") => Self::postgres().await,
            Ok(other) => panic!("HANDOFF_TEST_DB={other:?}: expected sqlite or postgres"),
        }
    }

    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/handoff.db", dir.path().display());
        Self::Sqlite { _dir: dir, url }
    }

    /// A new, empty PostgreSQL database on 127.0.0.1:5432.
    pub async fn postgres() -> Self {
        let mut admin = postgres_admin().await;
        let name = format!("handoff_t_{:016x}", rand::random::<u64>());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("creating database {name}: {e}"));
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Self::Postgres { name, url }
    }

    pub fn url(&self) -> &str {
        match self {
            Self::Sqlite { url, .. } | Self::Postgres { url, .. } => url,
        }
    }

    /// The URL of this PostgreSQL database with its server reached at `127.0.0.1:{port}`, where a
    /// proxy in front of it listens.
    pub fn postgres_url_via(&self, port: u16) -> String {
        match self {
            Self::Postgres { name, .. } => format!("postgres://postgres@127.0.0.1:{port}/{name}"),
            Self::Sqlite { .. } => panic!("a SQLite database has no server to reach"),
        }
    }
}

/// A connection to the `postgres` database, or a panic saying how to get one.
pub async fn postgres_admin() -> sqlx::PgConnection {
    sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await.unwrap_or_else(|e| {
        panic!(
            "this test needs PostgreSQL at {POSTGRES_ADMIN_URL} (trust auth for user postgres): \
             run scripts/test.sh, or start it with `pg_ctlcluster <version> main start`: {e}"
        )
    })
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        let Self::Postgres { name, .. } = self else {
            return;
        };
        // Drop runs outside async code (or on a runtime that is ending), so the DROP gets its own
        // small runtime on its own thread. FORCE ends connections an app may still hold.
        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(POSTGRES_ADMIN_URL).await?;
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut admin)
                    .await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
            })?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {name}: {dropped:?}");
        }
    }
}

/// Settings a test may change before the app starts.
pub fn test_config(database_url: &str) -> Config {
    let mut config = Config::from_lookup(|_| None).expect("defaults are valid");
    config.addr = "127.0.0.1:0".parse().expect("valid address");
    config.database_url = database_url.to_owned();
    config.api_token = Some(TOKEN.into());
    config.workers = Some(2);
    config
}

/// A tweak for [`TestApp::spawn_with`]: the app trusts 127.0.0.1 as its proxy, so a test names
/// the client address of each request with `X-Forwarded-For`.
pub fn behind_local_proxy(c: &mut Config) {
    c.trusted_proxies = handoff::limits::TrustedProxies::parse("127.0.0.1").expect("an address");
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// Spawns with a fresh database (SQLite, or PostgreSQL with `HANDOFF_TEST_DB=postgres`),
    /// letting `tweak` change the config first.
    pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let db = FreshDb::from_env().await;
        let mut app = Self::spawn_on(db.url(), tweak).await;
        app._db = Some(db);
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
            _db: None,
        }
    }

    /// Stops the app (streams end, server stops) and waits for it. The database lives as long
    /// as what this returns.
    pub async fn stop(&mut self) -> Option<FreshDb> {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
        }
        self._db.take()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Creates a job through the API; returns its JSON.
    pub async fn create_job(&self, move_url: Option<&str>) -> Value {
        create_job_at(&self.client, &self.base, move_url).await
    }

    /// Creates a job through the API; returns its id.
    pub async fn job_id(&self) -> String {
        job_id_at(&self.client, &self.base).await
    }

    /// `POST path` on the API with the token and, when given, `body` as JSON; the answer as it
    /// comes.
    pub async fn api_post(&self, path: &str, body: Option<Value>) -> reqwest::Response {
        let request = self.client.post(self.url(path)).bearer_auth(TOKEN);
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        request.send().await.expect("API request")
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
        let job: Value = created.json().await.expect("job JSON");
        job["id"].as_str().expect("an id").to_owned()
    }

    /// Page B of job `id`, as HTML.
    pub async fn page_b(&self, id: &str) -> String {
        let page = self.get(&format!("/test.do?id={id}")).await;
        assert_eq!(page.status(), 200, "page B of {id}");
        page.text().await.expect("page B's HTML")
    }

    /// Completes job `id` through the API, with no body.
    pub async fn complete(&self, id: &str) -> reqwest::Response {
        complete_at(&self.client, &self.base, id, None).await
    }

    /// Completes job `id` through the API, with `{"moveUrl": move_url}`.
    pub async fn complete_with(&self, id: &str, move_url: &str) -> reqwest::Response {
        complete_at(&self.client, &self.base, id, Some(move_url)).await
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

    pub async fn get_job(&self, id: &str) -> reqwest::Response {
        self.get(&format!("/api/jobs/{id}")).await
    }

    /// Job `id` as the API shows it.
    pub async fn job(&self, id: &str) -> Value {
        job_at(&self.client, &self.base, id).await
    }

    pub async fn stream(&self, id: &str) -> SseReader {
        SseReader::open(&self.client, &self.url(&format!("/sse/connect/{id}"))).await
    }

    /// A stream on `id` that has been answered `200` and has sent its connect event.
    pub async fn connected_stream(&self, id: &str) -> SseReader {
        SseReader::connected(&self.client, &self.url(&format!("/sse/connect/{id}"))).await
    }

    /// A client logged in on the admin page with the API token, as a browser would be.
    pub async fn admin_session(&self) -> reqwest::Client {
        let admin = cookie_client();
        let login = post_form(&admin, self.url("/admin/login"), &[("token", TOKEN)]).await;
        assert_eq!(login.status(), 303, "logging in on the admin page");
        admin
    }

    /// Takes the app's SQLite write lock from a connection of its own, as another process
    /// would, and keeps it until `ROLLBACK` on what this returns: the app's writes wait (up to
    /// their 5 s busy timeout) and then fail, while its reads go on.
    pub async fn lock_sqlite_writes(&self) -> sqlx::SqliteConnection {
        let mut locker = sqlx::SqliteConnection::connect(&self.database_url)
            .await
            .expect("a second connection to the SQLite file");
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut locker)
            .await
            .expect("the write lock");
        locker
    }

    /// Whether metric `name` reaches `value` within `within` (polled every 20 ms).
    pub async fn metric_reaches(&self, name: &str, value: f64, within: Duration) -> bool {
        eventually(within, || async { self.metric(name).await == value }).await
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

/// `POST /api/jobs` to the Handoff at `base` with the token and, when given,
/// `{"moveUrl": move_url}`; the answer as it comes, whatever its status.
pub async fn post_job(
    client: &reqwest::Client,
    base: &str,
    move_url: Option<&str>,
) -> reqwest::Response {
    with_move_url(client.post(format!("{base}/api/jobs")), move_url)
        .send()
        .await
        .expect("create request")
}

/// Creates a job through the API of the Handoff at `base`; returns its JSON.
pub async fn create_job_at(client: &reqwest::Client, base: &str, move_url: Option<&str>) -> Value {
    let resp = post_job(client, base, move_url).await;
    assert_eq!(resp.status(), 201, "creating a job on {base}");
    resp.json().await.expect("job JSON")
}

/// Creates a job on the Handoff at `base`; returns its id.
pub async fn job_id_at(client: &reqwest::Client, base: &str) -> String {
    create_job_at(client, base, None).await["id"]
        .as_str()
        .expect("an id")
        .to_owned()
}

/// Completes job `id` through the API of the Handoff at `base`, with the token and, when given,
/// `{"moveUrl": move_url}`.
pub async fn complete_at(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    move_url: Option<&str>,
) -> reqwest::Response {
    let request = client.post(format!("{base}/api/jobs/{id}/complete"));
    with_move_url(request, move_url)
        .send()
        .await
        .expect("complete request")
}

/// A job runner's API request: the token, and a `{"moveUrl": …}` body when there is one.
fn with_move_url(
    request: reqwest::RequestBuilder,
    move_url: Option<&str>,
) -> reqwest::RequestBuilder {
    let request = request.bearer_auth(TOKEN);
    match move_url {
        Some(url) => request.json(&serde_json::json!({ "moveUrl": url })),
        None => request,
    }
}

/// Job `id` on the Handoff at `base`, as `GET /api/jobs/{id}` shows it.
pub async fn job_at(client: &reqwest::Client, base: &str, id: &str) -> Value {
    client
        .get(format!("{base}/api/jobs/{id}"))
        .send()
        .await
        .expect("get job")
        .json()
        .await
        .expect("job JSON")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

/// A client that keeps cookies, as a browser does (for the admin session), and follows no redirect.
pub fn cookie_client() -> reqwest::Client {
    reqwest::Client::builder()
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

/// Pulls the CSRF token out of the admin page.
pub fn csrf_of(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a CSRF field") + marker.len();
    html[start..]
        .split('"')
        .next()
        .expect("the end of the CSRF value")
        .to_owned()
}

pub async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let (value, text) = metric_and_text(client, base, name).await;
    value.unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
}

/// A metric's current value, `None` while it is not in `/metrics` (a labelled one appears once
/// its label is first counted).
pub async fn metric_if_shown(client: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
    metric_and_text(client, base, name).await.0
}

async fn metric_and_text(
    client: &reqwest::Client,
    base: &str,
    name: &str,
) -> (Option<f64>, String) {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok());
    (value, text)
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
        let response = stream_request(client, url)
            .send()
            .await
            .expect("stream request");
        Self::from_response(response)
    }

    /// Opens the stream at `url` and [`expect_connect`](Self::expect_connect)s.
    pub async fn connected(client: &reqwest::Client, url: &str) -> Self {
        let mut stream = Self::open(client, url).await;
        stream.expect_connect().await;
        stream
    }

    /// Checks the stream was answered `200` and reads its connect event.
    pub async fn expect_connect(&mut self) {
        assert_eq!(self.response_status, 200, "the stream was refused");
        let connect = self.next_result(WAIT).await.expect("a connect event");
        assert_eq!(connect["status"], "connect", "{connect}");
    }

    /// Reads a response already received (e.g. one sent with extra headers).
    pub fn from_response(response: reqwest::Response) -> Self {
        Self {
            response_status: response.status().as_u16(),
            headers: response.headers().clone(),
            response: Some(response),
            buf: String::new(),
        }
    }

    /// The whole body as text (for a refused stream's JSON error).
    pub async fn into_body(mut self) -> String {
        match self.response.take() {
            Some(response) => response.text().await.expect("a body"),
            None => self.buf,
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
                block => {
                    return Some(
                        block
                            .result()
                            .unwrap_or_else(|| panic!("not a result event: {block:?}")),
                    );
                }
            }
        }
    }

    /// The next event of any name with its parsed data, skipping comments; `None` at the end.
    pub async fn next_event(&mut self, within: Duration) -> Option<(String, Value)> {
        loop {
            match self.next_block(within).await? {
                SseBlock::Comment(_) | SseBlock::Retry(_) => continue,
                SseBlock::Event { event, data } => {
                    let data = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
                    return Some((event, data));
                }
            }
        }
    }

    /// Reads one block and checks it is a `:` keep-alive comment.
    pub async fn expect_keep_alive(&mut self, within: Duration) {
        let block = self.next_block(within).await;
        assert!(
            matches!(block, Some(SseBlock::Comment(_))),
            "expected a keep-alive, got {block:?}"
        );
    }

    /// Reads the connect event, then the result event, then the end of the stream.
    pub async fn expect_connect_result_end(&mut self, within: Duration) -> Value {
        let connect = self.next_result(within).await.expect("a connect event");
        assert_eq!(connect["status"], "connect", "{connect}");
        assert_eq!(connect["moveUrl"], "", "{connect}");
        let result = self.next_result(within).await.expect("a result event");
        assert_eq!(result["status"], "result", "{result}");
        assert_eq!(
            self.next_block(within).await,
            None,
            "the stream ends after the result"
        );
        result
    }
}

fn stream_request(client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
    client.get(url).header("Accept", "text/event-stream")
}

/// What a browser's `EventSource` does, over reqwest: when its stream ends or its connection
/// drops, it waits the last `retry:` it was sent and connects again, until a `result` event with
/// status `result` arrives. Like a browser it gives up on a response that is not `200`.
pub struct EventSource {
    client: reqwest::Client,
    url: String,
    retry: Duration,
    opened: Arc<Mutex<Vec<Instant>>>,
}

impl EventSource {
    pub fn new(client: &reqwest::Client, url: &str) -> Self {
        Self {
            client: client.clone(),
            url: url.to_owned(),
            // Chromium's default until the server sends a `retry:`.
            retry: Duration::from_secs(3),
            opened: Arc::default(),
        }
    }

    /// When each of its streams opened (a `200` arrived), so far; shared with the running task.
    pub fn opened(&self) -> Arc<Mutex<Vec<Instant>>> {
        Arc::clone(&self.opened)
    }

    /// Reads, reconnecting as often as needed, until the result; panics after `within` overall.
    pub async fn result(mut self, within: Duration) -> Value {
        let url = self.url.clone();
        tokio::time::timeout(within, self.read_until_result())
            .await
            .unwrap_or_else(|_| panic!("no result on {url} within {within:?}"))
    }

    async fn read_until_result(&mut self) -> Value {
        loop {
            // A connection refused or dropped before the answer is a network error: a browser
            // reconnects after `retry` then too.
            if let Ok(response) = stream_request(&self.client, &self.url).send().await {
                let status = response.status();
                assert_eq!(status, 200, "a browser gives up on a {status} event stream");
                self.opened.lock().expect("opened log").push(Instant::now());
                let mut reader = SseReader::from_response(response);
                while let Some(block) = reader.next_block_inner().await {
                    if let SseBlock::Retry(ms) = block {
                        self.retry = Duration::from_millis(ms);
                    } else if let Some(data) = block.result()
                        && data["status"] == "result"
                    {
                        return data;
                    }
                }
            }
            tokio::time::sleep(self.retry).await;
        }
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
    SseBlock::Event {
        event,
        data: data.join("\n"),
    }
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

/// Sends `GET /sse/connect/{id}` to the Handoff at `base` over a raw socket and returns the socket
/// unread: a client no HTTP library would be, one that never reads, or closes or resets at will.
pub async fn raw_stream(base: &str, id: &str, connection: HttpConnection) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut socket = TcpStream::connect(addr).await.expect("connect");
    let close = match connection {
        HttpConnection::KeepAlive => "",
        HttpConnection::Close => "Connection: close\r\n",
    };
    let request = format!(
        "GET /sse/connect/{id} HTTP/1.1\r\nHost: handoff.test\r\nAccept: text/event-stream\r\n{close}\r\n"
    );
    socket
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    socket
}

/// [`raw_stream`], read until its connect event arrived after a `200`.
pub async fn raw_connected_stream(base: &str, id: &str, connection: HttpConnection) -> TcpStream {
    let mut socket = raw_stream(base, id, connection).await;
    let seen = read_until(&mut socket, r#""status":"connect""#).await;
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    socket
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

/// A port nobody listens on right now (bind port 0, let go): for processes that need a port number
/// up front, such as nginx, chromedriver and redis-server.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

/// Waits up to 5 s for a process that was asked to stop, then kills it.
pub fn stop_process(child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Every line the binary has logged so far.
pub type CapturedLog = Arc<Mutex<Vec<String>>>;

/// Starts the `handoff` binary on port 0 in `dir` with `envs` (log level info unless `envs` says
/// otherwise); returns the child, its base URL and its log as it grows.
pub fn start_binary(dir: &std::path::Path, envs: &[(&str, &str)]) -> (Child, String, CapturedLog) {
    start_command(Command::new(env!("CARGO_BIN_EXE_handoff")), dir, envs)
}

/// Like [`start_binary`], through a command that ends by running the binary (e.g. `prlimit … --`).
pub fn start_command(
    mut command: Command,
    dir: &std::path::Path,
    envs: &[(&str, &str)],
) -> (Child, String, CapturedLog) {
    let mut child = command
        .current_dir(dir)
        .env("HANDOFF_ADDR", "127.0.0.1:0")
        .env("HANDOFF_API_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start handoff");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let log = CapturedLog::default();
    let base = loop {
        let Some(Ok(line)) = lines.next() else {
            panic!(
                "handoff exited before listening; its log:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        log.lock().unwrap().push(line.clone());
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .expect("an address")
                .to_owned();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    // Its warnings and errors also go to this test's output.
    let sink = Arc::clone(&log);
    let tag = base.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains(" WARN ") || line.contains(" ERROR ") {
                eprintln!("[handoff {tag}] {line}");
            }
            sink.lock().unwrap().push(line);
        }
    });
    (child, base, log)
}

/// Sends SIGTERM to `child`; returns when it was sent.
pub fn sigterm(child: &Child) -> std::time::Instant {
    let started = std::time::Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success(), "kill -TERM failed");
    started
}

/// Waits for `child` to exit, failing once `limit` has passed since `started`.
pub async fn exit_within(
    child: &mut Child,
    started: std::time::Instant,
    limit: Duration,
) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            started.elapsed() < limit,
            "still running {limit:?} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The resident memory of process `pid`, in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("a VmRSS line")
}
