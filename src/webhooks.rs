//! Delivery webhooks (README, "Webhooks"): with `HANDOFF_WEBHOOK_URL` set, each job that ends is
//! reported to the deployment's backend, once: `delivered` when streams took its ending (with how
//! many), `unclaimed` when none did within `HANDOFF_UNCLAIMED_SECS`.
//!
//! The store keeps the truth, in the webhook outbox: a job's row is written in the transaction
//! that ends it (`store`), so no crash loses one. This module owns the rest:
//! - [`Receipts`]: the streams here that wrote an ending, counted in memory and recorded in one
//!   statement per timers round, never one per stream;
//! - [`Sender`]: claims due webhooks (a conditional update with a lease: one instance sends
//!   each), signs and POSTs them, and records each attempt's outcome with its retry, bounded in
//!   count and age;
//! - [`signature`]: the `Handoff-Signature` header, `t=<unix seconds>,v1=<hex>`, an
//!   HMAC-SHA256 over `<t>.<body>` under the webhook secret, as Stripe's signatures are made.
//!
//! The sender runs in a task of its own with a timeout on every request and a bound on how many
//! are in flight, so a slow or failing receiver delays only webhooks, never an ending or a
//! stream. It calls the configured URL and nothing else: no request chooses an address, no
//! redirect is followed, no proxy is taken from the environment.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use reqwest::header::CONTENT_TYPE;
use tokio_util::sync::CancellationToken;

use crate::auth::HmacKey;
use crate::config::{ExposeSecret, WebhookConfig};
use crate::domain::{JobId, millis, now_millis, rfc3339};
use crate::metrics::{self, Metrics};
use crate::store::{DueWebhook, Settled, Store};

/// How long after the first stream took an ending its `delivered` webhook waits, so that the
/// streams of the user's other tabs (and other instances) are counted too.
pub const DELIVERED_GRACE: Duration = Duration::from_secs(1);
/// How often the sender looks for due webhooks.
const TICK: Duration = Duration::from_millis(500);
/// The most webhooks in flight at once, and claimed at once.
const IN_FLIGHT: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An attempt that has no answer (status line and headers) by then has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claim holds a webhook: far longer than an attempt takes, so only a claimer that
/// died (or lost its database) leaves its webhooks to another instance, which takes them then.
const LEASE: Duration = Duration::from_secs(30);
/// The longest wait between two attempts.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(3600);

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Handoff-Signature";
/// The header carrying the webhook's id (also in the body), for a receiver dropping duplicates.
pub const ID_HEADER: &str = "Handoff-Webhook-Id";
/// The header carrying the attempt's number, from 1.
pub const ATTEMPT_HEADER: &str = "Handoff-Webhook-Attempt";

/// The `Handoff-Signature` value for `body` sent at `timestamp` (Unix seconds), under the
/// deployment's webhook secret `key`: `t=<timestamp>,v1=<hex of HMAC-SHA256 over
/// "<timestamp>.<body>">`. The timestamp is signed so that a receiver can refuse an old webhook
/// replayed.
pub fn signature(key: &HmacKey, timestamp: i64, body: &[u8]) -> String {
    let tag = key.tag(&[timestamp.to_string().as_bytes(), b".", body]);
    format!("t={timestamp},v1={}", hex::encode(tag))
}

/// The streams here that wrote each job's ending since the last record; cheap to clone. Only
/// made with webhooks on.
#[derive(Debug, Clone, Default)]
pub struct Receipts(Arc<Mutex<HashMap<JobId, i64>>>);

impl Receipts {
    /// One stream wrote job `id`'s ending.
    pub fn record(&self, id: &JobId) {
        *self.0.lock().entry(id.clone()).or_default() += 1;
    }

