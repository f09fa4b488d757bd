//! Redis Pub/Sub fan-out: carries a completion from the instance that stored it to every
//! instance, so a browser may wait on one instance while its job completes through another.
//!
//! Pub/Sub reaches only the subscribers connected at the moment of the publish, so a message is a
//! fast hint, never the truth: the store is. Each instance keeps one subscriber connection (not
//! one per job) in a background task; after every (re)subscribe it re-reads from the store the
//! status of every job watched here and delivers what completed meanwhile, and again every
//! `HANDOFF_RESYNC_SECS` while the link is up: a publish that failed on the completing instance
//! while every subscriber stayed connected triggers no re-subscribe anywhere, so only the periodic
//! resync (or the browser's next reconnect) would find it. A dropped link or a failed publish
//! therefore delays a result, never loses it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use crate::domain::{JobId, MoveUrl};
use crate::hub::{Hub, ResultData};
use crate::metrics::Metrics;
use crate::store::Store;

/// Bounds every single Redis round trip, so a completion never waits long on a Redis outage.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first wait before re-subscribing; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One completion on the wire: `{"id":"…","moveUrl":"…"}`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Message {
    id: String,
    #[serde(rename = "moveUrl")]
    move_url: String,
}

impl Message {
    /// Parses a payload another instance published; anything malformed is refused, not delivered.
    fn parse(payload: &[u8]) -> Result<(JobId, ResultData), String> {
        let message: Message =
            serde_json::from_slice(payload).map_err(|e| format!("not a completion: {e}"))?;
        let id = JobId::parse(&message.id).map_err(|e| e.to_string())?;
        let target = MoveUrl::parse(&message.move_url).map_err(|e| e.to_string())?;
        Ok((id, ResultData::to(&target)))
    }
}

/// The Redis side of the hub; cheap to clone.
#[derive(Clone)]
pub struct Fanout {
    client: redis::Client,
    /// Reconnects by itself, but the first command after a drop fails: hence one retry.
    publisher: ConnectionManager,
    channel: Arc<str>,
    /// True while the subscriber is subscribed; `/healthz` reports it.
    subscribed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("channel", &self.channel)
            .field("subscribed", &self.subscribed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Fanout {
    /// Checks the URL and prepares the connections without opening them: an instance starts
    /// while Redis is down and catches up once it is back.
    pub fn new(url: &str, channel: &str) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(ATTEMPT_TIMEOUT))
            .set_response_timeout(Some(ATTEMPT_TIMEOUT))
            .set_number_of_retries(1);
        let publisher = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self {
            client,
            publisher,
            channel: channel.into(),
            subscribed: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Publishes a stored completion to every instance; tries twice, then gives up with a
    /// warning: the completion is stored, and the subscribers' resync covers a lost message.
    pub async fn publish(&self, id: &JobId, target: &MoveUrl) {
        let message = Message {
            id: id.as_str().to_owned(),
            move_url: target.as_str().to_owned(),
        };
        // Serializing two strings cannot fail.
        let payload = serde_json::to_string(&message).unwrap_or_default();
        let mut command = redis::cmd("PUBLISH");
        command.arg(&*self.channel).arg(payload);
        let mut last_error = String::new();
        for _attempt in 0..2 {
            let mut connection = self.publisher.clone();
            let sent = tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                command.query_async::<usize>(&mut connection),
            )
            .await;
            match sent {
                Ok(Ok(_)) => return,
                Ok(Err(err)) => last_error = err.to_string(),
                Err(_) => last_error = format!("no answer within {ATTEMPT_TIMEOUT:?}"),
            }
        }
        log::warn!(
            "job {id}: completion stored but not published to Redis ({last_error}); \
             instances deliver it when they re-read the store after their link comes back"
        );
    }

    /// `Ok` when the subscriber is subscribed and Redis answers a PING; otherwise what is wrong.
    pub async fn check(&self) -> Result<(), &'static str> {
        if !self.subscribed.load(Ordering::Relaxed) {
            return Err("subscriber link down, reconnecting");
        }
        let mut connection = self.publisher.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(ATTEMPT_TIMEOUT, ping.query_async::<String>(&mut connection))
            .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => {
                log::warn!("health check: Redis: {err}");
                Err("not answering")
            }
            Err(_) => Err("not answering within 1 s"),
        }
    }

    /// Starts the one subscriber of this instance; it runs until `shutdown` is cancelled.
    pub fn spawn_subscriber(
        &self,
        hub: Hub,
        store: Store,
        metrics: Metrics,
        resync_interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let subscriber = Subscriber {
            fanout: self.clone(),
            hub,
            store,
            metrics,
            resync_interval,
        };
        tokio::spawn(async move {
            tokio::select! {
                () = subscriber.run() => {}
                () = shutdown.cancelled() => {}
            }
            log::debug!("Redis subscriber stopped");
        })
    }
}

