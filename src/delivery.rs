//! How the news of a job reaches every stream waiting for it: here through the [`Hub`], on the
//! other instances through the Redis link ([`Fanout`]), and the catch-up from the store that makes
//! a lost message harmless.
//!
//! An ending is published only once stored; a progress report is published at once (the latest
//! is stored a moment later, and the next report replaces a lost one). The instance that publishes
//! delivers locally first, for the lowest latency here, and recognises its own message when Redis
//! echoes it back, by the instance id the message carries.
//!
//! Each ending handed to the hub carries when it was committed, so that the streams can time its
//! delivery (`handoff_delivery_seconds`): this instance's monotonic clock for its own endings; for
//! another instance's, the commit time its message carries, read off that instance's wall clock,
//! so a skew between the two clocks adds to (or takes from) the figure; for the catch-up, the
//! stored end time.

//!
//! A message carries the time it was sent (`sentAt`), inside the signed bytes: a receiver drops
//! one sent more than [`MAX_MESSAGE_AGE`] before (or after) its own clock, so a message captured
//! on the channel can be replayed for a few minutes at most, and then only to no effect: an
//! ending repeats one really stored, and the hub never takes a progress report older than the one
//! it has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::domain::{Ending, JobId, Message, MoveUrl, Percent, Progress, now_micros, now_millis};
use crate::fanout::{Fanout, Listener};
use crate::hub::{Hub, News, Update};
use crate::metrics::{Committed, DeliveryPath, Metrics};
use crate::store::Store;

/// How far a message's `sentAt` may lie from the receiver's clock, either way: past it, the
/// message is a replay (or the instances' clocks disagree) and is dropped. Well above any delay
/// of Redis Pub/Sub, which delivers at once or never.
const MAX_MESSAGE_AGE: Duration = Duration::from_secs(5 * 60);
/// At most one warning about stale messages per this long (each one is counted).
const STALE_WARNING_EVERY: Duration = Duration::from_secs(60);

/// The envelope of one update on a Redis channel (apart from the user's `domain::Message` it
/// may carry): `{"id":"…","kind":"complete","moveUrl":"…","from":"…",
/// "routed":true,"sentAt":…}`, with `message` for a failure, and `percent`, `message` and `at`
/// for progress, and `committedUs` for an ending (the committing instance's clock, for the
/// delivery histogram).
///
/// Fields are only ever added, each optional: serde skips fields it does not know, so an older
/// instance reads a newer one's messages, and a newer one reads an older one's (without
/// `committedUs`, such a delivery is not timed).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Envelope {
    id: String,
    /// `complete`, `failed`, `expired` or `progress`.
    kind: String,
    #[serde(rename = "moveUrl", default, skip_serializing_if = "Option::is_none")]
    move_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    at: Option<i64>,
    /// An ending's commit, in microseconds since the Unix epoch on the publishing instance's
    /// clock.
    #[serde(
        rename = "committedUs",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    committed_us: Option<i64>,
    /// The publishing instance.
    from: String,
    /// Published to the job's own channel too (the releases before routing leave it out): a
    /// copy on the single channel is for them, and a routed instance ignores it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    routed: bool,
    /// When it was published, in milliseconds since the Unix epoch by the publisher's clock.
    /// The release before leaves it out; such a message is still taken, for this release only.
    #[serde(rename = "sentAt", default, skip_serializing_if = "Option::is_none")]
    sent_at: Option<i64>,
}

impl Envelope {
    fn encode(instance: &str, id: &JobId, update: &Update, sent_at: i64) -> Vec<u8> {
        let mut message = Envelope {
            id: id.as_str().to_owned(),
            from: instance.to_owned(),
            routed: true,
            sent_at: Some(sent_at),
            ..Envelope::default()
        };
        match update {
            Update::End(ending) => {
                message.committed_us = Some(now_micros());
                message.kind = ending.status().as_str().to_owned();
                message.move_url = Some(ending.target().as_str().to_owned());
                if let Ending::Failed {
                    message: Some(why), ..
                } = ending
                {
                    message.message = Some(why.as_str().to_owned());
                }
            }
            Update::Progress(progress) => {
                message.kind = "progress".to_owned();
                message.percent = progress.percent.map(Percent::get);
                message.message = progress.message.as_ref().map(|m| m.as_str().to_owned());
                message.at = Some(progress.at);
            }
        }
        // Serializing strings and numbers cannot fail.
        serde_json::to_vec(&message).unwrap_or_default()
    }

