//! Counters and gauges for `/metrics`, in the Prometheus text format.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every figure Handoff reports; cheap to clone (all handles share their values).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub open_streams: Gauge,
    pub watched_jobs: Gauge,
    /// By `kind`: `create`, `end`, `upkeep`.
    pub writes_waiting: Family<[(&'static str, &'static str); 1], Gauge>,
    pub jobs_created: Counter,
    pub jobs_completed: Counter,
    pub jobs_failed: Counter,
    pub jobs_expired: Counter,
    pub progress_reports: Counter,
    pub events_sent: Counter<u64, AtomicU64>,
    pub redis_reconnects: Counter,
    pub resync_deliveries: Counter,
    pub streams_refused: Counter,
    pub health_checks: Counter,
    pub fanout_rejected: Counter,
    pub fanout_stale: Counter,
    pub fanout_received: Counter,
    /// Webhook attempts by `outcome`: `accepted` (2xx), `refused` (any other status), `failed`
    /// (no answer: connection refused, timeout, TLS).
    pub webhook_attempts: Family<[(&'static str, &'static str); 1], Counter>,
    /// Webhooks accepted by the receiver, by `type`: `delivered`, `unclaimed`.
    pub webhooks_sent: Family<[(&'static str, &'static str); 1], Counter>,
    pub webhooks_given_up: Counter,
    /// API calls with a right bearer token, by the `token`'s name (never the token).
    pub api_calls: Family<[(&'static str, String); 1], Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("handoff");
        let metrics = Self {
            registry: Arc::new(Registry::default()),
            open_streams: Gauge::default(),
            watched_jobs: Gauge::default(),
            writes_waiting: Family::default(),
            jobs_created: Counter::default(),
            jobs_completed: Counter::default(),
            jobs_failed: Counter::default(),
            jobs_expired: Counter::default(),
            progress_reports: Counter::default(),
            events_sent: Counter::default(),
            redis_reconnects: Counter::default(),
            resync_deliveries: Counter::default(),
            streams_refused: Counter::default(),
            health_checks: Counter::default(),
            fanout_rejected: Counter::default(),
            fanout_stale: Counter::default(),
            fanout_received: Counter::default(),
            webhook_attempts: Family::default(),
            webhooks_sent: Family::default(),
            webhooks_given_up: Counter::default(),
            api_calls: Family::default(),
        };
        registry.register(
            "open_streams",
            "Event streams open on this instance",
            metrics.open_streams.clone(),
        );
        registry.register(
            "watched_jobs",
            "Jobs with at least one open stream on this instance",
            metrics.watched_jobs.clone(),
        );
        registry.register(
            "writes_waiting",
            "Writes waiting for the write lane's next batch, by kind (create, end, upkeep)",
            metrics.writes_waiting.clone(),
        );
        registry.register(
            "jobs_created",
            "Jobs created through this instance",
            metrics.jobs_created.clone(),
        );
        registry.register(
            "jobs_completed",
            "Jobs completed through this instance",
            metrics.jobs_completed.clone(),
        );
        registry.register(
            "jobs_failed",
            "Jobs failed through this instance",
            metrics.jobs_failed.clone(),
        );
        registry.register(
            "jobs_expired",
            "Jobs this instance's sweep expired at their deadline",
            metrics.jobs_expired.clone(),
        );
        registry.register(
            "progress_reports",
            "Progress reports accepted by this instance",
            metrics.progress_reports.clone(),
        );
        registry.register(
            "events_sent",
            "Events (connect, progress and endings) written to streams",
            metrics.events_sent.clone(),
        );
        registry.register(
            "redis_reconnects",
            "Times the Redis subscriber link was re-established",
            metrics.redis_reconnects.clone(),
        );
        registry.register(
            "resync_deliveries",
            "Results delivered by re-reading the store after a fan-out gap",
            metrics.resync_deliveries.clone(),
        );
        registry.register(
            "streams_refused",
            "Streams refused because a stream cap was reached",
            metrics.streams_refused.clone(),
        );
        registry.register(
            "health_checks",
            "Checks of the database (and Redis) made for /healthz, at most one a second",
            metrics.health_checks.clone(),
        );
        registry.register(
            "fanout_rejected",
            "Messages on the Redis channel dropped for not being signed with this deployment's key",
            metrics.fanout_rejected.clone(),
        );
        registry.register(
            "fanout_stale",
            "Signed messages on the Redis channel dropped for being sent more than 5 minutes \
             before or after this instance's clock (replays, or clocks out of step)",
            metrics.fanout_stale.clone(),
        );
        registry.register(
            "fanout_messages_received",
            "Messages this instance's Redis subscriber received, before their signature is checked \
             (an instance watching no job receives none)",
            metrics.fanout_received.clone(),
        );
        registry.register(
            "webhook_attempts",
            "Webhook POSTs made by this instance, by outcome (accepted, refused, failed)",
            metrics.webhook_attempts.clone(),
        );
        registry.register(
            "webhooks_sent",
            "Webhooks this instance had accepted by the receiver, by type (delivered, unclaimed)",
            metrics.webhooks_sent.clone(),
        );
        registry.register(
            "webhooks_given_up",
            "Webhooks given up after their last attempt, or too old to send",
            metrics.webhooks_given_up.clone(),
        );
        registry.register(
            "api_calls",
            "API calls with a right bearer token, by the token's name",
            metrics.api_calls.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Counts one open stream for as long as it lives; dropping it (however the stream ends) uncounts it.
#[derive(Debug)]
pub struct StreamGuard(Gauge);

impl StreamGuard {
    pub fn new(metrics: &Metrics) -> Self {
        metrics.open_streams.inc();
        Self(metrics.open_streams.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
