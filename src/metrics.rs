//! Counters, gauges and latency histograms for `/metrics`, in the Prometheus text format.
//!
//! The histograms stay on by default, so each measuring point is a clock read or two and one
//! histogram update (a short lock on that histogram alone); label sets are looked up once where
//! they can be (per ending, not per stream). Every label value is from a fixed set, or a route
//! template: never a job id. The README's "Monitoring" section says what each one measures.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The upper bounds of every latency histogram's buckets, in seconds: 100 µs to 10 s, three a
/// decade (1, 2.5, 5), as Centrifugo's pub/sub lag buckets span. A local delivery takes well
/// under a millisecond, a commit a few, a slow webhook seconds: all land inside.
const SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A stream lives up to `HANDOFF_SSE_TIMEOUT_SECS` (60 s by default, often more), so its
/// lifetime's buckets go on past the latency ones.
const STREAM_SECONDS: [f64; 20] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

fn seconds() -> Histogram {
    Histogram::new(SECONDS)
}

fn stream_seconds() -> Histogram {
    Histogram::new(STREAM_SECONDS)
}

/// Rows per statement: 1 to 1,024 in doublings (a batch holds at most 64 today).
fn rows() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// A family of histograms whose labels are all from fixed sets.
type Histograms<const N: usize> =
    Family<[(&'static str, &'static str); N], Histogram, fn() -> Histogram>;

/// The labels of `handoff_http_request_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's template (`/api/jobs/{id}/complete`), `unmatched` for any other path.
    route: String,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    status: &'static str,
}