struct Subscriber {
    fanout: Fanout,
    hub: Hub,
    store: Store,
    metrics: Metrics,
    /// How often the watched jobs are re-read while subscribed.
    resync_interval: Duration,
}

impl Subscriber {
    /// Subscribe, resync, deliver until the link drops; then wait and start over. Never returns.
    async fn run(self) {
        let mut backoff = MIN_BACKOFF;
        let mut ever_subscribed = false;
        loop {
            match self.subscribe().await {
                Ok(pubsub) => {
                    if ever_subscribed {
                        self.metrics.redis_reconnects.inc();
                        log::info!("Redis subscriber re-subscribed to {}", self.fanout.channel);
                    }
                    ever_subscribed = true;
                    // Subscribed first, then resync: a completion stored after the store read
                    // is published after the subscribe, so one of the two sees it.
                    match self.resync().await {
                        Ok(()) => {
                            backoff = MIN_BACKOFF;
                            self.fanout.subscribed.store(true, Ordering::Relaxed);
                            self.deliver_until_dropped(pubsub).await;
                            self.fanout.subscribed.store(false, Ordering::Relaxed);
                            log::warn!("Redis subscriber link dropped; reconnecting");
                        }
                        // Without a resync a completion may have slipped by: start over.
                        Err(err) => log::warn!("resync after subscribing failed: {err}"),
                    }
                }
                Err(err) => log::warn!("Redis subscriber cannot subscribe: {err}"),
            }
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, String> {
        let attempt = async {
            let mut pubsub = self.fanout.client.get_async_pubsub().await?;
            pubsub.subscribe(&*self.fanout.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
            Ok(Ok(pubsub)) => Ok(pubsub),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// Delivers every completion that arrives, and resyncs every `resync_interval`; returns when
    /// the link drops (the stream ends).
    async fn deliver_until_dropped(&self, pubsub: redis::aio::PubSub) {
        let mut messages = pubsub.into_on_message();
        // The resync right after subscribing has just run: the first periodic one is due a full
        // interval later.
        let mut resync = tokio::time::interval_at(
            tokio::time::Instant::now() + self.resync_interval,
            self.resync_interval,
        );
        // After a slow resync, wait a full interval again rather than catching up in a burst.
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { return };
                    match Message::parse(message.get_payload_bytes()) {
                        Ok((id, data)) => {
                            self.hub.deliver(&id, data);
                        }
                        Err(err) => {
                            log::warn!("ignoring a message on {}: {err}", self.fanout.channel);
                        }
                    }
                }
                _ = resync.tick() => {
                    // Messages wait in the connection's buffer meanwhile; none is lost. A failed
                    // read is retried at the next tick, and the link stays up.
                    if let Err(err) = self.resync().await {
                        log::warn!("periodic resync failed: {err}");
                    }
                }
            }
        }
    }

    /// Delivers every job watched here that completed while no message could reach us. Costs
    /// nothing while no job is watched, and one query per 500 watched jobs otherwise.
    async fn resync(&self) -> Result<(), crate::store::StoreError> {
        let watched = self.hub.watched_ids();
        if watched.is_empty() {
            return Ok(());
        }
        let mut delivered = 0;
        for job in self.store.completed_among(&watched).await? {
            delivered += self.hub.deliver(&job.id, ResultData::for_job(&job));
        }
        if delivered > 0 {
            self.metrics.resync_deliveries.inc_by(delivered as u64);
            log::info!("resync delivered {delivered} result(s) that no message brought");
        }
        Ok(())
    }
}

/// Adds up to a quarter of random delay, so instances cut off together do not return in lockstep.
fn jittered(backoff: Duration) -> Duration {
    let max_extra = backoff.as_millis() as u64 / 4;
    backoff + Duration::from_millis(rand::random_range(0..=max_extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_message_parses_back_into_the_same_result() {
        let id = JobId::generate();
        let target = MoveUrl::parse("/done?x=\"1\"").unwrap();
        let payload = serde_json::to_vec(&Message {
            id: id.as_str().to_owned(),
            move_url: target.as_str().to_owned(),
        })
        .unwrap();
        let (parsed, data) = Message::parse(&payload).unwrap();
        assert_eq!(parsed, id);
        assert_eq!(data, ResultData::to(&target));
    }

    #[test]
    fn a_malformed_or_hostile_message_is_refused() {
        let id = JobId::generate();
        for payload in [
            "not json".to_owned(),
            r#"{"id":"short","moveUrl":"/x"}"#.to_owned(),
            format!(r#"{{"id":"{id}","moveUrl":"https://evil.example"}}"#),
        ] {
            assert!(Message::parse(payload.as_bytes()).is_err(), "{payload}");
        }
    }
}