    /// Records what was counted since the last call in one statement. A failure is logged and
    /// the counts are lost: the webhook is then `unclaimed` or counts fewer streams, never lost.
    pub async fn store(&self, store: &Store) {
        let taken: Vec<(JobId, i64)> = std::mem::take(&mut *self.0.lock()).into_iter().collect();
        if taken.is_empty() {
            return;
        }
        let due = now_millis().saturating_add(millis(DELIVERED_GRACE));
        if let Err(err) = store.record_receipts(taken, due).await {
            log::warn!("recording which streams took their job's ending failed: {err}");
        }
    }
}

/// What a webhook's body says.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Payload<'a> {
    /// The same for every attempt of this webhook, and one webhook per job.
    id: &'a str,
    /// `delivered` or `unclaimed`.
    #[serde(rename = "type")]
    kind: &'static str,
    job_id: &'a str,
    /// `complete`, `failed` or `expired`.
    status: &'static str,
    ended_at: String,
    /// How many streams wrote the ending (0 for `unclaimed`).
    streams: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered_at: Option<String>,
}

/// The webhook id of job `job`'s webhook.
fn webhook_id(job: &JobId) -> String {
    format!("whk_{job}")
}

fn kind(webhook: &DueWebhook) -> &'static str {
    if webhook.delivered {
        "delivered"
    } else {
        "unclaimed"
    }
}

fn body(webhook: &DueWebhook, id: &str) -> Vec<u8> {
    let payload = Payload {
        id,
        kind: kind(webhook),
        job_id: webhook.job.as_str(),
        status: webhook.status.as_str(),
        ended_at: rfc3339(webhook.ended_at),
        streams: webhook.streams,
        delivered_at: webhook.delivered_at.map(rfc3339),
    };
    // Serializing strings and numbers cannot fail.
    serde_json::to_vec(&payload).unwrap_or_default()
}

/// Why the sender cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// For an https:// URL, the client needs the system's CA certificates.
    #[error("cannot set up the HTTP client for HANDOFF_WEBHOOK_URL: {0}")]
    Client(String),
}

/// Sends the due webhooks of the outbox, from any instance's endings; cheap to clone.
#[derive(Clone)]
pub struct Sender {
    store: Store,
    metrics: Metrics,
    client: reqwest::Client,
    url: url::Url,
    /// The URL's host, for logs: its path or query may hold a secret.
    host: Arc<str>,
    key: HmacKey,
    first_retry: Duration,
    attempts: i64,
    max_age: i64,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Sender {
    pub fn new(
        config: &WebhookConfig,
        store: Store,
        metrics: Metrics,
    ) -> Result<Self, WebhookError> {
        let client = crate::http_client::builder(&config.url)
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|err| WebhookError::Client(crate::http_client::describe(err)))?;
        Ok(Self {
            client,
            url: config.url.clone(),
            host: config.url.host_str().unwrap_or_default().into(),
            key: HmacKey::new(config.secret.expose_secret().as_bytes()),
            first_retry: config.first_retry,
            attempts: i64::from(config.attempts),
            max_age: millis(config.max_age),
            store,
            metrics,
        })
    }

