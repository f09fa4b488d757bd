//! The Redis Pub/Sub link between instances: one publisher connection and one subscriber
//! connection per instance (not one per job), which reconnects with backoff.
//!
//! It carries opaque payloads; what they mean is [`crate::delivery`]'s business. Each message is
//! signed with the deployment's fan-out key (an [`HmacKey`]), and the subscriber hands on only
//! messages whose signature holds: anyone else able to publish on the channel (another
//! deployment sharing the Redis, a stranger who reached it) moves no browser. Pub/Sub reaches
//! only the subscribers connected at the moment of the publish, so a message is a fast hint,
//! never the truth: after every (re)subscribe, and every `HANDOFF_RESYNC_SECS` while the link is
//! up, the [`Listener`] catches up from the store. The periodic catch-up is for a publish that
//! failed while every subscriber stayed connected: it triggers no re-subscribe anywhere.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use crate::auth::HmacKey;

/// Bounds every single Redis round trip, so a completion never waits long on a Redis outage.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first wait before re-subscribing; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// At most one warning about unsigned or forged messages per this long: a flood of them must
/// not become a flood of log lines (each one is counted).
const REJECTED_WARNING_EVERY: Duration = Duration::from_secs(60);

/// How a signed message begins: the format's version, then the tag, then the payload, each
/// after a dot.
const SIGNED_PREFIX: &[u8] = b"v1.";
/// An HMAC-SHA256 tag (32 bytes) in unpadded base64url.
const TAG_LEN: usize = 43;

/// `payload` as a message for `channel` signed with the deployment's `key`:
/// `v1.<tag>.<payload>`, where the tag is HMAC-SHA256 over the channel name, a zero byte and the
/// payload. Every instance of a deployment has the same key; a message under any other key, or
/// none, is not authentic.
fn sign(key: &HmacKey, channel: &str, payload: &[u8]) -> Vec<u8> {
    let tag = URL_SAFE_NO_PAD.encode(key.tag(&[channel.as_bytes(), &[0], payload]));
    let mut message = Vec::with_capacity(SIGNED_PREFIX.len() + TAG_LEN + 1 + payload.len());
    message.extend_from_slice(SIGNED_PREFIX);
    message.extend_from_slice(tag.as_bytes());
    message.push(b'.');
    message.extend_from_slice(payload);
    message
}

/// The payload of `message` when it was signed with `key` for `channel`; `None` for anything
/// else. The tags are compared in constant time.
fn open<'a>(key: &HmacKey, channel: &str, message: &'a [u8]) -> Option<&'a [u8]> {
    let rest = message.strip_prefix(SIGNED_PREFIX)?;
    let (tag, rest) = rest.split_at_checked(TAG_LEN)?;
    let payload = rest.strip_prefix(b".")?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    key.verifies(&[channel.as_bytes(), &[0], payload], &tag)
        .then_some(payload)
}

/// What the subscriber hands on: every message, and the moments a gap may have lost some.
pub trait Listener: Send + Sync + 'static {
    /// An authentic message from the channel, as published (possibly by this instance itself).
    fn receive(&self, payload: &[u8]);

    /// A message on the channel was not signed with this deployment's key, and was dropped
    /// (counted for `/metrics`).
    fn rejected(&self);

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
    /// Signs what is published, and tells authentic messages from the rest.
    key: HmacKey,
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
    pub fn new(url: &str, channel: &str, key: HmacKey) -> redis::RedisResult<Self> {
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
            key,
            subscribed: Arc::new(AtomicBool::new(false)),
        })
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Sends `payload`, signed, to every instance subscribed now; tries twice (the first command
    /// after a dropped link fails), then says why it gave up.
    pub async fn broadcast(&self, payload: &[u8]) -> Result<(), String> {
        let mut command = redis::cmd("PUBLISH");
        command
            .arg(&*self.channel)
            .arg(sign(&self.key, &self.channel, payload));
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

    /// Hands on every authentic message that arrives, and catches up every `resync_interval`;
    /// returns when the link drops (the stream ends).
    async fn receive_until_dropped(&self, pubsub: redis::aio::PubSub) {
        let mut last_warning: Option<tokio::time::Instant> = None;
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
                    let Fanout { key, channel, .. } = &self.fanout;
                    match open(key, channel, message.get_payload_bytes()) {
                        Some(payload) => self.listener.receive(payload),
                        None => {
                            self.listener.rejected();
                            if last_warning.is_none_or(|at| at.elapsed() >= REJECTED_WARNING_EVERY) {
                                last_warning = Some(tokio::time::Instant::now());
                                log::warn!(
                                    "dropped a message on the Redis channel {channel} that is not \
                                     signed with this deployment's key (HANDOFF_FANOUT_KEY, or \
                                     one derived from HANDOFF_API_TOKEN): someone else publishes \
                                     there, or an instance has another key; counted in \
                                     handoff_fanout_rejected_total, warned at most once a minute"
                                );
                            }
                        }
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const CHANNEL: &str = "handoff:completions";

    #[test]
    fn a_signed_message_opens_to_its_payload_under_the_same_key_and_channel_only() {
        let key = HmacKey::new(b"the deployment's secret");
        let payload = br#"{"id":"x","moveUrl":"/next"}"#;
        let signed = sign(&key, CHANNEL, payload);
        assert_eq!(open(&key, CHANNEL, &signed), Some(&payload[..]));
        assert_eq!(
            open(&HmacKey::new(b"another secret"), CHANNEL, &signed),
            None
        );
        assert_eq!(open(&key, "another:channel", &signed), None);
    }

    #[test]
    fn unsigned_tampered_and_truncated_messages_do_not_open() {
        let key = HmacKey::new(b"the deployment's secret");
        let signed = sign(&key, CHANNEL, br#"{"id":"x","moveUrl":"/next"}"#);
        let mut tampered = signed.clone();
        *tampered.last_mut().unwrap() = b' ';
        let mut bad_tag = signed.clone();
        bad_tag[SIGNED_PREFIX.len()] ^= 1;
        for message in [
            br#"{"id":"x","moveUrl":"/next"}"#.to_vec(),
            tampered,
            bad_tag,
            signed[..SIGNED_PREFIX.len() + TAG_LEN].to_vec(),
            signed[1..].to_vec(),
            b"v1.".to_vec(),
            Vec::new(),
        ] {
            assert_eq!(open(&key, CHANNEL, &message), None, "{message:?}");
        }
    }
}
