//! Where a test's instances meet, as one type over both kinds of Redis Handoff speaks to
//! ([`Backend`]): a single `redis-server` of the test's own, or a Redis Cluster of its own
//! (sharded Pub/Sub). A scenario written once against it runs against both, as two tests
//! ([`Kind`]), and may stop, restart or cut either without disturbing anyone else.

use std::time::Duration;

use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::redis::{RedisServer, fresh_channel};
use super::redis_cluster::RedisCluster;
use super::{FreshDb, Instance, free_port};

/// Which Redis a scenario runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Single,
    Cluster,
}

/// A running Redis or Redis Cluster, stopped when dropped.
pub enum Backend {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl Backend {
    pub async fn start(kind: Kind) -> Self {
        match kind {
            Kind::Single => Self::Single(RedisServer::start().await),
            Kind::Cluster => Self::Cluster(RedisCluster::start().await),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Single(_) => Kind::Single,
            Self::Cluster(_) => Kind::Cluster,
        }
    }

    /// `REDIS_URL`: the server's URL, or every node of the cluster as a seed.
    pub fn url(&self) -> String {
        match self {
            Self::Single(redis) => redis.url(),
            Self::Cluster(cluster) => cluster.seeds(),
        }
    }

    /// One instance on `db`, publishing and subscribing on `channel` here, with `more`
    /// variables; returns once it listens.
    pub fn instance(&self, db: &FreshDb, channel: &str, more: &[(&str, &str)]) -> Instance {
        instance_at(self.kind(), &self.url(), db, channel, more)
    }

    /// Two healthy instances on `db` and a fresh channel here, with `more` variables.
    pub async fn pair(&self, db: &FreshDb, more: &[(&str, &str)]) -> (Instance, Instance) {
        let channel = fresh_channel();
        let one = self.instance(db, &channel, more);
        let two = self.instance(db, &channel, more);
        one.wait_healthy().await;
        two.wait_healthy().await;
        (one, two)
    }

    /// Publishes `message` on `channel` as anyone who reached this Redis could (`PUBLISH`; on a
    /// cluster `SPUBLISH` through the master of the channel's slot, as for a job's channel);
    /// returns how many subscribers received it.
    pub async fn publish(&self, channel: &str, message: &str) -> u64 {
        match self {
            Self::Single(redis) => count(redis.command(&["PUBLISH", channel, message]).await),
            Self::Cluster(cluster) => cluster.spublish(channel, message),
        }
    }

    /// Cuts every subscribing link (`CLIENT KILL TYPE pubsub`, on every node of a cluster);
    /// Redis itself stays up. Returns how many links were cut.
    pub async fn kill_subscriber_links(&self) -> u64 {
        match self {
            Self::Single(redis) => {
                count(redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await)
            }
            Self::Cluster(cluster) => cluster.kill_subscriber_links(),
        }
    }

    /// SIGKILLs the server, or every node of the cluster.
    pub fn stop(&mut self) {
        match self {
            Self::Single(redis) => redis.stop(),
            Self::Cluster(cluster) => cluster.stop(),
        }
    }

    /// Starts it again on the same ports and waits until it serves.
    pub async fn restart(&mut self) {
        match self {
            Self::Single(redis) => redis.restart().await,
            Self::Cluster(cluster) => cluster.restart().await,
        }
    }

    /// Subscribes to a job's channel (`SUBSCRIBE`, or `SSUBSCRIBE` on a cluster, where a job's
    /// news is sharded), as an eavesdropper would.
    pub async fn listen(&self, channel: &str) -> Listening {
        let (pushes, received) = unbounded_channel();
        let connection = match self {
            Self::Single(redis) => {
                let client = redis::Client::open(format!("{}?protocol=resp3", redis.url()))
                    .expect("a Redis URL");
                let config = redis::AsyncConnectionConfig::new().set_push_sender(pushes);
                let mut connection = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .expect("a connection");
                connection.subscribe(channel).await.expect("SUBSCRIBE");
                Box::new(connection) as Box<dyn std::any::Any + Send>
            }
            Self::Cluster(cluster) => {
                let seeds: Vec<String> = cluster.seeds().split(',').map(str::to_owned).collect();
                let client = redis::cluster::ClusterClient::builder(seeds)
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .build()
                    .expect("the cluster's seeds");
                let config = redis::cluster::ClusterConfig::new().set_push_sender(pushes);
                let mut connection = client
                    .get_async_connection_with_config(config)
                    .await
                    .expect("a cluster connection");
                connection.ssubscribe(channel).await.expect("SSUBSCRIBE");
                Box::new(connection)
            }
        };
        Listening {
            received,
            _connection: connection,
        }
    }
}

/// An instance on a `kind` of Redis at `url` (which may be dead), with `more` variables.
pub fn instance_at(
    kind: Kind,
    url: &str,
    db: &FreshDb,
    channel: &str,
    more: &[(&str, &str)],
) -> Instance {
    let cluster = match kind {
        Kind::Single => "off",
        Kind::Cluster => "on",
    };
    let mut settings = vec![("HANDOFF_REDIS_CLUSTER", cluster)];
    settings.extend_from_slice(more);
    Instance::in_fleet(db, Some(url), channel, &settings)
}

fn count(answer: Value) -> u64 {
    match answer {
        Value::Int(n) => u64::try_from(n).expect("a count"),
        other => panic!("expected a count, Redis answered {other:?}"),
    }
}

/// A `redis://` URL where nothing listens.
pub fn dead_redis_url() -> String {
    format!("redis://127.0.0.1:{}", free_port())
}

/// The messages on one channel, from [`Backend::listen`].
pub struct Listening {
    received: UnboundedReceiver<PushInfo>,
    /// The subscribed connection, kept open while the messages are read.
    _connection: Box<dyn std::any::Any + Send>,
}

impl Listening {
    /// The next message's payload within `within`; `None` if none came.
    pub async fn next(&mut self, within: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let push = tokio::time::timeout_at(deadline, self.received.recv())
                .await
                .ok()??;
            if matches!(push.kind, PushKind::Message | PushKind::SMessage)
                && let Some(Value::BulkString(payload)) = push.data.get(1)
            {
                return Some(String::from_utf8_lossy(payload).into_owned());
            }
        }
    }
}
