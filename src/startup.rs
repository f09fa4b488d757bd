//! Builds the application: the store, the hub, the routes and the HTTP server on its own listener.
//!
//! [`Application::build`] binds before it returns and reports the real port, so tests run the real
//! app on port 0. Stopping goes through one [`CancellationToken`]: it ends every open stream at
//! once (browsers reconnect elsewhere) and then stops the server.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::DefaultHeaders;
use actix_web::{App, HttpServer, web};
use tokio_util::sync::CancellationToken;

use crate::auth::{Secrets, fanout_secret, random_token};
use crate::config::Config;
use crate::delivery::Delivery;
use crate::fanout::{Fanout, FanoutKey};
use crate::hub::Hub;
use crate::jobs::{Jobs, Lifetimes};
use crate::limits::{self, DemoJobLimit, LoginThrottle, StreamLimits};
use crate::metrics::Metrics;
use crate::routes::sse::SseSettings;
use crate::routes::{self, AppState};
use crate::store::{Store, StoreError};

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
}

/// A built, bound, not yet running Handoff.
pub struct Application {
    port: u16,
    server: Server,
    jobs: Jobs,
    retention: Duration,
    /// Cancelled to shut down: every open stream ends, then the server stops.
    shutdown: CancellationToken,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let store = Store::connect(&config.database_url, config.write_queue).await?;
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
        let metrics = Metrics::new();
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
        let jobs = Jobs::new(store.clone(), delivery, metrics.clone(), lifetimes);
        let state = web::Data::from(Arc::new(AppState {
            jobs: jobs.clone(),
            metrics,
            secrets: Secrets::new(&token),
            sse: SseSettings {
                timeout: config.sse_timeout,
                retry: config.sse_retry,
                keep_alive: config.keep_alive,
            },
            limits: StreamLimits::new(max_streams, config.max_streams_per_client),
            proxies: config.trusted_proxies.clone(),
            logins: LoginThrottle::default(),
            demo: config.demo.then(DemoJobLimit::default),
        }));
        let listener = TcpListener::bind(config.addr)?;
        let port = listener.local_addr()?.port();
        let server_state = state.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(server_state.clone())
                .wrap(routes::explain_errors())
                .wrap(security_headers())
                .configure(routes::configure)
        })
        // A client that closes its side has gone (page A left, or nginx dropped the browser's
        // request): end its connection at once, and with it the stream and its hub entry. This
        // applies to every request: one whose client half-closes before the answer gets none
        // (browsers, EventSource, nginx and HTTP client libraries never half-close).
        .h1_allow_half_closed(false)
        .backlog(4096)
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs())
        .disable_signals();
        if let Some(workers) = config.workers {
            server = server.workers(workers);
        }
        let server = server.listen(listener)?.run();
        log::info!(
            "Handoff listening on http://{}:{port} (database: {}, fan-out: {fan_out}, \
             at most {max_streams} streams, open-file limit {open_files})",
            config.addr.ip(),
            store.kind()
        );
        Ok(Self {
            port,
            server,
            jobs,
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
fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add((
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ))
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("Referrer-Policy", "same-origin"))
        .add(("X-Frame-Options", "DENY"))
}
