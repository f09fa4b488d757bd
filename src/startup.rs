//! Builds the application: the store, the hub, the routes and the HTTP server on its own listener.
//!
//! [`Application::build`] binds before it returns and reports the real port, so tests run the real
//! app on port 0. Stopping goes through one [`CancellationToken`]: the server stops accepting,
//! every open stream ends at once (browsers reconnect elsewhere), what is in flight finishes, and
//! the timers run their last round. On a signal, [`Stopper`] first drains: `/readyz` answers
//! `503` while the instance serves on for `HANDOFF_DRAIN_SECS`, so that a load balancer polling
//! it moves new streams and writes elsewhere before any stream is cut.
//!
//! The server is assembled from actix-server and actix-http rather than actix-web's
//! `HttpServer`, whose sockets cannot be wrapped: each connection's socket is a
//! [`deadlines::Conn`], which enforces the request deadlines actix-http lacks.

mod deadlines;
/// How long a client may take to send a request and to read its answer (README, Limits).
pub use deadlines::{TIMING, Timing};

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_http::{HttpService, KeepAlive};
use actix_service::{ServiceFactoryExt as _, fn_service, map_config};
use actix_web::dev::{AppConfig, Extensions, Server};
use actix_web::middleware::{DefaultHeaders, from_fn};
use actix_web::{App, web};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::auth::{HmacKey, Secrets, fanout_secret, random_token};
use crate::config::{Config, DEFAULT_TOKEN_NAME, ExposeSecret, SecretString};
use crate::delivery::Delivery;
use crate::fanout::{Fanout, FanoutConfig};
use crate::hub::Hub;
use crate::jobs::{Jobs, Lifetimes};
use crate::limits::{self, DemoJobLimit, GuessThrottle, LookupBudget, StreamLimits};
use crate::logging;
use crate::metrics::Metrics;
use crate::routes::sse::SseSettings;
use crate::routes::{self, AppState};
use crate::sessions::AdminSessions;
use crate::store::{Store, StoreError};
use crate::webhooks::{Receipts, Sender, WebhookError};

/// How long the server waits for connections after the streams were told to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long the timers' last round may take once the server has stopped (its writes wait in the
/// write lane like any other, and a database that is down must not hold the exit for ever).
const LAST_ROUND_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("cannot use REDIS_URL: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot send webhooks: {0}")]
    Webhooks(#[from] WebhookError),
}

/// A built, bound, not yet running Handoff.
pub struct Application {
    port: u16,
    server: Server,
    jobs: Jobs,
    /// With `HANDOFF_WEBHOOK_URL`: sends the outbox's webhooks.
    webhooks: Option<Sender>,
    retention: Duration,
    /// Cancelled to shut down: the server stops accepting, every open stream ends, then the
    /// server stops.
    shutdown: CancellationToken,
    /// What the handlers share: its `draining` flag turns `/readyz` to `503`.
    state: web::Data<AppState>,
    /// `HANDOFF_DRAIN_SECS`.
    drain: Duration,
}

