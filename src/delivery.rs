//! How the news of a job reaches every stream waiting for it: here through the [`Hub`], on the
//! other instances through the Redis link ([`Fanout`]), and the catch-up from the store that makes
//! a lost message harmless.
//!
//! Only stored endings are published. The instance that publishes delivers locally first, for the
//! lowest latency here, and recognises its own message when Redis echoes it back, by the instance
//! id the message carries.

use std::sync::Arc;

use crate::domain::{Ending, JobId, MoveUrl};
use crate::fanout::{Fanout, Listener};
use crate::hub::{Hub, News};
use crate::metrics::Metrics;
use crate::store::Store;

/// One ending on the Redis channel: `{"id":"…","moveUrl":"…","from":"…"}`.
#[derive(serde::Serialize, serde::Deserialize)]
struct Message {
    id: String,
    #[serde(rename = "moveUrl")]
    move_url: String,
    /// The publishing instance; absent from messages of older versions, which count as foreign.
    #[serde(default)]
    from: String,
}

impl Message {
    fn encode(instance: &str, id: &JobId, ending: &Ending) -> Vec<u8> {
        let message = Message {
            id: id.as_str().to_owned(),
            move_url: ending.target().as_str().to_owned(),
            from: instance.to_owned(),
        };
        // Serializing three strings cannot fail.
        serde_json::to_vec(&message).unwrap_or_default()
    }

    /// Parses what another instance published; anything malformed is refused, not delivered.
    fn parse(payload: &[u8]) -> Result<(String, JobId, Ending), String> {
        let message: Message =
            serde_json::from_slice(payload).map_err(|e| format!("not an ending: {e}"))?;
        let id = JobId::parse(&message.id).map_err(|e| e.to_string())?;
        let target = MoveUrl::parse(&message.move_url).map_err(|e| e.to_string())?;
        Ok((message.from, id, Ending::Complete { target }))
    }
}

/// Local delivery and the fan-out, as one; cheap to clone.
#[derive(Debug, Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hub: Hub,
    /// With `REDIS_URL`: endings also go to every other instance.
    fanout: Option<Fanout>,
    /// What the catch-up reads.
    store: Store,
    metrics: Metrics,
    /// This process, in the messages it publishes.
    instance: String,
}

impl Delivery {
    pub fn new(hub: Hub, fanout: Option<Fanout>, store: Store, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                hub,
                fanout,
                store,
                metrics,
                instance: JobId::generate().to_string(),
            }),
        }
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn fanout(&self) -> Option<&Fanout> {
        self.inner.fanout.as_ref()
    }

    /// Delivers a stored ending to every stream waiting for it, here and (with Redis) on every
    /// other instance. A failed Redis publish is only logged: the other instances' catch-up
    /// finds the ending in the store. Returns how many streams here got it.
    pub async fn publish(&self, id: &JobId, ending: Ending) -> usize {
        let Inner {
            hub,
            fanout,
            instance,
            ..
        } = &*self.inner;
        let payload = fanout
            .as_ref()
            .map(|_| Message::encode(instance, id, &ending));
        let reached = hub.deliver(id, &News::new(ending));
        if let (Some(fanout), Some(payload)) = (fanout, payload)
            && let Err(err) = fanout.broadcast(&payload).await
        {
            log::warn!(
                "job {id}: ending stored but not published to Redis ({err}); instances deliver \
                 it when they re-read the store"
            );
        }
        reached
    }

    /// Starts receiving other instances' endings, when there is a Redis link; until `shutdown`.
    pub fn spawn_fan_in(
        &self,
        resync_interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        if let Some(fanout) = &self.inner.fanout {
            fanout.spawn_subscriber(self.clone(), resync_interval, shutdown);
        }
    }
}

impl Listener for Delivery {
    fn receive(&self, payload: &[u8]) {
        match Message::parse(payload) {
            // Delivered here when it was published.
            Ok((from, _, _)) if from == self.inner.instance => {}
            Ok((_, id, ending)) => {
                self.inner.hub.deliver(&id, &News::new(ending));
            }
            Err(err) => log::warn!("ignoring a message on the Redis channel: {err}"),
        }
    }

    /// Delivers every job watched here that ended while no message could reach us. Costs
    /// nothing while no job is watched, and one query per few hundred watched jobs otherwise.
    async fn catch_up(&self) -> Result<(), String> {
        let Inner {
            hub,
            store,
            metrics,
            ..
        } = &*self.inner;
        let watched = hub.watched_ids();
        if watched.is_empty() {
            return Ok(());
        }
        let mut delivered = 0;
        for job in store
            .jobs_among(&watched)
            .await
            .map_err(|e| e.to_string())?
        {
            if let Some(ending) = job.ending() {
                delivered += hub.deliver(&job.id, &News::new(ending));
            }
        }
        if delivered > 0 {
            metrics.resync_deliveries.inc_by(delivered as u64);
            log::info!("resync delivered {delivered} ending(s) that no message brought");
        }
        Ok(())
    }

    fn resubscribed(&self) {
        self.inner.metrics.redis_reconnects.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_message_parses_back_into_the_same_ending_and_sender() {
        let id = JobId::generate();
        let ending = Ending::Complete {
            target: MoveUrl::parse("/done?x=\"1\"").unwrap(),
        };
        let payload = Message::encode("me", &id, &ending);
        assert_eq!(
            Message::parse(&payload).unwrap(),
            ("me".to_owned(), id, ending)
        );
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
