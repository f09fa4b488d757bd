//! The Redis Pub/Sub link between instances: one publisher connection and one subscriber
//! connection per instance (not one per job), which reconnects with backoff.
//!
//! Routed: a job's news goes to the job's own channel, `<HANDOFF_REDIS_CHANNEL>:{<id>}`, and an
//! instance subscribes only to the channels of the jobs its open streams watch (the hub says when
//! a job's first stream opens and its last leaves); a job's channel stays subscribed a moment
//! after its last stream leaves ([`LINGER`]), so a reconnecting tab costs no command. On a
//! Redis Cluster (`HANDOFF_REDIS_CLUSTER=on`) the job channels are sharded (`SSUBSCRIBE`,
//! `SPUBLISH`): a channel's traffic stays on the node owning its slot. For the upgrade from the
//! single channel, every message also goes to the old channel unless that is `off`, and while a
//! fleet is mixed may be heard there ([`LegacyChannel`]).
//!
//! It carries opaque payloads; what they mean is [`crate::delivery`]'s business. Each message is
//! signed with the deployment's fan-out key (an [`HmacKey`]), and the subscriber hands on only
//! messages whose signature holds: anyone else able to publish on the channel (another
//! deployment sharing the Redis, a stranger who reached it) moves no browser. Pub/Sub reaches
//! only the subscribers connected at the moment of the publish, so a message is a fast hint,
//! never the truth: after every (re)subscribe, and every `HANDOFF_RESYNC_SECS` while the link is
//! up, the [`Listener`] catches up from the store. The periodic catch-up is for a publish that
//! failed while every subscriber stayed connected: it triggers no re-subscribe anywhere.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_util::sync::CancellationToken;

use crate::auth::HmacKey;
use crate::config::LegacyChannel;
use crate::domain::JobId;

/// Bounds every single Redis round trip, so a completion never waits long on a Redis outage.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// The first wait before re-subscribing; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// At most one warning about unsigned or forged messages per this long: a flood of them must
/// not become a flood of log lines (each one is counted).
const REJECTED_WARNING_EVERY: Duration = Duration::from_secs(60);
/// How long a job's channel stays subscribed after its last stream here left: an `EventSource`
/// reconnects within `HANDOFF_SSE_RETRY_MS`, and a storm of connects and disconnects then costs
/// no command at all. Unsubscribes go out in batches, at most one batch per this long.
const LINGER: Duration = Duration::from_secs(5);
/// How many times in a row the subscriber tries to subscribe again on a cluster link that lost a
/// node before it opens a new link: the old link's slot map may still name a master that died,
/// and the client reconnects to that node but never re-reads the slots; a new link does.
const REPAIRS_BEFORE_NEW_LINK: u32 = 3;
/// Channels per `SUBSCRIBE`/`UNSUBSCRIBE` on a single Redis (a cluster takes one per command,
/// since the channels of one command must share a slot).
const BATCH: usize = 512;

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
    /// An authentic message, as published (possibly by this instance itself); `legacy` when it
    /// came on the single channel of the releases before routing.
    fn receive(&self, payload: &[u8], legacy: bool);

    /// A message arrived on a channel, before its signature is checked (counted for `/metrics`).
    fn arrived(&self);

    /// A message on the channel was not signed with this deployment's key, and was dropped
    /// (counted for `/metrics`).
    fn rejected(&self);

    /// Finds what messages may have missed, from the store: every job watched here (`None`:
    /// after every (re)subscribe and every resync interval; until it succeeds once after a
    /// subscribe, the link counts as down), or only `jobs`, whose streams read the store
    /// before their channel's subscription was confirmed.
    fn catch_up(&self, jobs: Option<Vec<JobId>>)
    -> impl Future<Output = Result<(), String>> + Send;

    /// The link dropped and is back (counted for `/metrics`).
    fn resubscribed(&self);
}

