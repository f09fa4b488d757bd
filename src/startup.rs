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

use crate::auth::{Secrets, random_token};
use crate::config::Config;
use crate::fanout::Fanout;
use crate::hub::Hub;
use crate::limits::{self, LoginThrottle, StreamLimits, TrustedProxies};
use crate::metrics::Metrics;
use crate::routes;
use crate::store::{Store, StoreError};

/// How long the server waits for connections after the streams were told to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// What every handler shares; built once, outside the server closure, so all workers see one hub.
#[derive(Debug)]
pub struct AppState {
    pub store: Store,
    pub hub: Hub,
    /// The Redis fan-out, when `REDIS_URL` is set; `/healthz` checks it.
    pub fanout: Option<Fanout>,
    pub metrics: Metrics,
    pub secrets: Secrets,
    pub sse: SseSettings,
    /// Stream caps and counts; [`crate::routes::sse`] takes a permit per stream.
    pub limits: StreamLimits,
    /// Whose `X-Forwarded-For` names the client.
    pub proxies: TrustedProxies,
    /// Wrong admin logins per client address.
    pub logins: LoginThrottle,
    /// Cancelled when the server shuts down: the hub closes (every open stream ends), then the
    /// server stops.
    pub shutdown: CancellationToken,
}

/// The stream timing, from [`Config`].
#[derive(Debug, Clone, Copy)]
pub struct SseSettings {
    pub timeout: Duration,
    pub retry: Duration,
    pub keep_alive: Duration,
}

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
    state: web::Data<AppState>,
    retention: Duration,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let store = Store::connect(&config.database_url).await?;
        let fanout = match &config.redis_url {
            Some(url) => Some(Fanout::new(url, &config.redis_channel)?),
            None => None,
        };
        let hub = match &fanout {
            Some(fanout) => Hub::with_fanout(fanout.clone()),
            None => Hub::new(),
        };
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
        let open_files = limits::raise_open_file_limit();
        let max_streams = config
            .max_streams
            .unwrap_or_else(|| limits::default_max_streams(open_files));
        let state = web::Data::from(Arc::new(AppState {
            store,
            hub,
            fanout,
            metrics: Metrics::new(),
            secrets: Secrets::new(&token),
            sse: SseSettings {
                timeout: config.sse_timeout,
                retry: config.sse_retry,
                keep_alive: config.keep_alive,
            },
            limits: StreamLimits::new(max_streams, config.max_streams_per_client),
            proxies: config.trusted_proxies.clone(),
            logins: LoginThrottle::default(),
            shutdown: CancellationToken::new(),
        }));
        if let Some(fanout) = &state.fanout {
            // Ends with the shutdown token; it holds no stream open, so nothing waits for it.
            fanout.spawn_subscriber(
                state.hub.clone(),
                state.store.clone(),
                state.metrics.clone(),
                config.resync_interval,
                state.shutdown.clone(),
            );
        }
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
        let fan_out = match &state.fanout {
            Some(fanout) => format!("Redis channel {}", fanout.channel()),
            None => "off".into(),
        };
        log::info!(
            "Handoff listening on http://{}:{port} (database: {}, fan-out: {fan_out}, \
             at most {max_streams} streams, open-file limit {open_files})",
            config.addr.ip(),
            state.store.kind()
        );
        Ok(Self {
            port,
            server,
            state,
            retention: config.retention,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cancel it to shut down: streams end at once, the server stops within [`SHUTDOWN_GRACE`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    /// Runs until the shutdown token is cancelled and the server has stopped.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let handle = self.server.handle();
        let token = self.state.shutdown.clone();
        let hub = self.state.hub.clone();
        let (state, retention) = (self.state.clone(), self.retention);
        tokio::spawn(async move { crate::jobs::purge_old_jobs(&state, retention).await });
        tokio::spawn(async move {
            token.cancelled().await;
            // Every waiting stream ends now; the browsers reconnect (to another instance).
            hub.close();
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