impl Application {
    /// Builds the state ([`wire`]), binds `config.addr` and puts a server on it ([`serve`]).
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let shutdown = CancellationToken::new();
        let Wired {
            state,
            webhooks,
            summary,
        } = wire(&config, &shutdown).await?;
        let listener = TcpListener::bind(config.addr)?;
        // std listens with a queue of 128, and actix's `backlog` applies only to the sockets it
        // binds itself: a burst of connects (every tab reconnecting through nginx after a
        // restart) then overflows it, the kernel drops SYNs, and each drop costs a client (or
        // nginx's 2 s proxy_connect_timeout) a second or more. Listening again sets the queue.
        socket2::SockRef::from(&listener).listen(ACCEPT_QUEUE.into())?;
        let port = listener.local_addr()?.port();
        let jobs = state.jobs.clone();
        let server = serve(listener, state.clone(), config.workers)?;
        log::info!(
            "Handoff listening on http://{}:{port} ({summary})",
            config.addr.ip()
        );
        Ok(Self {
            port,
            server,
            jobs,
            webhooks,
            retention: config.retention,
            shutdown,
            state,
            drain: Duration::from_secs(config.drain_secs.into()),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cancel it to shut down: streams end at once, the server stops within [`SHUTDOWN_GRACE`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// What a signal handler calls to drain, then shut down.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            state: self.state.clone(),
            drain: self.drain,
            shutdown: self.shutdown.clone(),
        }
    }

    /// Runs until the shutdown token is cancelled and the server has stopped: it stops
    /// accepting (the listener closes, so a proxy's next connection is refused and goes to
    /// another instance), ends every stream (each has had its `retry:`), lets the requests in
    /// flight finish within [`SHUTDOWN_GRACE`] (a completion is stored and published before it
    /// is answered), then runs the timers' last round.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let (jobs, retention, shutdown) =
            (self.jobs.clone(), self.retention, self.shutdown.clone());
        tokio::spawn(async move { jobs.purge_old_jobs(retention, shutdown).await });
        // The timers stop after the server, so that their last round stores the progress and
        // receipts of the requests and streams that ended while it stopped.
        let server_stopped = CancellationToken::new();
        let (jobs, stopped) = (self.jobs.clone(), server_stopped.clone());
        let timers = tokio::spawn(async move { jobs.run_timers(stopped).await });
        if let Some(sender) = self.webhooks {
            tokio::spawn(sender.run(self.shutdown.clone()));
        }
        let (jobs, shutdown) = (self.jobs, self.shutdown);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            // Sent at once: the listener closes before any stream ends.
            let stopping = handle.stop(true);
            jobs.close_streams();
            stopping.await;
        });
        let served = self.server.await;
        server_stopped.cancel();
        if tokio::time::timeout(LAST_ROUND_GRACE, timers)
            .await
            .is_err()
        {
            log::warn!("the timers' last round did not finish within {LAST_ROUND_GRACE:?}");
        }
        served
    }
}

/// Drains, then shuts down: see [`Stopper::drain_then_stop`].
pub struct Stopper {
    state: web::Data<AppState>,
    drain: Duration,
    shutdown: CancellationToken,
}

impl Stopper {
    /// `/readyz` answers `503` from now on; the instance serves on, streams and completions as
    /// usual, for `HANDOFF_DRAIN_SECS` (or until `sooner`, e.g. a second signal), then shuts
    /// down. With no drain it shuts down at once, as it always did.
    pub async fn drain_then_stop(self, sooner: impl Future<Output = ()>) {
        self.state.draining.store(true, Ordering::Relaxed);
        if !self.drain.is_zero() {
            log::info!(
                "draining: /readyz answers 503; serving on for {} s, then stopping",
                self.drain.as_secs()
            );
            tokio::select! {
                () = tokio::time::sleep(self.drain) => {}
                () = sooner => log::info!("asked again: stopping now"),
                () = self.shutdown.cancelled() => {}
            }
        }
        log::info!("shutting down: ending open streams");
        self.shutdown.cancel();
    }
}

/// What the server serves, built and connected, before anything listens.
struct Wired {
    state: web::Data<AppState>,
    /// With `HANDOFF_WEBHOOK_URL`: sends the outbox's webhooks.
    webhooks: Option<Sender>,
    /// What was built, for the start-up log line.
    summary: String,
}