/// Where the instances of a deployment meet: one Redis, or a Redis Cluster.
#[derive(Clone)]
enum Server {
    Single(redis::Client),
    Cluster(Box<ClusterClient>),
}

/// The publishing connection.
#[derive(Clone)]
enum Publisher {
    /// Reconnects by itself, but the first command after a drop fails: hence one retry.
    Single(ConnectionManager),
    /// Made at the first publish (a cluster connection cannot be made lazily), and made anew
    /// after a failed attempt: a cluster connection whose slot map still names a master that
    /// died keeps sending that master's slots to it (the client reconnects to the node but does
    /// not re-read the slots), while a new one reads the topology afresh.
    Cluster(Arc<Mutex<Arc<tokio::sync::OnceCell<ClusterConnection>>>>),
}

/// One job channel this instance subscribes to, or is about to drop.
#[derive(Debug)]
struct Route {
    /// A stream here watches the job.
    wanted: bool,
    /// When the last stream here left it (then it is unsubscribed after [`LINGER`]).
    idle_since: Option<Instant>,
    /// True once subscribed on the current link.
    confirmed: tokio::sync::watch::Sender<bool>,
    /// A stream read the store before the subscription was confirmed: the subscriber catches up
    /// on this job once it is.
    unguarded: bool,
}

/// The job channels this instance wants, shared by the hub's hooks, the streams waiting for
/// their subscription, and the subscriber that sends the commands.
#[derive(Debug, Default)]
struct Routes {
    routes: Mutex<HashMap<JobId, Route>>,
    /// Wakes the subscriber: a route awaits its subscription.
    wanted: tokio::sync::Notify,
}

impl Routes {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<JobId, Route>> {
        self.routes.lock()
    }
}

/// The Redis link of one instance; cheap to clone.
#[derive(Clone)]
pub struct Fanout {
    server: Server,
    publisher: Publisher,
    /// The single channel of the releases before routing, and the prefix of every job channel.
    channel: Arc<str>,
    /// What to do with `channel` (the upgrade from a fleet on the single channel).
    legacy: LegacyChannel,
    /// Signs what is published, and tells authentic messages from the rest.
    key: HmacKey,
    /// True while the subscriber is subscribed; `/healthz` reports it.
    subscribed: Arc<AtomicBool>,
    routes: Arc<Routes>,
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("channel", &self.channel)
            .field("cluster", &matches!(self.server, Server::Cluster(_)))
            .field("legacy", &self.legacy)
            .field("subscribed", &self.subscribed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// How a [`Fanout`] reaches Redis.
#[derive(Debug, Clone)]
pub struct FanoutConfig<'a> {
    /// One `redis://…` URL, or with `cluster` a comma-separated list of seed nodes.
    pub url: &'a str,
    pub cluster: bool,
    /// The single channel, and the prefix of the job channels.
    pub channel: &'a str,
    /// Publish to, or also listen on, the single channel.
    pub legacy: LegacyChannel,
}

impl Fanout {
    /// Checks the URL and prepares the connections without opening them: an instance starts
    /// while Redis is down and catches up once it is back.
    pub fn new(config: &FanoutConfig<'_>, key: HmacKey) -> redis::RedisResult<Self> {
        let (server, publisher) = if config.cluster {
            let seeds: Vec<&str> = config.url.split(',').map(str::trim).collect();
            let client = ClusterClient::builder(seeds)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .connection_timeout(ATTEMPT_TIMEOUT)
                .response_timeout(ATTEMPT_TIMEOUT)
                .build()?;
            (
                Server::Cluster(Box::new(client)),
                Publisher::Cluster(Arc::default()),
            )
        } else {
            let mut info = redis::IntoConnectionInfo::into_connection_info(config.url)?;
            // Subscribing on a multiplexed connection takes RESP3 (Redis 6+).
            let redis_settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            info = info.set_redis_settings(redis_settings);
            let client = redis::Client::open(info)?;
            let manager = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(ATTEMPT_TIMEOUT))
                .set_response_timeout(Some(ATTEMPT_TIMEOUT))
                .set_number_of_retries(1);
            let publisher = ConnectionManager::new_lazy_with_config(client.clone(), manager)?;
            (Server::Single(client), Publisher::Single(publisher))
        };
        Ok(Self {
            server,
            publisher,
            channel: config.channel.into(),
            legacy: config.legacy,
            key,
            subscribed: Arc::new(AtomicBool::new(false)),
            routes: Arc::default(),
        })
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The channel of one job's news. The braces make the id the cluster hash tag, so a job's
    /// channel lives on one shard.
    pub fn job_channel(&self, id: &JobId) -> String {
        format!("{}:{{{id}}}", self.channel)
    }