    /// Parses what another instance published; anything malformed is refused, not delivered.
    /// Returns the sender, the job, the update and, for an ending, how long ago it was committed
    /// by the sender's clock.
    fn parse(payload: &[u8]) -> Result<(Sender, JobId, Update, Option<Duration>), String> {
        let message: Envelope =
            serde_json::from_slice(payload).map_err(|e| format!("not an update: {e}"))?;
        let id = JobId::parse(&message.id).map_err(|e| e.to_string())?;
        let text = message
            .message
            .as_deref()
            .map(Message::stored)
            .transpose()
            .map_err(|e| e.to_string())?;
        let target = || {
            MoveUrl::parse(message.move_url.as_deref().unwrap_or_default())
                .map_err(|e| e.to_string())
        };
        let update = match message.kind.as_str() {
            "complete" => Update::End(Ending::Complete { target: target()? }),
            "failed" => Update::End(Ending::Failed {
                target: target()?,
                message: text,
            }),
            "expired" => Update::End(Ending::Expired { target: target()? }),
            "progress" => Update::Progress(Progress {
                percent: message
                    .percent
                    .map(Percent::parse)
                    .transpose()
                    .map_err(|e| e.to_string())?,
                message: text,
                at: message.at.ok_or("a progress message without its time")?,
            }),
            other => return Err(format!("unknown kind {other:?}")),
        };
        let age = message
            .committed_us
            .filter(|_| matches!(update, Update::End(_)))
            .map(micros_ago);
        Ok((
            Sender {
                instance: message.from,
                routed: message.routed,
                sent_at: message.sent_at,
            },
            id,
            update,
            age,
        ))
    }
}

/// How long ago `micros` (since the Unix epoch) was; nothing for a time ahead of this clock.
fn micros_ago(micros: i64) -> Duration {
    Duration::from_micros(u64::try_from(now_micros().saturating_sub(micros)).unwrap_or(0))
}

/// Who published a message.
#[derive(Debug, PartialEq)]
struct Sender {
    instance: String,
    /// It published to the job's channel as well.
    routed: bool,
    /// When, by its clock (`None` from the release before).
    sent_at: Option<i64>,
}

impl Sender {
    /// Why a message sent then is not taken at `now`: sent more than [`MAX_MESSAGE_AGE`] ago or
    /// ahead. A message without its time passes (see [`Envelope::sent_at`]).
    fn stale(&self, now: i64) -> Option<String> {
        let sent_at = self.sent_at?;
        let bound = i64::try_from(MAX_MESSAGE_AGE.as_millis()).unwrap_or(i64::MAX);
        let age = now.saturating_sub(sent_at);
        if age > bound {
            Some(format!("sent {} s ago", age / 1000))
        } else if age < -bound {
            Some(format!("sent {} s ahead of this clock", -age / 1000))
        } else {
            None
        }
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
    /// With `REDIS_URL`: updates also go to every other instance.
    fanout: Option<Fanout>,
    /// What the catch-up reads.
    store: Store,
    metrics: Metrics,
    /// This process, in the messages it publishes.
    instance: String,
    /// When a stale message was last logged.
    stale_warned: Mutex<Option<Instant>>,
}

impl Delivery {
    pub fn new(hub: Hub, fanout: Option<Fanout>, store: Store, metrics: Metrics) -> Self {
        if let Some(fanout) = &fanout {
            let fanout = fanout.clone();
            hub.set_watch_hook(Arc::new(move |id, watched| {
                if watched {
                    fanout.want(id);
                } else {
                    fanout.release(id);
                }
            }));
        }
        Self {
            inner: Arc::new(Inner {
                hub,
                fanout,
                store,
                metrics,
                instance: JobId::generate().to_string(),
                stale_warned: Mutex::new(None),
            }),
        }
    }

    /// This process's id, in the messages it publishes (and its JSON log lines).
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn fanout(&self) -> Option<&Fanout> {
        self.inner.fanout.as_ref()
    }

    fn committed(&self, path: DeliveryPath, age: Duration) -> Committed {
        self.inner.metrics.committed(path, age)
    }

    /// Delivers a stored ending to every stream waiting for it, here and (with Redis) on every
    /// other instance. A failed Redis publish is only logged: the other instances' catch-up
    /// finds the ending in the store. Returns how many streams here got it.
    pub async fn publish(&self, id: &JobId, ending: Ending) -> usize {
        self.send(id, Update::End(ending)).await
    }