/// Builds the store, the Redis link, delivery, the use cases, the webhook sender and the state
/// every handler shares. Delivery's fan-in starts here and ends with `shutdown`.
async fn wire(config: &Config, shutdown: &CancellationToken) -> Result<Wired, StartError> {
    // Webhooks off: endings write nothing more than they ever did.
    let unclaimed = config.webhook.as_ref().map(|webhook| webhook.unclaimed);
    let metrics = Metrics::new();
    let store = Store::connect_with(
        &config.database_url,
        (config.write_queue, config.read_queue),
        config.db_pool,
        unclaimed,
        metrics.store.clone(),
    )
    .await?;
    for warning in config.warnings() {
        log::warn!("{warning}");
    }
    let tokens = api_tokens(config);
    let root = root_secret(config);
    let fanout = match &config.redis_url {
        Some(url) => {
            let key = match &config.fanout_key {
                Some(key) => HmacKey::new(key.expose_secret().as_bytes()),
                None => HmacKey::new(&fanout_secret(&root)),
            };
            let fanout = FanoutConfig {
                url,
                cluster: config.redis_cluster,
                channel: &config.redis_channel,
                legacy: config.fanout_legacy_channel,
            };
            Some(Fanout::new(&fanout, key)?)
        }
        None => None,
    };
    let open_files = limits::raise_open_file_limit();
    let max_streams = config
        .max_streams
        .unwrap_or_else(|| limits::default_max_streams(open_files));
    let delivery = Delivery::new(Hub::new(), fanout, store.clone(), metrics.clone());
    logging::name_instance(delivery.instance());
    // Ends with the shutdown token; it holds no stream open, so nothing waits for it.
    delivery.spawn_fan_in(config.resync_interval, shutdown.clone());
    let fan_out = match delivery.fanout() {
        Some(fanout) => format!(
            "Redis, routed per job, channels {}:{{id}}",
            fanout.channel()
        ),
        None => "off".into(),
    };
    let webhooks = match &config.webhook {
        Some(webhook) => Some(Sender::new(webhook, store.clone(), metrics.clone())?),
        None => None,
    };
    let receipts = webhooks.as_ref().map(|_| Receipts::default());
    let jobs = Jobs::new(
        store.clone(),
        delivery,
        metrics.clone(),
        lifetimes(config),
        receipts,
    );
    let secrets = Secrets::new(
        tokens
            .iter()
            .map(|(name, token)| (name.as_str(), token.expose_secret())),
        config
            .admin_password_hash
            .as_ref()
            .map(ExposeSecret::expose_secret),
        &root,
    );
    let state = AppState {
        jobs,
        metrics,
        sessions: AdminSessions::new(store.clone(), config.admin_idle),
        secrets,
        public_https: config
            .public_url
            .as_ref()
            .is_some_and(|url| url.scheme() == "https"),
        public_origin: config
            .public_url
            .as_ref()
            .map(|url| url.origin().ascii_serialization()),
        sse: SseSettings {
            timeout: config.sse_timeout,
            retry: config.sse_retry,
            keep_alive: config.keep_alive,
        },
        limits: StreamLimits::new(max_streams, config.max_streams_per_client),
        proxies: config.trusted_proxies.clone(),
        token_guesses: GuessThrottle::default(),
        login_guesses: GuessThrottle::default(),
        untrusted_forwarding_warned: Default::default(),
        demo: config.demo.then(DemoJobLimit::default),
        lookups: LookupBudget::default(),
        draining: Default::default(),
    };
    let hooks = match &webhooks {
        Some(sender) => format!("to {}", sender.host()),
        None => "off".into(),
    };
    let summary = format!(
        "database: {}, fan-out: {fan_out}, webhooks: {hooks}, at most {max_streams} streams, \
         open-file limit {open_files}",
        store.kind()
    );
    Ok(Wired {
        state: web::Data::from(Arc::new(state)),
        webhooks,
        summary,
    })
}

/// The job runners' tokens by name: `HANDOFF_API_TOKEN` as `default`, then
/// `HANDOFF_API_TOKENS`; with neither, a random `default` for this run, logged once.
fn api_tokens(config: &Config) -> Vec<(String, SecretString)> {
    let single = config
        .api_token
        .clone()
        .map(|token| (DEFAULT_TOKEN_NAME.to_owned(), token));
    let named = config.api_tokens.iter().flat_map(|tokens| tokens.0.clone());
    let tokens: Vec<_> = single.into_iter().chain(named).collect();
    if !tokens.is_empty() {
        return tokens;
    }
    let token = random_token();
    log::warn!(
        "HANDOFF_API_TOKEN is not set; generated one for this run: {token} \
         (set HANDOFF_API_TOKEN to keep a token across restarts)"
    );
    vec![(DEFAULT_TOKEN_NAME.to_owned(), token.into())]
}

