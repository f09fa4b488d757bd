//! The Redis Pub/Sub link between instances: one publisher connection and one subscriber
//! connection per instance (not one per job), which reconnects with backoff.
//!
//! It carries opaque payloads; what they mean is [`crate::delivery`]'s business. Pub/Sub reaches
//! only the subscribers connected at the moment of the publish, so a message is a fast hint,
//! never the truth: after every (re)subscribe, and every `HANDOFF_RESYNC_SECS` while the link is
//! up, the [`Listener`] catches up from the store. The periodic catch-up is for a publish that
//! failed while every subscriber stayed connected: it triggers no re-subscribe anywhere.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

/// Bounds every single Redis round trip, so a completion never waits long on a Redis outage.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first wait before re-subscribing; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the subscriber hands on: every message, and the moments a gap may have lost some.
pub trait Listener: Send + Sync + 'static {
    /// A message from the channel, as published (possibly by this instance itself).
    fn receive(&self, payload: &[u8]);

    /// Finds what messages may have missed, from the store: after every (re)subscribe and
    /// every resync interval. Until it succeeds once after a subscribe, the link counts as down.
    fn catch_up(&self) -> impl Future<Output = Result<(), String>> + Send;

    /// The link dropped and is back (counted for `/metrics`).
    fn resubscribed(&self);
}

/// The Redis link of one instance; cheap to clone.
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

    /// Sends `payload` to every instance subscribed now; tries twice (the first command after a
    /// dropped link fails), then says why it gave up.
    pub async fn broadcast(&self, payload: &[u8]) -> Result<(), String> {
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
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(err)) => last_error = err.to_string(),
                Err(_) => last_error = format!("no answer within {ATTEMPT_TIMEOUT:?}"),
            }
        }
        Err(last_error)
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
        listener: impl Listener,
        resync_interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let subscriber = Subscriber {
            fanout: self.clone(),
            listener,
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

struct Subscriber<L> {
    fanout: Fanout,
    listener: L,
    /// How often the listener catches up while subscribed.
    resync_interval: Duration,
}

impl<L: Listener> Subscriber<L> {
    /// Subscribe, catch up, hand on messages until the link drops; then wait and start over.
    /// Never returns.
    async fn run(self) {
        let mut backoff = MIN_BACKOFF;
        let mut ever_subscribed = false;
        loop {
            match self.subscribe().await {
                Ok(pubsub) => {
                    if ever_subscribed {
                        self.listener.resubscribed();
                        log::info!("Redis subscriber re-subscribed to {}", self.fanout.channel);
                    }
                    ever_subscribed = true;
                    // Subscribed first, then catch up: an ending stored after the store read is
                    // published after the subscribe, so one of the two sees it.
                    match self.listener.catch_up().await {
                        Ok(()) => {
                            backoff = MIN_BACKOFF;
                            self.fanout.subscribed.store(true, Ordering::Relaxed);
                            self.receive_until_dropped(pubsub).await;
                            self.fanout.subscribed.store(false, Ordering::Relaxed);
                            log::warn!("Redis subscriber link dropped; reconnecting");
                        }
                        // Without a catch-up a message may have slipped by: start over.
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

    /// Hands on every message that arrives, and catches up every `resync_interval`; returns
    /// when the link drops (the stream ends).
    async fn receive_until_dropped(&self, pubsub: redis::aio::PubSub) {
        let mut messages = pubsub.into_on_message();
        // The catch-up right after subscribing has just run: the first periodic one is due a
        // full interval later.
        let mut resync = tokio::time::interval_at(
            tokio::time::Instant::now() + self.resync_interval,
            self.resync_interval,
        );
        // After a slow catch-up, wait a full interval again rather than catching up in a burst.
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { return };
                    self.listener.receive(message.get_payload_bytes());
                }
                _ = resync.tick() => {
                    // Messages wait in the connection's buffer meanwhile; none is lost. A failed
                    // read is retried at the next tick, and the link stays up.
                    if let Err(err) = self.listener.catch_up().await {
                        log::warn!("periodic resync failed: {err}");
                    }
                }
            }
        }
    }
}

/// Adds up to a quarter of random delay, so instances cut off together do not return in lockstep.
fn jittered(backoff: Duration) -> Duration {
    let max_extra = backoff.as_millis() as u64 / 4;
    backoff + Duration::from_millis(rand::random_range(0..=max_extra))
}