    /// The receiver's host, for the start-up log line.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Until `shutdown`: every [`TICK`], claims the due webhooks, [`IN_FLIGHT`] at a time, and
    /// attempts each. A webhook in flight at shutdown stays claimed until its lease runs out,
    /// then any instance sends it: at least once.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            // A full claim means more may be due: claim again before waiting.
            while self.round().await == IN_FLIGHT && !shutdown.is_cancelled() {}
        }
    }

    /// Claims up to [`IN_FLIGHT`] due webhooks and attempts them together; returns how many.
    async fn round(&self) -> usize {
        let now = now_millis();
        let lease = now.saturating_add(millis(LEASE));
        let claimed = match self
            .store
            .claim_webhooks(now, lease, IN_FLIGHT as i64)
            .await
        {
            Ok(claimed) => claimed,
            Err(err) => {
                log::warn!("claiming due webhooks failed, will retry: {err}");
                return 0;
            }
        };
        let count = claimed.len();
        let attempts =
            futures_util::future::join_all(claimed.iter().map(|webhook| self.attempt(webhook)))
                .await;
        let outcomes: Vec<(&DueWebhook, &Settled)> = claimed
            .iter()
            .zip(&attempts)
            .map(|(webhook, (_, settled))| (webhook, settled))
            .collect();
        let kept = match self.store.settle_webhooks(&outcomes).await {
            Ok(kept) => kept.into_iter().map(Some).collect(),
            Err(err) => {
                // The claims run out, and the webhooks are attempted again then: at least once.
                log::warn!(
                    "recording {count} webhook attempt(s) failed ({err}); they will be retried"
                );
                vec![None; count]
            }
        };
        for ((webhook, (outcome, settled)), kept) in claimed.iter().zip(&attempts).zip(kept) {
            self.record(webhook, *outcome, settled, kept);
        }
        count
    }

    /// One attempt: POSTs the webhook (unless it is too old); says how it went and, after a
    /// failure, when to try again or that it is given up.
    async fn attempt(&self, webhook: &DueWebhook) -> (Option<&'static str>, Settled) {
        let id = webhook_id(&webhook.job);
        let too_old_at = webhook.ended_at.saturating_add(self.max_age);
        if now_millis() > too_old_at {
            let error = "too old to send (HANDOFF_WEBHOOK_MAX_AGE_SECS)".to_owned();
            return (None, self.give_up(error));
        }
        let answer = metrics::timed(&self.metrics.webhook_send, self.post(webhook, &id)).await;
        let now = now_millis();
        match answer {
            Ok(status) if status.is_success() => (Some("accepted"), Settled::Sent { at: now }),
            Ok(status) => (
                Some("refused"),
                self.after_failure(webhook, now, format!("HTTP {status}")),
            ),
            Err(error) => (Some("failed"), self.after_failure(webhook, now, error)),
        }
    }

    /// Counts and logs an attempt once its outcome is recorded (`kept`: whether the outbox took
    /// it; `None`: recording failed, logged for the round).
    fn record(
        &self,
        webhook: &DueWebhook,
        outcome: Option<&'static str>,
        settled: &Settled,
        kept: Option<bool>,
    ) {
        let id = webhook_id(&webhook.job);
        if kept == Some(false) {
            log::warn!(
                "webhook {id}: its claim ran out during the attempt; another instance has it"
            );
        }
        let kept = kept == Some(true);
        // Counted once its outcome is recorded (or could not be), so that a count seen in
        // `/metrics` means the outbox says the same.
        if let Some(outcome) = outcome {
            self.metrics
                .webhook_attempts
                .get_or_create(&[("outcome", outcome)])
                .inc();
        }
        let (kind, attempt, job) = (kind(webhook), webhook.attempt, &webhook.job);
        match settled {
            Settled::Sent { .. } => {
                self.metrics
                    .webhooks_sent
                    .get_or_create(&[("type", kind)])
                    .inc();
                log::info!(job:% = job, webhook:% = id;
                    "webhook {id} ({kind}, job {job}) accepted by {} at attempt {attempt}",
                    self.host
                );
            }
            Settled::Retry { due, error } => log::warn!(job:% = job, webhook:% = id;
                "webhook {id} ({kind}, job {job}) attempt {attempt} of {} to {} failed: {error}; \
                 next attempt in {} ms",
                self.attempts,
                self.host,
                due.saturating_sub(now_millis()).max(0)
            ),
            Settled::Dead { error, .. } => {
                if kept {
                    self.metrics.webhooks_given_up.inc();
                }
                log::error!(job:% = job, webhook:% = id;
                    "webhook {id} ({kind}, job {job}) given up after attempt {attempt}: {error}"
                );
            }
        }
    }

    /// What follows a failed attempt: a retry after a wait that doubles with each attempt,
    /// unless the attempts or the age are used up.
    fn after_failure(&self, webhook: &DueWebhook, now: i64, error: String) -> Settled {
        let doublings = u32::try_from(webhook.attempt.saturating_sub(1))
            .unwrap_or(u32::MAX)
            .min(20);
        let wait = self
            .first_retry
            .saturating_mul(1 << doublings)
            .min(MAX_RETRY_WAIT);
        let due = now.saturating_add(millis(wait));
        if webhook.attempt >= self.attempts {
            self.give_up(format!(
                "{error} (attempt {} of {})",
                webhook.attempt, self.attempts
            ))
        } else if due > webhook.ended_at.saturating_add(self.max_age) {
            self.give_up(format!(
                "{error} (the next attempt would be past HANDOFF_WEBHOOK_MAX_AGE_SECS)"
            ))
        } else {
            Settled::Retry { due, error }
        }
    }

    fn give_up(&self, error: String) -> Settled {
        Settled::Dead {
            at: now_millis(),
            error,
        }
    }

    /// POSTs `webhook`, signed now, to the configured URL; the answer's status, or why there
    /// was none.
    async fn post(&self, webhook: &DueWebhook, id: &str) -> Result<reqwest::StatusCode, String> {
        let body = body(webhook, id);
        let signature = signature(&self.key, now_millis() / 1000, &body);
        let request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ID_HEADER, id)
            .header(ATTEMPT_HEADER, webhook.attempt)
            .header(SIGNATURE_HEADER, signature)
            .body(body)
            .send();
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            // The body is not read: only the status counts, and dropping it closes the
            // connection, which a slow receiver cannot hold open.
            Ok(Ok(response)) => Ok(response.status()),
            Ok(Err(err)) => Err(crate::http_client::describe(err)),
            Err(_) => Err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::JobStatus;

    /// The vector was computed apart from this code, with Python's `hmac`:
    /// `hmac.new(b"whsec-test-0123456789", b"1764583200." + body, "sha256").hexdigest()`.
    #[test]
    fn the_signature_is_hmac_sha256_over_timestamp_dot_body_in_hex() {
        let key = HmacKey::new(b"whsec-test-0123456789");
        let body = br#"{"id":"whk_x","type":"delivered"}"#;
        assert_eq!(
            signature(&key, 1_764_583_200, body),
            "t=1764583200,v1=e437f1c470c4d20f6cbd9db1fcf71827a5e6058e4e896587b7ae19c9b4530041"
        );
        assert_ne!(
            signature(&key, 1_764_583_201, body),
            signature(&key, 1_764_583_200, body),
            "the timestamp is signed"
        );
    }

    #[test]
    fn the_body_says_what_happened_to_the_job_and_names_the_webhook() {
        let job = JobId::generate();
        let mut webhook = DueWebhook {
            job: job.clone(),
            status: JobStatus::Failed,
            delivered: true,
            streams: 2,
            ended_at: 1_764_583_200_000,
            delivered_at: Some(1_764_583_200_250),
            attempt: 1,
            lease: 0,
        };
        let id = webhook_id(&job);
        let parsed: serde_json::Value = serde_json::from_slice(&body(&webhook, &id)).unwrap();
        assert_eq!(
            parsed,
            serde_json::json!({
                "id": id, "type": "delivered", "jobId": job.as_str(), "status": "failed",
                "endedAt": "2025-12-01T10:00:00.000Z", "streams": 2,
                "deliveredAt": "2025-12-01T10:00:00.250Z",
            })
        );
        webhook.delivered = false;
        webhook.streams = 0;
        webhook.delivered_at = None;
        let parsed: serde_json::Value = serde_json::from_slice(&body(&webhook, &id)).unwrap();
        assert_eq!(parsed["type"], "unclaimed");
        assert!(parsed.get("deliveredAt").is_none(), "{parsed}");
    }
}
