//! Who is waiting for which job, on this instance, and how a completion reaches them.
//!
//! Every open stream holds a [`Subscription`]; a job's entry lives while at least one stream of it
//! is open and is freed when the last one ends. Routes see only `subscribe` and `publish`; whether
//! a completion also travels to other instances (Redis, see [`crate::fanout`]) is decided here,
//! not in the routes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytestring::ByteString;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use crate::domain::{Job, JobId, MoveUrl};
use crate::fanout::Fanout;

/// The `data:` of a result event, encoded once and shared by every stream of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultData(pub ByteString);

impl ResultData {
    /// `{"status":"result","moveUrl":"…"}` for a completed job.
    pub fn for_job(job: &Job) -> Self {
        Self::to(&job.target())
    }

    /// `{"status":"result","moveUrl":"…"}` sending the browser to `target`.
    pub fn to(target: &MoveUrl) -> Self {
        Self(event_data("result", target.as_str()))
    }
}

/// The event payload the original client reads: `data.status` and `data.moveUrl`.
#[derive(serde::Serialize)]
struct EventData<'a> {
    status: &'a str,
    #[serde(rename = "moveUrl")]
    move_url: &'a str,
}

/// Encodes an event payload; `status` first, as the original server wrote it.
pub fn event_data(status: &str, move_url: &str) -> ByteString {
    let data = EventData { status, move_url };
    // Serializing two strings cannot fail.
    ByteString::from(serde_json::to_string(&data).unwrap_or_default())
}

/// One watched job: its result once delivered, and a way to wake the streams waiting for it.
/// Much lighter than a channel per job: a job completes once, so one cell and one `Notify` do.
#[derive(Debug, Default)]
struct Slot {
    result: OnceLock<ResultData>,
    /// In an `Arc` of its own so a stream can hold its wake-up without borrowing the slot.
    changed: Arc<Notify>,
    /// When a stream of this slot last read the job as pending *after* the slot existed, in
    /// milliseconds since the registry's epoch plus one (0: never); see
    /// [`Subscription::known_pending`].
    pending_read_at: AtomicU64,
}

/// How long one pending read of a job vouches for the streams that join it here afterwards.
const PENDING_READ_FRESH_MS: u64 = 1_000;

#[derive(Debug)]
struct Entry {
    slot: Arc<Slot>,
    streams: usize,
}

/// The local registry of open streams. A std `Mutex`, not a tokio one: it is never held across
/// an `.await`, and every critical section is a map lookup.
#[derive(Debug)]
struct Registry {
    jobs: Mutex<HashMap<JobId, Entry>>,
    /// Set at shutdown: every waiting stream ends.
    closed: AtomicBool,
    /// The clock `Slot::pending_read_at` counts from.
    epoch: Instant,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            jobs: Mutex::default(),
            closed: AtomicBool::default(),
            epoch: Instant::now(),
        }
    }
}

impl Registry {
    /// Milliseconds since the epoch, plus one so that 0 can mean "never".
    fn now_mark(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated: every update is one call.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands the result to every stream open on `id` here; returns how many there were.
    fn deliver(&self, id: &JobId, data: ResultData) -> usize {
        // Take the slot out so the waking of many streams happens outside the lock.
        let found = self
            .lock()
            .get(id)
            .map(|entry| (Arc::clone(&entry.slot), entry.streams));
        let Some((slot, streams)) = found else {
            return 0;
        };
        // A job completes once; a second copy (local, then back from Redis) is the same result.
        let _ = slot.result.set(data);
        slot.changed.notify_waiters();
        streams
    }
}

/// The hub the routes talk to; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    registry: Arc<Registry>,
    /// With `REDIS_URL`: completions also go to every other instance.
    fanout: Option<Fanout>,
}

/// One open stream's place in the hub. Dropping it leaves the hub; the last one out frees the job's entry.
#[derive(Debug)]
pub struct Subscription {
    registry: Arc<Registry>,
    id: JobId,
    slot: Arc<Slot>,
}

impl Subscription {
    /// Waits for the job's result. `None` once the hub is closed, which only happens at shutdown.
    pub async fn result(&self) -> Option<ResultData> {
        let mut woken = std::pin::pin!(None);
        std::future::poll_fn(|cx| self.poll_result(woken.as_mut(), cx)).await
    }

