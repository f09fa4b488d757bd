//! Test support: the real app on a real port against a fresh database ([`TestApp`]) or the
//! `handoff` binary as a process ([`Instance`]), both reached through one client ([`Handoff`]);
//! event streams ([`SseReader`]); and the outside processes tests run beside it: Redis, nginx
//! and Chromium.

pub mod backend;
pub mod browser;
pub mod client;
pub mod instance;
pub mod nginx;
pub mod redis;
pub mod redis_cluster;
pub mod slow_link;
pub mod sse;

use std::ops::Deref;
use std::time::Duration;

use handoff::config::Config;
use handoff::startup::Application;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

pub use client::{
    Handoff, HttpConnection, client, client_builder, cookie_client, page_text, post_form,
    read_until, read_until_closed,
};
pub use instance::Instance;
pub use sse::{Sse, SseReader, result_of};

pub const TOKEN: &str = "test-token-0123456789";

/// How long a test waits for what should happen at once (an event, a metric settling).
pub const WAIT: Duration = Duration::from_secs(5);

/// A running Handoff on 127.0.0.1:<port 0>, with its own SQLite file (or PostgreSQL database),
/// and a [`Handoff`] client of it (through `Deref`).
pub struct TestApp {
    pub port: u16,
    pub database_url: String,
    handoff: Handoff,
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
            handoff: Handoff::new(format!("http://127.0.0.1:{port}")),
            port,
            database_url: database_url.to_owned(),
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
}

impl Deref for TestApp {
    type Target = Handoff;

    fn deref(&self) -> &Handoff {
        &self.handoff
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
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