    /// Delivers a progress report like an ending, except that it need not be stored first: a
    /// report lost with Redis is replaced by the next, or read from the store at a reconnect.
    pub async fn publish_progress(&self, id: &JobId, progress: Progress) -> usize {
        self.send(id, Update::Progress(progress)).await
    }

    async fn send(&self, id: &JobId, update: Update) -> usize {
        let Inner {
            hub,
            fanout,
            instance,
            metrics,
            ..
        } = &*self.inner;
        let payload = fanout
            .as_ref()
            .map(|_| Envelope::encode(instance, id, &update, now_millis()));
        let committed = matches!(update, Update::End(_))
            .then(|| metrics.committed(DeliveryPath::Local, Duration::ZERO));
        let reached = hub.deliver(id, &News::timed(update, committed));
        if let (Some(fanout), Some(payload)) = (fanout, payload)
            && let Err(err) = fanout.broadcast(id, &payload).await
        {
            log::warn!(job:% = id;
                "job {id}: update not published to Redis ({err}); instances deliver an ending \
                 when they re-read the store"
            );
        }
        reached
    }

    /// Waits until news of `id` published from now on reaches this instance (its channel is
    /// subscribed), or the subscriber has taken over catching up on it; see [`Fanout::routed`].
    /// Call it after subscribing to the hub and before reading the job.
    pub async fn routed(&self, id: &JobId) {
        if let Some(fanout) = &self.inner.fanout {
            fanout.routed(id).await;
        }
    }

    /// Starts receiving other instances' updates (progress and endings), when there is a Redis
    /// link; until `shutdown`.
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

impl Delivery {
    /// Counts a message dropped for its time, and says so at most once a minute.
    fn stale(&self, id: &JobId, why: &str) {
        self.inner.metrics.fanout_stale.inc();
        let mut warned = self.inner.stale_warned.lock();
        if warned.is_none_or(|at| at.elapsed() >= STALE_WARNING_EVERY) {
            *warned = Some(Instant::now());
            drop(warned);
            log::warn!(job:% = id;
                "dropped a signed message on the Redis channel about job {id}, {why}: a replay \
                 of a captured message, or an instance whose clock is more than {} min off \
                 (keep the instances' clocks synchronised); counted in \
                 handoff_fanout_stale_total, warned at most once a minute",
                MAX_MESSAGE_AGE.as_secs() / 60
            );
        }
    }
}

impl Listener for Delivery {
    fn receive(&self, payload: &[u8], legacy: bool) {
        match Envelope::parse(payload) {
            // Delivered here when it was published.
            Ok((from, ..)) if from.instance == self.inner.instance => {}
            // Its copy on the job's channel reaches this instance when a stream here watches the
            // job: subscribed before the stream read the job.
            Ok((from, ..)) if legacy && from.routed => {}
            Ok((from, id, update, age)) => match from.stale(now_millis()) {
                Some(why) => self.stale(&id, &why),
                None => {
                    let committed = age.map(|age| self.committed(DeliveryPath::Redis, age));
                    self.inner.hub.deliver(&id, &News::timed(update, committed));
                }
            },
            Err(err) => log::warn!("ignoring a message on the Redis channel: {err}"),
        }
    }

    fn arrived(&self) {
        self.inner.metrics.fanout_received.inc();
    }

    fn rejected(&self) {
        self.inner.metrics.fanout_rejected.inc();
    }