    /// [`Subscription::result`] for a hand-written future or stream, which keeps the wake-up
    /// registration in `woken` (start with `None`) between polls. `Ready(None)` once the hub is
    /// closed.
    pub fn poll_result(
        &self,
        mut woken: Pin<&mut Option<OwnedNotified>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<ResultData>> {
        loop {
            // Register for the wake-up *before* looking, so a delivery between the look and the
            // wait still wakes us.
            if woken.is_none() {
                woken.set(Some(Arc::clone(&self.slot.changed).notified_owned()));
                if let Some(registered) = woken.as_mut().as_pin_mut() {
                    registered.enable();
                }
            }
            if let Some(result) = self.delivered() {
                return Poll::Ready(Some(result));
            }
            if self.registry.closed.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
            match woken
                .as_mut()
                .as_pin_mut()
                .map(|registered| registered.poll(cx))
            {
                Some(Poll::Ready(())) => woken.set(None),
                _ => return Poll::Pending,
            }
        }
    }
}

impl Subscription {
    /// The result, if one has reached this job's streams here already (connect-and-send
    /// without a query: it was delivered only after it was stored).
    pub fn delivered(&self) -> Option<ResultData> {
        self.slot.result.get().cloned()
    }

    /// True when another stream of this job here read it as pending after subscribing, less
    /// than a second ago. Then this stream need not read it again: a completion stored after
    /// that read is published to the slot this stream now shares, exactly as for that stream.
    /// The second bounds the exceptions: a completion stored whose publish never happened (its
    /// caller cut off between the two), or a job purged meanwhile. Reconnects after it read the
    /// table again, so every tab still gets a stored result within one stream timeout.
    pub fn known_pending(&self) -> bool {
        let at = self.slot.pending_read_at.load(Ordering::Acquire);
        at != 0 && self.registry.now_mark().saturating_sub(at) < PENDING_READ_FRESH_MS
    }

    /// Records that this stream, having subscribed, read its job as pending.
    pub fn saw_pending(&self) {
        let now = self.registry.now_mark();
        self.slot.pending_read_at.store(now, Ordering::Release);
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut jobs = self.registry.lock();
        if let Some(entry) = jobs.get_mut(&self.id) {
            entry.streams -= 1;
            if entry.streams == 0 {
                jobs.remove(&self.id);
            }
        }
    }
}

impl Hub {
    /// A hub for one instance alone.
    pub fn new() -> Self {
        Self::default()
    }

    /// A hub that also publishes every completion through Redis. Incoming completions reach it
    /// through [`Fanout::spawn_subscriber`].
    pub fn with_fanout(fanout: Fanout) -> Self {
        Self {
            registry: Arc::default(),
            fanout: Some(fanout),
        }
    }

    /// Registers a stream for `id`. Call this *before* reading the job's status: a completion
    /// published after this call reaches the subscription, and one stored before the status read
    /// is seen by the read, so nothing slips between the two.
    pub fn subscribe(&self, id: &JobId) -> Subscription {
        let mut jobs = self.registry.lock();
        let entry = jobs.entry(id.clone()).or_insert_with(|| Entry {
            slot: Arc::default(),
            streams: 0,
        });
        entry.streams += 1;
        let slot = Arc::clone(&entry.slot);
        drop(jobs);
        Subscription {
            registry: Arc::clone(&self.registry),
            id: id.clone(),
            slot,
        }
    }

    /// Ends every waiting stream (shutdown): they return from [`Subscription::result`] with
    /// `None`, and so does every stream that subscribes afterwards.
    pub fn close(&self) {
        self.registry.closed.store(true, Ordering::Release);
        let slots: Vec<Arc<Slot>> = self
            .registry
            .lock()
            .values()
            .map(|entry| Arc::clone(&entry.slot))
            .collect();
        for slot in slots {
            slot.changed.notify_waiters();
        }
    }

    /// Delivers a completed job to every stream waiting for it, here and (with Redis) on every
    /// other instance. Call only after the completion is stored: a failed Redis publish is only
    /// logged, because subscribers re-read the store after a gap. Returns how many streams on
    /// this instance got it.
    pub async fn publish(&self, job: &Job) -> usize {
        // Locally first, for the lowest latency here; our own message coming back from Redis is
        // a harmless duplicate (see `Subscription::result`).
        let reached = self.registry.deliver(&job.id, ResultData::for_job(job));
        if let Some(fanout) = &self.fanout {
            fanout.publish(&job.id, &job.target()).await;
        }
        reached
    }