/// The secret the cookie key and the default fan-out key derive from ([`Config::root_secret`]),
/// or a random one for this run: sessions then end at restart and hold on this instance only.
fn root_secret(config: &Config) -> Vec<u8> {
    match config.root_secret() {
        Some(secret) => secret.expose_secret().as_bytes().to_vec(),
        None => random_token().into_bytes(),
    }
}

/// The jobs' default deadline and retention.
fn lifetimes(config: &Config) -> Lifetimes {
    if config.job_deadline > config.retention {
        log::warn!(
            "HANDOFF_JOB_DEADLINE_SECS is longer than HANDOFF_RETENTION_SECS: jobs get the \
             retention as their deadline"
        );
    }
    Lifetimes {
        default_deadline: config.job_deadline,
        retention: config.retention,
    }
}

/// Connections the kernel may hold for the server before it accepts them.
const ACCEPT_QUEUE: u16 = 4096;

/// The server on `listener`, serving `state` on `workers` threads (default: one per core); it
/// runs once awaited.
fn serve(
    listener: TcpListener,
    state: web::Data<AppState>,
    workers: Option<usize>,
) -> std::io::Result<Server> {
    let local = listener.local_addr()?;
    let mut builder = Server::build()
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
        .disable_signals();
    if let Some(workers) = workers {
        builder = builder.workers(workers);
    }
    let draining = builder.graceful_shutdown_signal();
    Ok(builder
        .listen("handoff", listener, move || {
            let app = App::new()
                .app_data(state.clone())
                .wrap(from_fn(routes::timed))
                .wrap(routes::explain_errors())
                .wrap(from_fn(deadlines::track))
                .wrap(security_headers());
            let draining = draining.clone();
            let http = HttpService::build()
                .keep_alive(KeepAlive::Timeout(deadlines::TIMING.keep_alive))
                // Heads are timed by `deadlines::Conn`, on every request, not only the first.
                .client_request_timeout(Duration::ZERO)
                .client_disconnect_timeout(Duration::from_secs(1))
                // A client that closes its side has gone (page A left, or nginx dropped the
                // browser's request): end its connection at once, and with it the stream and
                // its hub entry. This applies to every request: one whose client half-closes
                // before the answer gets none (browsers, EventSource, nginx and HTTP client
                // libraries never half-close).
                .h1_allow_half_closed(false)
                // On a graceful stop, idle keep-alive connections close at once instead of
                // holding the stop up (what actix-web's `HttpServer` does too).
                .graceful_shutdown_signal(move || {
                    let draining = draining.clone();
                    async move { draining.notified().await }
                })
                .local_addr(local)
                .on_connect_ext(|conn: &deadlines::Conn, data: &mut Extensions| {
                    data.insert(conn.phase());
                })
                // No absolute URL is ever built, so the config's host and address (used
                // only for those) can stay at their defaults.
                .h1(map_config(app.configure(routes::configure), |_| {
                    AppConfig::default()
                }));
            fn_service(|io: TcpStream| {
                let peer = io.peer_addr().ok();
                std::future::ready(Ok((deadlines::Conn::new(io), peer)))
            })
            .and_then(http)
        })?
        .run())
}

/// The server's jemalloc settings (`src/main.rs` hands them to jemalloc; `_RJEM_MALLOC_CONF` in
/// the environment still overrides them). Every connection holds actix-http's two 8 KiB buffers
/// for as long as it is open, and by default jemalloc gives each 8 KiB block a slab of its own,
/// with metadata of its own, so each open stream would pay that metadata twice. Slabs of 16 pages
/// hold 8 blocks (BENCHMARKS.md, item 40).
pub const MALLOC_CONF: &[u8; 24] = b"slab_sizes:8192-8192:16\0";

/// Headers for every response: no inline script, no framing, no sniffing, no referrer leaks.
const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
];

fn security_headers() -> DefaultHeaders {
    SECURITY_HEADERS
        .into_iter()
        .fold(DefaultHeaders::new(), |headers, header| headers.add(header))
}