    /// Delivers every job watched here (or those of `jobs`) that ended while no message could
    /// reach us. Costs nothing while no job is watched, and one query per few hundred watched
    /// jobs otherwise.
    async fn catch_up(&self, jobs: Option<Vec<JobId>>) -> Result<(), String> {
        let Inner {
            hub,
            store,
            metrics,
            ..
        } = &*self.inner;
        let watched = jobs.unwrap_or_else(|| hub.watched_ids());
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
                let committed = job.ended_at.map(|at| {
                    self.committed(DeliveryPath::CatchUp, micros_ago(at.saturating_mul(1000)))
                });
                delivered += hub.deliver(&job.id, &News::timed(Update::End(ending), committed));
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
    fn every_kind_of_update_parses_back_into_the_same_update_and_sender() {
        let id = JobId::generate();
        let target = MoveUrl::parse("/done?x=\"1\"").unwrap();
        for update in [
            Update::End(Ending::Complete {
                target: target.clone(),
            }),
            Update::End(Ending::Failed {
                target: target.clone(),
                message: Some(Message::parse("disk full").unwrap()),
            }),
            Update::End(Ending::Expired { target }),
            Update::Progress(Progress {
                percent: Some(Percent::parse(40.0).unwrap()),
                message: Some(Message::parse("page 3 of 7").unwrap()),
                at: 17,
            }),
        ] {
            let payload = Envelope::encode("me", &id, &update, 1_764_583_200_000);
            let (from, parsed_id, parsed, age) = Envelope::parse(&payload).unwrap();
            assert_eq!(
                (from, parsed_id, &parsed),
                (
                    Sender {
                        instance: "me".to_owned(),
                        routed: true,
                        sent_at: Some(1_764_583_200_000),
                    },
                    id.clone(),
                    &update
                )
            );
            // An ending carries its commit time, a moment ago; progress carries none.
            match update {
                Update::End(_) => assert!(age.is_some_and(|age| age < Duration::from_secs(5))),
                Update::Progress(_) => assert_eq!(age, None),
            }
        }
    }

    #[test]
    fn messages_with_fields_added_or_without_the_commit_time_still_parse() {
        let id = JobId::generate();
        // An older instance's ending: delivered, not timed.
        let old = format!(r#"{{"id":"{id}","kind":"complete","moveUrl":"/x","from":"a"}}"#);
        let (_, _, update, age) = Envelope::parse(old.as_bytes()).unwrap();
        assert!(matches!(update, Update::End(_)));
        assert_eq!(age, None);
        // A newer instance's, with a field this one does not know: the field is skipped.
        let newer = format!(
            r#"{{"id":"{id}","kind":"failed","moveUrl":"/x","from":"a","committedUs":1,"later":[1]}}"#
        );
        let (_, _, update, age) = Envelope::parse(newer.as_bytes()).unwrap();
        assert!(matches!(update, Update::End(Ending::Failed { .. })));
        assert!(
            age.is_some_and(|age| age > Duration::from_secs(3600)),
            "{age:?}"
        );
        // A commit time ahead of this clock (skew) counts as no time at all.
        let ahead = format!(
            r#"{{"id":"{id}","kind":"expired","moveUrl":"/x","from":"a","committedUs":{}}}"#,
            now_micros() + 60_000_000
        );
        assert_eq!(
            Envelope::parse(ahead.as_bytes()).unwrap().3,
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_malformed_or_hostile_message_is_refused() {
        let id = JobId::generate();
        for payload in [
            "not json".to_owned(),
            r#"{"id":"short","moveUrl":"/x"}"#.to_owned(),
            format!(
                r#"{{"id":"{id}","kind":"complete","moveUrl":"https://evil.example","from":"x"}}"#
            ),
            format!(r#"{{"id":"{id}","kind":"progress","percent":101,"at":1,"from":"x"}}"#),
            format!(r#"{{"id":"{id}","kind":"progress","percent":10,"from":"x"}}"#),
            format!(r#"{{"id":"{id}","kind":"unheard-of","moveUrl":"/x","from":"x"}}"#),
            format!(r#"{{"id":"{id}","moveUrl":"/x","from":"x"}}"#),
        ] {
            assert!(Envelope::parse(payload.as_bytes()).is_err(), "{payload}");
        }
    }

    #[test]
    fn a_message_sent_beyond_the_bound_either_way_is_stale_and_one_without_its_time_is_not() {
        let bound = i64::try_from(MAX_MESSAGE_AGE.as_millis()).unwrap();
        let now = 1_764_583_200_000;
        let sent = |sent_at| Sender {
            instance: "another".to_owned(),
            routed: true,
            sent_at,
        };
        for fresh in [now, now - bound, now + bound, now - 1_000, now + 1_000] {
            assert_eq!(sent(Some(fresh)).stale(now), None, "{}", now - fresh);
        }
        for stale in [now - bound - 1, now + bound + 1, 0, i64::MIN, i64::MAX] {
            assert!(sent(Some(stale)).stale(now).is_some(), "{stale}");
        }
        assert_eq!(sent(None).stale(now), None, "from the release before");
        let payload = Envelope::encode(
            "me",
            &JobId::generate(),
            &Update::End(Ending::Expired {
                target: MoveUrl::parse("/x").unwrap(),
            }),
            now - bound - 1,
        );
        let (sender, ..) = Envelope::parse(&payload).unwrap();
        assert!(
            sender.stale(now).is_some(),
            "the time travels in the message"
        );
    }
}