    /// Hands a result that reached this instance (from Redis or a resync) to the streams open
    /// on `id` here; returns how many there were.
    pub fn deliver(&self, id: &JobId, data: ResultData) -> usize {
        self.registry.deliver(id, data)
    }

    /// How many jobs have at least one open stream here.
    pub fn watched_jobs(&self) -> usize {
        self.registry.lock().len()
    }

    /// How many streams are open here on `id`.
    pub fn streams_on(&self, id: &JobId) -> usize {
        self.registry
            .lock()
            .get(id)
            .map_or(0, |entry| entry.streams)
    }

    /// The ids of every job watched here, to re-check after a gap in the fan-out.
    pub fn watched_ids(&self) -> Vec<JobId> {
        self.registry.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{JobStatus, MoveUrl};

    fn complete_job(id: &JobId) -> Job {
        Job {
            id: id.clone(),
            status: JobStatus::Complete,
            move_url: Some(MoveUrl::parse("/next").unwrap()),
            created_at: 0,
            completed_at: Some(1),
        }
    }

    #[tokio::test]
    async fn every_subscriber_gets_the_result_and_the_last_one_frees_the_entry() {
        let hub = Hub::new();
        let id = JobId::generate();
        let mut subs: Vec<_> = (0..3).map(|_| hub.subscribe(&id)).collect();
        assert_eq!(hub.watched_jobs(), 1);
        assert_eq!(hub.streams_on(&id), 3);
        assert_eq!(hub.publish(&complete_job(&id)).await, 3);
        for sub in &subs {
            let data = sub.result().await.unwrap();
            assert_eq!(data.0, r#"{"status":"result","moveUrl":"/next"}"#);
        }
        subs.pop();
        assert_eq!(hub.watched_jobs(), 1);
        subs.clear();
        assert_eq!(hub.watched_jobs(), 0);
    }

    #[tokio::test]
    async fn closing_the_hub_ends_waiting_and_later_subscriptions() {
        let hub = Hub::new();
        let id = JobId::generate();
        let waiting = hub.subscribe(&id);
        let waiter = tokio::spawn(async move { waiting.result().await });
        tokio::task::yield_now().await;
        hub.close();
        assert_eq!(waiter.await.unwrap(), None);
        assert_eq!(hub.subscribe(&id).result().await, None);
    }

    #[tokio::test]
    async fn a_result_delivered_before_the_wait_is_not_missed() {
        let hub = Hub::new();
        let id = JobId::generate();
        let sub = hub.subscribe(&id);
        hub.publish(&complete_job(&id)).await;
        hub.publish(&complete_job(&id)).await;
        assert!(sub.result().await.is_some());
    }

    #[tokio::test]
    async fn a_pending_read_is_shared_with_later_streams_of_the_job_until_the_last_leaves() {
        let hub = Hub::new();
        let id = JobId::generate();
        let first = hub.subscribe(&id);
        assert!(!first.known_pending());
        first.saw_pending();
        let second = hub.subscribe(&id);
        assert!(second.known_pending());
        assert_eq!(second.delivered(), None);
        hub.publish(&complete_job(&id)).await;
        assert!(hub.subscribe(&id).delivered().is_some());
        drop((first, second));
        let fresh = hub.subscribe(&id);
        assert!(!fresh.known_pending());
        assert_eq!(fresh.delivered(), None);
    }

    #[tokio::test]
    async fn a_pending_read_vouches_for_joining_streams_for_a_second_only() {
        let hub = Hub::new();
        let id = JobId::generate();
        let first = hub.subscribe(&id);
        first.saw_pending();
        assert!(hub.subscribe(&id).known_pending());
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        assert!(
            !hub.subscribe(&id).known_pending(),
            "a stale read must be made again"
        );
    }

    #[tokio::test]
    async fn a_publish_with_no_subscriber_reaches_nobody() {
        let hub = Hub::new();
        assert_eq!(hub.publish(&complete_job(&JobId::generate())).await, 0);
        assert_eq!(hub.watched_jobs(), 0);
    }
}