    /// Sends `payload`, signed, to every instance subscribed now to the job's channel (and, while
    /// upgrading, to the single channel); tries twice (the first command after a dropped link
    /// fails), then says why it gave up.
    pub async fn broadcast(&self, id: &JobId, payload: &[u8]) -> Result<(), String> {
        let channel = self.job_channel(id);
        let sharded = matches!(self.server, Server::Cluster(_));
        let routed = self.publish(sharded, &channel, payload);
        if self.legacy == LegacyChannel::Off {
            return routed.await;
        }
        let (routed, legacy) = tokio::join!(routed, self.publish(false, &self.channel, payload));
        routed.and(legacy)
    }

    async fn publish(&self, sharded: bool, channel: &str, payload: &[u8]) -> Result<(), String> {
        let mut command = redis::cmd(if sharded { "SPUBLISH" } else { "PUBLISH" });
        command.arg(channel).arg(sign(&self.key, channel, payload));
        let mut last_error = String::new();
        for _attempt in 0..2 {
            match tokio::time::timeout(ATTEMPT_TIMEOUT, self.send(&command)).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(err)) => last_error = err.to_string(),
                Err(_) => last_error = format!("no answer within {ATTEMPT_TIMEOUT:?}"),
            }
            if let Publisher::Cluster(current) = &self.publisher {
                // The next attempt goes out on a new connection (see `Publisher::Cluster`).
                *current.lock() = Arc::default();
            }
        }
        Err(last_error)
    }

    async fn send(&self, command: &redis::Cmd) -> redis::RedisResult<usize> {
        match &self.publisher {
            Publisher::Single(manager) => command.query_async(&mut manager.clone()).await,
            Publisher::Cluster(current) => {
                let Server::Cluster(client) = &self.server else {
                    unreachable!("a cluster publisher goes with a cluster")
                };
                let cell = current.lock().clone();
                let connection = cell
                    .get_or_try_init(|| client.get_async_connection())
                    .await?;
                command.query_async(&mut connection.clone()).await
            }
        }
    }

    /// `Ok` when the subscriber is subscribed and Redis answers a PING; otherwise what is wrong.
    pub async fn check(&self) -> Result<(), &'static str> {
        if !self.subscribed.load(Ordering::Relaxed) {
            return Err("subscriber link down, reconnecting");
        }
        let ping = async {
            match &self.publisher {
                Publisher::Single(manager) => {
                    redis::cmd("PING")
                        .query_async::<String>(&mut manager.clone())
                        .await
                }
                // The subscriber's link is up, and the cluster client pings itself; a publish
                // that fails is retried and logged.
                Publisher::Cluster(_) => Ok("PONG".into()),
            }
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => {
                log::warn!("health check: Redis: {err}");
                Err("not answering")
            }
            Err(_) => Err("not answering within 1 s"),
        }
    }

    /// The hub's hook: the first stream here on `id` opened. Wakes the subscriber to subscribe
    /// to its channel, unless it still is (lingering).
    pub fn want(&self, id: &JobId) {
        let mut routes = self.routes.lock();
        let route = routes.entry(id.clone()).or_insert_with(|| Route {
            wanted: false,
            idle_since: None,
            confirmed: tokio::sync::watch::Sender::new(false),
            unguarded: false,
        });
        route.wanted = true;
        route.idle_since = None;
        let confirmed = *route.confirmed.borrow();
        drop(routes);
        if !confirmed {
            self.routes.wanted.notify_one();
        }
    }

    /// The hub's hook: the last stream here on `id` left. The channel is dropped after
    /// [`LINGER`], unless a stream comes back.
    pub fn release(&self, id: &JobId) {
        if let Some(route) = self.routes.lock().get_mut(id) {
            route.wanted = false;
            route.idle_since = Some(Instant::now());
        }
    }

    /// Waits until the job's channel is subscribed, so that a store read after it and a publish
    /// after the read cannot both miss the ending. When the link is down, or the subscription
    /// takes longer than a Redis round trip may, it returns at once and marks the job: the
    /// subscriber catches up on it once its subscription is confirmed, which covers the gap.
    pub async fn routed(&self, id: &JobId) {
        let mut confirmed = {
            let routes = self.routes.lock();
            match routes.get(id) {
                Some(route) if *route.confirmed.borrow() => return,
                Some(route) => route.confirmed.subscribe(),
                // Not watched (the hub hook runs first): nothing to wait for.
                None => return,
            }
        };
        if self.subscribed.load(Ordering::Acquire) {
            let waited = tokio::time::timeout(ATTEMPT_TIMEOUT, confirmed.wait_for(|c| *c)).await;
            if matches!(waited, Ok(Ok(_))) {
                return;
            }
        }
        // Under the lock the subscriber takes to confirm: either it confirmed already, or it
        // sees the mark when it does.
        if let Some(route) = self.routes.lock().get_mut(id)
            && !*route.confirmed.borrow()
        {
            route.unguarded = true;
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

/// The subscriber's connection, with the messages it receives arriving on a channel of their own.
enum Link {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Link {
    async fn open(server: &Server) -> redis::RedisResult<(Self, UnboundedReceiver<PushInfo>)> {
        let (pushes, received) = unbounded_channel();
        let link = match server {
            Server::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(ATTEMPT_TIMEOUT))
                    .set_response_timeout(Some(ATTEMPT_TIMEOUT))
                    .set_push_sender(pushes);
                Self::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            Server::Cluster(client) => {
                let config = redis::cluster::ClusterConfig::new().set_push_sender(pushes);
                Self::Cluster(client.get_async_connection_with_config(config).await?)
            }
        };
        Ok((link, received))
    }

    /// Subscribes to the single channel (plain Pub/Sub, as the releases before routing do).
    async fn subscribe_legacy(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Self::Single(connection) => connection.subscribe(channel).await,
            Self::Cluster(connection) => connection.subscribe(channel).await,
        }
    }

    /// Subscribes to job channels, or unsubscribes; returns when Redis confirmed.
    async fn change(&mut self, channels: Vec<String>, subscribe: bool) -> redis::RedisResult<()> {
        match self {
            Self::Single(connection) => {
                for batch in channels.chunks(BATCH) {
                    if subscribe {
                        connection.subscribe(batch).await?;
                    } else {
                        connection.unsubscribe(batch).await?;
                    }
                }
                Ok(())
            }
            Self::Cluster(connection) => {
                // One command per channel (each its own slot), all in flight at once.
                futures_util::future::try_join_all(channels.into_iter().map(|channel| {
                    let mut connection = connection.clone();
                    async move {
                        if subscribe {
                            connection.ssubscribe(channel).await
                        } else {
                            connection.sunsubscribe(channel).await
                        }
                    }
                }))
                .await
                .map(drop)
            }
        }
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
                Ok((link, pushes)) => {
                    if ever_subscribed {
                        self.listener.resubscribed();
                        log::info!("Redis subscriber re-subscribed to {}", self.fanout.channel);
                    }
                    ever_subscribed = true;
                    // Subscribed first, then catch up: an ending stored after the store read is
                    // published after the subscribe, so one of the two sees it. A job whose first
                    // stream opens meanwhile reads the store itself and is marked unguarded (the
                    // link is not up yet), so the next flush catches up on it.
                    match self.listener.catch_up(None).await {
                        Ok(()) => {
                            backoff = MIN_BACKOFF;
                            self.fanout.subscribed.store(true, Ordering::Release);
                            let why = self.receive_until_dropped(link, pushes).await;
                            self.fanout.subscribed.store(false, Ordering::Release);
                            log::warn!("Redis subscriber link dropped ({why}); reconnecting");
                        }
                        // Without a catch-up a message may have slipped by: start over.
                        Err(err) => log::warn!("resync after subscribing failed: {err}"),
                    }
                }
                Err(err) => log::warn!("Redis subscriber cannot subscribe: {err}"),
            }
            self.forget_link();
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// A new link has none of the old one's subscriptions: every route waits to be subscribed
    /// again, and the channels nobody wants any more need no unsubscribe.
    fn forget_link(&self) {
        let mut routes = self.fanout.routes.lock();
        routes.retain(|_, route| route.wanted);
        for route in routes.values() {
            route.confirmed.send_replace(false);
        }
    }

    /// A new link, subscribed to the single channel (while upgrading) and to every job channel
    /// wanted here.
    async fn subscribe(&self) -> Result<(Link, UnboundedReceiver<PushInfo>), String> {
        let attempt = async {
            let (mut link, pushes) = Link::open(&self.fanout.server).await?;
            if self.fanout.legacy == LegacyChannel::On {
                link.subscribe_legacy(&self.fanout.channel).await?;
            }
            Ok::<_, redis::RedisError>((link, pushes))
        };
        let (mut link, pushes) = match tokio::time::timeout(ATTEMPT_TIMEOUT * 5, attempt).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(err)) => return Err(err.to_string()),
            Err(_) => return Err("timed out".into()),
        };
        // The catch-up that follows covers every watched job: the unguarded marks can go.
        self.flush(&mut link).await?;
        Ok((link, pushes))
    }

    /// Subscribes to the job channels waiting for it, and drops those idle for [`LINGER`];
    /// returns the jobs whose streams read the store before their subscription was confirmed.
    async fn flush(&self, link: &mut Link) -> Result<Vec<JobId>, String> {
        let fanout = &self.fanout;
        let (subscribe, unsubscribe): (Vec<JobId>, Vec<JobId>) = {
            let mut routes = fanout.routes.lock();
            let subscribe = routes
                .iter()
                .filter(|(_, route)| route.wanted && !*route.confirmed.borrow())
                .map(|(id, _)| id.clone())
                .collect();
            let mut unsubscribe = Vec::new();
            routes.retain(|id, route| {
                let idle = route.idle_since.is_some_and(|at| at.elapsed() >= LINGER);
                if idle && !route.wanted {
                    if *route.confirmed.borrow() {
                        unsubscribe.push(id.clone());
                    }
                    return false;
                }
                true
            });
            (subscribe, unsubscribe)
        };
        if !unsubscribe.is_empty() {
            let channels = unsubscribe
                .iter()
                .map(|id| fanout.job_channel(id))
                .collect();
            tokio::time::timeout(ATTEMPT_TIMEOUT, link.change(channels, false))
                .await
                .map_err(|_| "unsubscribing timed out".to_owned())?
                .map_err(|e| e.to_string())?;
        }
        if subscribe.is_empty() {
            return Ok(Vec::new());
        }
        let channels = subscribe.iter().map(|id| fanout.job_channel(id)).collect();
        tokio::time::timeout(ATTEMPT_TIMEOUT, link.change(channels, true))
            .await
            .map_err(|_| "subscribing timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        let mut routes = fanout.routes.lock();
        let mut unguarded = Vec::new();
        for id in subscribe {
            if let Some(route) = routes.get_mut(&id) {
                route.confirmed.send_replace(true);
                if std::mem::take(&mut route.unguarded) {
                    unguarded.push(id);
                }
            }
        }
        Ok(unguarded)
    }

    /// Hands on every authentic message that arrives, subscribes and unsubscribes as streams come
    /// and go, and catches up every `resync_interval`; returns why the link dropped.
    async fn receive_until_dropped(
        &self,
        mut link: Link,
        mut pushes: UnboundedReceiver<PushInfo>,
    ) -> String {
        let mut last_warning: Option<tokio::time::Instant> = None;
        // The catch-up right after subscribing has just run: the first periodic one is due a
        // full interval later.
        let mut resync = tokio::time::interval_at(
            tokio::time::Instant::now() + self.resync_interval,
            self.resync_interval,
        );
        // After a slow catch-up, wait a full interval again rather than catching up in a burst.
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut unsubscribe = tokio::time::interval(LINGER);
        unsubscribe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A cluster node's link dropped, or a node gave up a watched channel's slot: subscribe
        // again and re-read, retried a few times, then on a new link.
        let mut repairing = false;
        let mut failed_repairs = 0;
        let mut repair = tokio::time::interval(MIN_BACKOFF * 5);
        repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let was_repairing = repairing;
            tokio::select! {
                _ = repair.tick(), if repairing => {
                    repairing = !self.repair(&mut link).await;
                    failed_repairs = if repairing { failed_repairs + 1 } else { 0 };
                    if failed_repairs >= REPAIRS_BEFORE_NEW_LINK {
                        return "the channels of a lost node could not be subscribed again".into();
                    }
                }
                push = pushes.recv() => {
                    let Some(push) = push else { return "connection closed".into() };
                    match push.kind {
                        PushKind::Disconnection if matches!(link, Link::Single(_)) => {
                            return "disconnected".into();
                        }
                        PushKind::Disconnection => {
                            // The cluster client repairs a node's link by itself (a node
                            // restarted, or its link cut): keep this link, subscribe again to
                            // what the dropped node link carried, then re-read. When that keeps
                            // failing (the node died and its slots moved), a new link.
                            log::warn!(
                                "a Redis Cluster node link dropped; subscribing again to the \
                                 channels of the jobs watched here"
                            );
                            self.fanout.subscribed.store(false, Ordering::Release);
                            self.unconfirm_wanted();
                            repairing = true;
                        }
                        PushKind::SUnsubscribe if self.moved(&push.data) => {
                            // The node gave up the channel's slot (a planned failover, a slot
                            // migrated) and dropped its subscribers, with no link lost: subscribe
                            // again, which finds the slot's new node, then re-read.
                            if !repairing {
                                log::warn!(
                                    "a Redis Cluster node dropped the channels of jobs watched \
                                     here (their slots moved); subscribing again"
                                );
                            }
                            repairing = true;
                        }
                        PushKind::Message | PushKind::SMessage => {
                            self.listener.arrived();
                            self.open(push.data, &mut last_warning);
                        }
                        _ => {}
                    }
                }
                () = self.fanout.routes.wanted.notified() => {
                    if let Some(err) = self.flush_or_repair(&mut link, &mut repairing).await {
                        return err;
                    }
                }
                _ = unsubscribe.tick() => {
                    if let Some(err) = self.flush_or_repair(&mut link, &mut repairing).await {
                        return err;
                    }
                }
                _ = resync.tick() => {
                    // Messages wait in the connection's buffer meanwhile; none is lost. A failed
                    // read is retried at the next tick, and the link stays up.
                    if let Err(err) = self.listener.catch_up(None).await {
                        log::warn!("periodic resync failed: {err}");
                    }
                }
            }
            if repairing && !was_repairing {
                // A failover drops many channels at once, one push each: the first repair
                // waits a moment so that it takes them all.
                repair.reset();
            }
        }
    }

    /// Whether a `sunsubscribe` push (its data: the channel, then the count) took a job channel
    /// this instance still holds as subscribed: then the node dropped it, since our own
    /// unsubscribes take the channel out of the routes first. Marks it not subscribed.
    fn moved(&self, data: &[Value]) -> bool {
        let Some(Value::BulkString(channel)) = data.first() else {
            return false;
        };
        let prefix = format!("{}:{{", self.fanout.channel);
        let Some(id) = std::str::from_utf8(channel)
            .ok()
            .and_then(|c| c.strip_prefix(&prefix)?.strip_suffix('}'))
            .and_then(|id| JobId::parse(id).ok())
        else {
            return false;
        };
        match self.fanout.routes.lock().get(&id) {
            Some(route) if route.wanted && *route.confirmed.borrow() => {
                route.confirmed.send_replace(false);
                true
            }
            _ => false,
        }
    }

    /// Every wanted channel counts as not subscribed; lingering ones stay as they are (the
    /// cluster client still holds them, to be dropped as usual).
    fn unconfirm_wanted(&self) {
        for route in self.fanout.routes.lock().values() {
            if route.wanted {
                route.confirmed.send_replace(false);
            }
        }
    }

    /// After a cluster node's link dropped: subscribes again to every wanted channel, then
    /// re-reads every watched job; true once both worked.
    async fn repair(&self, link: &mut Link) -> bool {
        if let Err(err) = self.flush(link).await {
            log::warn!("Redis Cluster: cannot subscribe again yet: {err}");
            return false;
        }
        if let Err(err) = self.listener.catch_up(None).await {
            log::warn!("resync after subscribing again failed: {err}");
            return false;
        }
        self.listener.resubscribed();
        self.fanout.subscribed.store(true, Ordering::Release);
        log::info!("Redis Cluster: subscribed again and caught up");
        true
    }

    /// [`Subscriber::flush_and_catch_up`]; a failure ends a single Redis's link (its error is
    /// returned), while a cluster's link stays and is repaired: every watched channel is
    /// subscribed again.
    async fn flush_or_repair(&self, link: &mut Link, repairing: &mut bool) -> Option<String> {
        let err = self.flush_and_catch_up(link).await.err()?;
        if matches!(link, Link::Single(_)) {
            return Some(err);
        }
        log::warn!("Redis Cluster: {err}; subscribing again");
        self.fanout.subscribed.store(false, Ordering::Release);
        self.unconfirm_wanted();
        *repairing = true;
        None
    }

    async fn flush_and_catch_up(&self, link: &mut Link) -> Result<(), String> {
        let unguarded = self.flush(link).await?;
        if !unguarded.is_empty()
            && let Err(err) = self.listener.catch_up(Some(unguarded)).await
        {
            // The periodic resync reads them again.
            log::warn!("resync of newly subscribed jobs failed: {err}");
        }
        Ok(())
    }

    /// Checks one message's signature for the channel it came on, and hands it on.
    fn open(&self, data: Vec<Value>, last_warning: &mut Option<tokio::time::Instant>) {
        let mut data = data.into_iter();
        let (Some(Value::BulkString(channel)), Some(Value::BulkString(message))) =
            (data.next(), data.next())
        else {
            return;
        };
        let channel = String::from_utf8_lossy(&channel);
        let Fanout { key, .. } = &self.fanout;
        match open(key, &channel, &message) {
            Some(payload) => self
                .listener
                .receive(payload, *channel == *self.fanout.channel),
            None => {
                self.listener.rejected();
                if last_warning.is_none_or(|at| at.elapsed() >= REJECTED_WARNING_EVERY) {
                    *last_warning = Some(tokio::time::Instant::now());
                    log::warn!(
                        "dropped a message on the Redis channel {channel} that is not signed \
                         with this deployment's key (HANDOFF_FANOUT_KEY, or one derived from \
                         HANDOFF_SECRET_KEY or HANDOFF_API_TOKEN): someone else publishes there, or an instance has \
                         another key; counted in handoff_fanout_rejected_total, warned at most \
                         once a minute"
                    );
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