/// Every figure Handoff reports; cheap to clone (all handles share their values).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub open_streams: Gauge,
    pub watched_jobs: Gauge,
    /// By `kind`: `create`, `end`, `upkeep`.
    pub writes_waiting: Family<[(&'static str, &'static str); 1], Gauge>,
    /// How many writes of each kind may wait; the next is refused (`503`).
    pub write_room: Family<[(&'static str, &'static str); 1], Gauge>,
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
    /// From an ending's commit to a stream here taking it to write, by `path` (see
    /// [`DeliveryPath`]).
    delivery: Histograms<1>,
    /// The statements of the store's lanes.
    pub store: StoreTimings,
    http_requests: Family<RouteLabels, Histogram, fn() -> Histogram>,
    stream_durations: Histogram,
    pub webhook_send: Histogram,
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
            write_room: Family::default(),
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
            delivery: Family::new_with_constructor(seconds),
            store: StoreTimings::default(),
            http_requests: Family::new_with_constructor(seconds),
            stream_durations: stream_seconds(),
            webhook_send: seconds(),
        };
        // Every fixed label value is shown from the start (with no observation yet), so that a
        // query or an alert on a path that has not been taken yet finds a series, not nothing.
        for path in DeliveryPath::ALL {
            metrics
                .delivery
                .get_or_create_owned(&[("path", path.name())]);
        }
        for (lane, kind) in statement::ALL {
            metrics
                .store
                .seconds
                .get_or_create_owned(&[("lane", lane), ("kind", kind)]);
            metrics
                .store
                .rows
                .get_or_create_owned(&[("lane", lane), ("kind", kind)]);
        }
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
            "write_room",
            "How many writes of each kind may wait for the write lane; the next is refused (503)",
            metrics.write_room.clone(),
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
        registry.register(
            "delivery_seconds",
            "From an ending's commit to a stream here taking it to write, by path (local, redis, \
             catchup); a redis delivery is timed from the committing instance's clock",
            metrics.delivery.clone(),
        );
        registry.register(
            "store_commit_seconds",
            "How long one statement of the store's lanes took, its commit included, by lane and kind",
            metrics.store.seconds.clone(),
        );
        registry.register(
            "store_batch_rows",
            "Rows (requests) one statement of the store's lanes took, by lane and kind",
            metrics.store.rows.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "From a request's arrival to its answer's head, by route template and status class \
             (for a stream, until it starts)",
            metrics.http_requests.clone(),
        );
        registry.register(
            "stream_duration_seconds",
            "How long event streams lived, from admission to their end",
            metrics.stream_durations.clone(),
        );
        registry.register(
            "webhook_send_seconds",
            "How long a webhook POST took, to the receiver's answer or the timeout",
            metrics.webhook_send.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    /// An ending committed just now (by this instance), or `age` ago on the committing
    /// instance's clock, reaching this instance by `path`.
    pub fn committed(&self, path: DeliveryPath, age: Duration) -> Committed {
        let now = Instant::now();
        Committed {
            at: now.checked_sub(age).unwrap_or(now),
            histogram: self.delivery.get_or_create_owned(&[("path", path.name())]),
        }
    }

    /// Counts a request to `route` (a template; `None`: no route matched) answered with
    /// `status` after `took`.
    pub fn request_answered(&self, route: Option<String>, status: u16, took: Duration) {
        let status = match status {
            0..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let route = route.unwrap_or_else(|| "unmatched".to_owned());
        self.http_requests
            .get_or_create(&RouteLabels { route, status })
            .observe(took.as_secs_f64());
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Counts one open stream for as long as it lives; dropping it (however the stream ends) uncounts
/// it and records how long it lived.
#[derive(Debug)]
pub struct StreamGuard {
    open: Gauge,
    lifetimes: Histogram,
    opened: Instant,
}

impl StreamGuard {
    pub fn new(metrics: &Metrics) -> Self {
        metrics.open_streams.inc();
        Self {
            open: metrics.open_streams.clone(),
            lifetimes: metrics.stream_durations.clone(),
            opened: Instant::now(),
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.open.dec();
        self.lifetimes.observe(self.opened.elapsed().as_secs_f64());
    }
}

/// Which way an ending reached the streams here: the `path` label of `handoff_delivery_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryPath {
    /// Committed by this instance and handed to its own streams.
    Local,
    /// Committed by another instance and received in its Redis message.
    Redis,
    /// Found ended in the store by the catch-up read (after a Redis gap, or at a resync).
    CatchUp,
}

impl DeliveryPath {
    const ALL: [Self; 3] = [Self::Local, Self::Redis, Self::CatchUp];

    fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Redis => "redis",
            Self::CatchUp => "catchup",
        }
    }
}

/// When an ending was committed, travelling with it to the streams: each stream that takes it
/// to write records the time since in `handoff_delivery_seconds` under its path.
#[derive(Debug, Clone)]
pub struct Committed {
    at: Instant,
    histogram: Histogram,
}

impl Committed {
    /// A stream takes the ending to write it now.
    pub fn delivered(&self) {
        self.histogram.observe(self.at.elapsed().as_secs_f64());
    }
}

/// `handoff_store_commit_seconds` and `handoff_store_batch_rows`; cheap to clone. A store made
/// without [`Metrics`] (a test, the write floor's bench) has its own, which nobody reads.
#[derive(Debug, Clone)]
pub struct StoreTimings {
    seconds: Histograms<2>,
    rows: Histograms<2>,
}

impl Default for StoreTimings {
    fn default() -> Self {
        Self {
            seconds: Family::new_with_constructor(seconds),
            rows: Family::new_with_constructor(rows),
        }
    }
}

/// The statements the store's lanes time, as their `(lane, kind)` labels.
pub mod statement {
    pub type Labels = (&'static str, &'static str);
    /// The read lane's batched status read.
    pub const READ: Labels = ("read", "read");
    pub const CREATE: Labels = ("write", "create");
    /// Completions and failures.
    pub const END: Labels = ("write", "end");
    /// The timers' store of the latest progress reports.
    pub const PROGRESS: Labels = ("write", "progress");
    /// The expiry sweep.
    pub const EXPIRE: Labels = ("write", "expire");
    /// The streams' receipts for webhooks.
    pub const RECEIPTS: Labels = ("write", "receipts");
    pub(super) const ALL: [Labels; 6] = [READ, CREATE, END, PROGRESS, EXPIRE, RECEIPTS];
}

impl StoreTimings {
    /// Runs `statement`, one statement of `lane` for `rows` requests, and records how long it
    /// took (commit included) and its rows, whether it succeeded or not.
    pub async fn time<T>(
        &self,
        (lane, kind): statement::Labels,
        rows: usize,
        statement: impl Future<Output = T>,
    ) -> T {
        let started = Instant::now();
        let done = statement.await;
        let labels = [("lane", lane), ("kind", kind)];
        self.seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        self.rows.get_or_create(&labels).observe(rows as f64);
        done
    }
}

/// Runs `work` and records how long it took in `histogram`.
pub async fn timed<T>(histogram: &Histogram, work: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let done = work.await;
    histogram.observe(started.elapsed().as_secs_f64());
    done
}
