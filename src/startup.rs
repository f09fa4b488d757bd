//! Builds the application: the store, the hub, the routes and the HTTP server on its own listener.
//!
//! [`Application::build`] binds before it returns and reports the real port, so tests run the real
//! app on port 0. Stopping goes through one [`CancellationToken`]: it ends every open stream at
//! once (browsers reconnect elsewhere) and then stops the server.
//!
//! The server is assembled from actix-server and actix-http rather than actix-web's
//! `HttpServer`, whose sockets cannot be wrapped: each connection's socket is a
//! [`deadlines::Conn`], which enforces the request deadlines actix-http lacks.

mod deadlines;

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, KeepAlive};
use actix_service::{ServiceFactoryExt as _, fn_service, map_config};
use actix_web::dev::{AppConfig, Extensions, Server};
use actix_web::middleware::{DefaultHeaders, from_fn};
use actix_web::{App, web};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::auth::{Secrets, fanout_secret, random_token};
use crate::config::Config;
use crate::delivery::Delivery;
use crate::fanout::{Fanout, FanoutKey};
use crate::hub::Hub;
use crate::jobs::{Jobs, Lifetimes};
use crate::limits::{self, DemoJobLimit, GuessThrottle, StreamLimits};
use crate::metrics::Metrics;
use crate::routes::sse::SseSettings;
use crate::routes::{self, AppState};
use crate::sessions::AdminSessions;
use crate::store::{Store, StoreError};
use crate::webhooks::{Receipts, Sender, WebhookError};

/// How long the server waits for connections after the streams were told to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

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
    /// Cancelled to shut down: every open stream ends, then the server stops.
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        // Webhooks off: endings write nothing more than they ever did.
        let unclaimed = config.webhook.as_ref().map(|webhook| webhook.unclaimed);
        let metrics = Metrics::new();
        let store = Store::connect_with(
            &config.database_url,
            config.write_queue,
            config.db_pool,
            unclaimed,
            metrics.store.clone(),
        )
        .await?;
        let token = match &config.api_token {
            Some(token) => token.clone(),
            None => {
                let token = random_token();
                log::warn!(
                    "HANDOFF_API_TOKEN is not set; generated one for this run: {token} \
                     (set HANDOFF_API_TOKEN to keep a token across restarts)"
                );
                token
            }
        };
        let fanout = match &config.redis_url {
            Some(url) => {
                let key = match &config.fanout_key {
                    Some(key) => FanoutKey::new(key.as_bytes()),
                    None => FanoutKey::new(&fanout_secret(&token)),
                };
                Some(Fanout::new(url, &config.redis_channel, key)?)
            }
            None => None,
        };
        let open_files = limits::raise_open_file_limit();
        let max_streams = config
            .max_streams
            .unwrap_or_else(|| limits::default_max_streams(open_files));
        let shutdown = CancellationToken::new();
        let delivery = Delivery::new(Hub::new(), fanout, store.clone(), metrics.clone());
        // Ends with the shutdown token; it holds no stream open, so nothing waits for it.
        delivery.spawn_fan_in(config.resync_interval, shutdown.clone());
        let fan_out = match delivery.fanout() {
            Some(fanout) => format!("Redis channel {}", fanout.channel()),
            None => "off".into(),
        };
        if config.job_deadline > config.retention {
            log::warn!(
                "HANDOFF_JOB_DEADLINE_SECS is longer than HANDOFF_RETENTION_SECS: jobs get the \
                 retention as their deadline"
            );
        }
        let lifetimes = Lifetimes {
            default_deadline: config.job_deadline,
            retention: config.retention,
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
            lifetimes,
            receipts,
        );
        let secrets = Secrets::new(&token);
        let public_https = config
            .public_url
            .as_ref()
            .is_some_and(|url| url.scheme() == "https");
        let state = web::Data::from(Arc::new(AppState {
            jobs: jobs.clone(),
            metrics,
            sessions: AdminSessions::new(secrets.clone(), store.clone(), config.admin_idle),
            secrets,
            public_https,
            sse: SseSettings {
                timeout: config.sse_timeout,
                retry: config.sse_retry,
                keep_alive: config.keep_alive,
            },
            limits: StreamLimits::new(max_streams, config.max_streams_per_client),
            proxies: config.trusted_proxies.clone(),
            token_guesses: GuessThrottle::default(),
            untrusted_forwarding_warned: Default::default(),
            demo: config.demo.then(DemoJobLimit::default),
            draining: Default::default(),
        }));
        let listener = TcpListener::bind(config.addr)?;
        let local = listener.local_addr()?;
        let port = local.port();
        let mut builder = Server::build()
            .backlog(4096)
            .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
            .disable_signals();
        if let Some(workers) = config.workers {
            builder = builder.workers(workers);
        }
        let draining = builder.graceful_shutdown_signal();
        let server_state = state.clone();
        let server = builder
            .listen("handoff", listener, move || {
                let app = App::new()
                    .app_data(server_state.clone())
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
            .run();
        let hooks = match &webhooks {
            Some(sender) => format!("to {}", sender.host()),
            None => "off".into(),
        };
        log::info!(
            "Handoff listening on http://{}:{port} (database: {}, fan-out: {fan_out}, \
             webhooks: {hooks}, at most {max_streams} streams, open-file limit {open_files})",
            config.addr.ip(),
            store.kind()
        );
        Ok(Self {
            port,
            server,
            jobs,
            webhooks,
            retention: config.retention,
            shutdown,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cancel it to shut down: streams end at once, the server stops within [`SHUTDOWN_GRACE`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled and the server has stopped.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let (jobs, retention, shutdown) =
            (self.jobs.clone(), self.retention, self.shutdown.clone());
        tokio::spawn(async move { jobs.purge_old_jobs(retention, shutdown).await });
        let (jobs, shutdown) = (self.jobs.clone(), self.shutdown.clone());
        tokio::spawn(async move { jobs.run_timers(shutdown).await });
        if let Some(sender) = self.webhooks {
            tokio::spawn(sender.run(self.shutdown.clone()));
        }
        let (jobs, shutdown) = (self.jobs, self.shutdown);
        tokio::spawn(async move {
            shutdown.cancelled().await;
            jobs.close_streams();
            handle.stop(true).await;
        });
        self.server.await
    }
}

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
