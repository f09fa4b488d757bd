//! Who waits for which job on this instance: one entry per watched job, one [`Subscription`] per
//! open stream.
//!
//! A job's entry lives while at least one subscription of it does and is freed when the last one
//! is dropped. The hub knows nothing of Redis, of the store or of the wire format: it hands
//! [`News`] to the subscriptions of a job, and each subscription is a [`Stream`] of it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use bytestring::ByteString;
use futures_util::Stream;
use parking_lot::Mutex;
use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

use crate::domain::{Ending, JobId, Progress};
use crate::metrics::Committed;

/// What happened to a job.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The latest progress report; a later one replaces it.
    Progress(Progress),
    /// The job ended; nothing follows.
    End(Ending),
}

/// What the streams of a job receive, shared by all of them.
#[derive(Debug)]
pub struct News {
    pub update: Update,
    /// The news as the streams' transport writes it, encoded by the first stream that sends it
    /// and reused by every other: a job watched by thousands of tabs is encoded once.
    encoded: OnceLock<ByteString>,
    /// For an ending delivered to waiting streams: when it was committed, to time its delivery.
    committed: Option<Committed>,
}

impl News {
    pub fn new(update: Update) -> Arc<Self> {
        Self::timed(update, None)
    }

    /// News whose delivery each waiting stream records, from `committed`.
    pub fn timed(update: Update, committed: Option<Committed>) -> Arc<Self> {
        Arc::new(Self {
            update,
            encoded: OnceLock::new(),
            committed,
        })
    }

    pub fn ended(ending: Ending) -> Arc<Self> {
        Self::new(Update::End(ending))
    }

    pub fn progress(progress: Progress) -> Arc<Self> {
        Self::new(Update::Progress(progress))
    }

    /// When a progress report was made (`None` for an ending).
    fn reported_at(&self) -> Option<i64> {
        match &self.update {
            Update::Progress(progress) => Some(progress.at),
            Update::End(_) => None,
        }
    }

    /// The encoded news; `encode` runs for the first caller only. There is one transport (the
    /// event stream), so one encoding.
    pub fn encoded(&self, encode: impl FnOnce(&Update) -> ByteString) -> ByteString {
        self.encoded.get_or_init(|| encode(&self.update)).clone()
    }
}

/// One watched job: its latest progress, its ending once delivered, and a way to wake the
/// streams waiting for it. Much lighter than a channel per job, and a stream that cannot keep
/// up gets the latest progress, never a backlog.
#[derive(Debug, Default)]
struct Slot {
    ending: OnceLock<Arc<News>>,
    /// The latest progress, and how many reports reached the slot (0: none yet).
    progress: Mutex<(u64, Option<Arc<News>>)>,
    /// The count of `progress`, readable without the lock.
    progress_count: AtomicU64,
    /// In an `Arc` of its own so a subscription can hold its wake-up without borrowing the slot.
    changed: Arc<Notify>,
    /// When a subscription of this slot last read the job as pending, as [`Registry::clock`]
    /// counts (0: never); see [`Subscription::pending_read_is_fresh`].
    pending_read_at: AtomicU64,
}

/// How long one pending read of a job vouches for the subscriptions that join it afterwards.
const PENDING_READ_FRESH_MS: u64 = 1_000;

#[derive(Debug)]
struct Entry {
    slot: Arc<Slot>,
    subscriptions: usize,
}

/// Told when a job's first subscription here opens and its last one leaves (the Redis link
/// subscribes to and drops the job's channel then). Called under the hub's lock, so the two
/// calls of one job come in order; it must be quick and must not call the hub.
pub type WatchHook = Arc<dyn Fn(&JobId, bool) + Send + Sync>;

/// A blocking mutex, not a tokio one: it is never held across an `.await`, and every critical
/// section is a map lookup.
struct Registry {
    jobs: Mutex<HashMap<JobId, Entry>>,
    hook: OnceLock<WatchHook>,
    /// Set at shutdown: every subscription ends.
    closed: AtomicBool,
    /// What [`Registry::clock`] counts from.
    epoch: Instant,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            jobs: Mutex::default(),
            hook: OnceLock::new(),
            closed: AtomicBool::default(),
            epoch: Instant::now(),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("jobs", &self.jobs)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Registry {
    fn hook(&self, id: &JobId, watched: bool) {
        if let Some(hook) = self.hook.get() {
            hook(id, watched);
        }
    }

    /// Milliseconds since the registry was made, plus one, so that 0 can mean "never".
    fn clock(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }
}

/// The registry of this instance; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    registry: Arc<Registry>,
}

pin_project! {
    /// One open stream's place in the hub: a [`Stream`] that yields the job's news and then ends,
    /// or ends at once when the hub closes (shutdown). Dropping it leaves the hub; the last one
    /// out frees the job's entry.
    #[derive(Debug)]
    pub struct Subscription {
        registry: Arc<Registry>,
        id: JobId,
        slot: Arc<Slot>,
        // The progress count this subscription has seen.
        seen_progress: u64,
        done: bool,
        // The wake-up, registered before the slot is looked at, so news delivered between the
        // look and the wait still wakes the stream.
        #[pin]
        woken: Option<OwnedNotified>,
    }

    impl PinnedDrop for Subscription {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let mut jobs = this.registry.jobs.lock();
            if let Some(entry) = jobs.get_mut(&*this.id) {
                entry.subscriptions -= 1;
                if entry.subscriptions == 0 {
                    jobs.remove(&*this.id);
                    this.registry.hook(this.id, false);
                }
            }
        }
    }
}

impl Slot {
    /// Keeps `news` as the latest progress, unless the job has ended here or the slot holds a
    /// report made later (a replayed or overtaken message must not turn the bar back; of two
    /// made in the same millisecond, the one that arrived last is kept, as one instance hands
    /// them on in the order they were made); `only_first` keeps it only when no report has
    /// reached the slot yet.
    fn set_progress(&self, news: &Arc<News>, only_first: bool) -> bool {
        let mut progress = self.progress.lock();
        if self.ending.get().is_some() || (only_first && progress.0 > 0) {
            return false;
        }
        if let (Some(latest), Some(offered)) = (
            progress.1.as_deref().and_then(News::reported_at),
            news.reported_at(),
        ) && offered < latest
        {
            return false;
        }
        *progress = (progress.0 + 1, Some(Arc::clone(news)));
        self.progress_count.store(progress.0, Ordering::Release);
        true
    }
}

impl Subscription {
    /// The job's ending, if it has reached this job's streams here already.
    pub fn delivered(&self) -> Option<Arc<News>> {
        self.slot.ending.get().cloned()
    }

    /// Offers the stored progress of the job, read when the stream opened: the stream gets it
    /// first, unless a report already reached the job's streams here (that one is newer).
    pub fn offer_stored_progress(&self, news: &Arc<News>) {
        if self.slot.set_progress(news, true) {
            self.slot.changed.notify_waiters();
        }
    }

    /// True when another subscription of this job here read it as pending less than a second
    /// ago. Then this one need not read it again: an ending stored after that read is delivered
    /// to the slot this subscription shares. The second bounds the exceptions: an ending stored
    /// whose delivery never happened (its caller cut off between the two), or a job purged
    /// meanwhile. Reconnects after it read the store again, so every tab still gets a stored
    /// ending within one stream timeout.
    pub fn pending_read_is_fresh(&self) -> bool {
        let at = self.slot.pending_read_at.load(Ordering::Acquire);
        at != 0 && self.registry.clock().saturating_sub(at) < PENDING_READ_FRESH_MS
    }

    /// Records that this subscription, once registered, read its job as pending.
    pub fn record_pending_read(&self) {
        let now = self.registry.clock();
        self.slot.pending_read_at.store(now, Ordering::Release);
    }
}

impl Stream for Subscription {
    type Item = Arc<News>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Arc<News>>> {
        self.poll_update(cx, true)
    }
}

impl Subscription {
    /// [`Stream::poll_next`], leaving progress aside when `progress` is false: the ending still
    /// comes at once, and the latest report is there when progress is asked for again.
    pub fn poll_update(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        progress: bool,
    ) -> Poll<Option<Arc<News>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            if this.woken.is_none() {
                this.woken
                    .set(Some(Arc::clone(&this.slot.changed).notified_owned()));
                if let Some(registered) = this.woken.as_mut().as_pin_mut() {
                    registered.enable();
                }
            }
            if let Some(news) = this.slot.ending.get() {
                *this.done = true;
                // The stream writes what it is handed at once: its delivery ends here.
                if let Some(committed) = &news.committed {
                    committed.delivered();
                }
                return Poll::Ready(Some(Arc::clone(news)));
            }
            if this.registry.closed.load(Ordering::Acquire) {
                *this.done = true;
                return Poll::Ready(None);
            }
            if progress && this.slot.progress_count.load(Ordering::Acquire) != *this.seen_progress {
                let (count, latest) = this.slot.progress.lock().clone();
                *this.seen_progress = count;
                if let Some(news) = latest {
                    return Poll::Ready(Some(news));
                }
            }
            match this.woken.as_mut().as_pin_mut().map(|w| w.poll(cx)) {
                Some(Poll::Ready(())) => this.woken.set(None),
                _ => return Poll::Pending,
            }
        }
    }
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a stream for `id`. Call this *before* reading the job's status: news delivered
    /// after this call reaches the subscription, and an ending stored before the status read is
    /// seen by the read, so nothing slips between the two.
    pub fn subscribe(&self, id: &JobId) -> Subscription {
        let mut jobs = self.registry.jobs.lock();
        let entry = jobs.entry(id.clone()).or_insert_with(|| {
            self.registry.hook(id, true);
            Entry {
                slot: Arc::default(),
                subscriptions: 0,
            }
        });
        entry.subscriptions += 1;
        let slot = Arc::clone(&entry.slot);
        drop(jobs);
        Subscription {
            registry: Arc::clone(&self.registry),
            id: id.clone(),
            slot,
            seen_progress: 0,
            done: false,
            woken: None,
        }
    }

    /// Sets what is told when a job's first subscription opens (`true`) and its last one leaves
    /// (`false`); once, before the first subscription.
    pub fn set_watch_hook(&self, hook: WatchHook) {
        if self.registry.hook.set(hook).is_err() {
            log::error!("the hub's watch hook was set twice; the first one stays");
        }
    }

    /// Hands `news` to every subscription of `id` here; returns how many there were. A job ends
    /// once: a second copy of its ending (a resync finding what a message brought) changes
    /// nothing, and progress after the ending is dropped.
    pub fn deliver(&self, id: &JobId, news: &Arc<News>) -> usize {
        // Take the slot out so the waking of many streams happens outside the lock.
        let found = self
            .registry
            .jobs
            .lock()
            .get(id)
            .map(|entry| (Arc::clone(&entry.slot), entry.subscriptions));
        let Some((slot, subscriptions)) = found else {
            return 0;
        };
        let changed = match news.update {
            Update::End(_) => slot.ending.set(Arc::clone(news)).is_ok(),
            Update::Progress(_) => slot.set_progress(news, false),
        };
        if changed {
            slot.changed.notify_waiters();
        }
        subscriptions
    }

    /// Ends every subscription (shutdown), and every one made afterwards.
    pub fn close(&self) {
        self.registry.closed.store(true, Ordering::Release);
        let slots: Vec<Arc<Slot>> = self
            .registry
            .jobs
            .lock()
            .values()
            .map(|entry| Arc::clone(&entry.slot))
            .collect();
        for slot in slots {
            slot.changed.notify_waiters();
        }
    }

    /// How many jobs have at least one subscription here.
    pub fn watched_jobs(&self) -> usize {
        self.registry.jobs.lock().len()
    }

    /// How many subscriptions are open here on `id`.
    pub fn subscriptions_on(&self, id: &JobId) -> usize {
        self.registry
            .jobs
            .lock()
            .get(id)
            .map_or(0, |entry| entry.subscriptions)
    }

    /// The ids of every job watched here.
    pub fn watched_ids(&self) -> Vec<JobId> {
        self.registry.jobs.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MoveUrl;
    use futures_util::StreamExt;

    fn completed() -> Arc<News> {
        News::ended(Ending::Complete {
            target: MoveUrl::parse("/next").unwrap(),
        })
    }

    fn progress(percent: f64) -> Arc<News> {
        progress_at(percent, 0)
    }

    fn progress_at(percent: f64, at: i64) -> Arc<News> {
        News::progress(Progress {
            percent: Some(crate::domain::Percent::parse(percent).unwrap()),
            message: None,
            at,
        })
    }

    fn percent_of(news: &News) -> f64 {
        match &news.update {
            Update::Progress(p) => p.percent.unwrap().get(),
            Update::End(_) => panic!("an ending, not progress"),
        }
    }

    #[tokio::test]
    async fn every_subscriber_gets_the_news_and_the_last_one_frees_the_entry() {
        let hub = Hub::new();
        let id = JobId::generate();
        let mut subs: Vec<_> = (0..3).map(|_| Box::pin(hub.subscribe(&id))).collect();
        assert_eq!(hub.watched_jobs(), 1);
        assert_eq!(hub.subscriptions_on(&id), 3);
        assert_eq!(hub.deliver(&id, &completed()), 3);
        for sub in &mut subs {
            let news = sub.next().await.unwrap();
            assert_eq!(news.update, completed().update);
            assert!(sub.next().await.is_none(), "a job ends once");
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
        let mut waiting = Box::pin(hub.subscribe(&id));
        let waiter = tokio::spawn(async move { waiting.next().await });
        tokio::task::yield_now().await;
        hub.close();
        assert!(waiter.await.unwrap().is_none());
        assert!(Box::pin(hub.subscribe(&id)).next().await.is_none());
    }

    #[tokio::test]
    async fn news_delivered_before_the_wait_is_not_missed() {
        let hub = Hub::new();
        let id = JobId::generate();
        let mut sub = Box::pin(hub.subscribe(&id));
        hub.deliver(&id, &completed());
        hub.deliver(&id, &completed());
        assert!(sub.next().await.is_some());
    }

    #[tokio::test]
    async fn a_pending_read_is_shared_with_later_streams_of_the_job_until_the_last_leaves() {
        let hub = Hub::new();
        let id = JobId::generate();
        let first = hub.subscribe(&id);
        assert!(!first.pending_read_is_fresh());
        first.record_pending_read();
        let second = hub.subscribe(&id);
        assert!(second.pending_read_is_fresh());
        assert!(second.delivered().is_none());
        hub.deliver(&id, &completed());
        assert!(hub.subscribe(&id).delivered().is_some());
        drop((first, second));
        let fresh = hub.subscribe(&id);
        assert!(!fresh.pending_read_is_fresh());
        assert!(fresh.delivered().is_none());
    }

    #[tokio::test]
    async fn a_pending_read_vouches_for_joining_streams_for_a_second_only() {
        let hub = Hub::new();
        let id = JobId::generate();
        let first = hub.subscribe(&id);
        first.record_pending_read();
        assert!(hub.subscribe(&id).pending_read_is_fresh());
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        assert!(
            !hub.subscribe(&id).pending_read_is_fresh(),
            "a stale read must be made again"
        );
    }

    #[tokio::test]
    async fn news_with_no_subscriber_reaches_nobody() {
        let hub = Hub::new();
        assert_eq!(hub.deliver(&JobId::generate(), &completed()), 0);
        assert_eq!(hub.watched_jobs(), 0);
    }

    #[tokio::test]
    async fn a_slow_stream_gets_the_latest_progress_and_the_ending_overtakes_it() {
        let hub = Hub::new();
        let id = JobId::generate();
        let mut sub = Box::pin(hub.subscribe(&id));
        for percent in [10.0, 20.0, 30.0] {
            hub.deliver(&id, &progress(percent));
        }
        assert_eq!(percent_of(&sub.next().await.unwrap()), 30.0, "no backlog");
        hub.deliver(&id, &progress(40.0));
        hub.deliver(&id, &completed());
        hub.deliver(&id, &progress(50.0));
        assert_eq!(sub.next().await.unwrap().update, completed().update);
        assert!(sub.next().await.is_none());
    }

    #[tokio::test]
    async fn stored_progress_is_offered_only_to_a_slot_without_a_newer_report() {
        let hub = Hub::new();
        let id = JobId::generate();
        let mut first = Box::pin(hub.subscribe(&id));
        first.offer_stored_progress(&progress(10.0));
        assert_eq!(percent_of(&first.next().await.unwrap()), 10.0);
        hub.deliver(&id, &progress(20.0));
        assert_eq!(percent_of(&first.next().await.unwrap()), 20.0);
        let mut second = Box::pin(hub.subscribe(&id));
        second.offer_stored_progress(&progress(10.0));
        assert_eq!(percent_of(&second.next().await.unwrap()), 20.0);
    }

    /// A replayed message, or one overtaken on its way, carries a report older than the one the
    /// streams have: it changes nothing, for a stream waiting now or one joining later.
    #[tokio::test]
    async fn an_older_report_never_replaces_a_newer_one() {
        use futures_util::FutureExt as _;
        let hub = Hub::new();
        let id = JobId::generate();
        let mut waiting = Box::pin(hub.subscribe(&id));
        hub.deliver(&id, &progress_at(60.0, 2_000));
        hub.deliver(&id, &progress_at(40.0, 1_000));
        assert_eq!(percent_of(&waiting.next().await.unwrap()), 60.0);
        hub.deliver(&id, &progress_at(40.0, 1_000));
        assert!(
            waiting.next().now_or_never().is_none(),
            "the older report wakes no stream"
        );
        let mut joining = Box::pin(hub.subscribe(&id));
        assert_eq!(percent_of(&joining.next().await.unwrap()), 60.0);
        hub.deliver(&id, &progress_at(65.0, 2_000));
        assert_eq!(
            percent_of(&waiting.next().await.unwrap()),
            65.0,
            "of two reports of the same millisecond, the later arrival"
        );
        hub.deliver(&id, &progress_at(80.0, 3_000));
        assert_eq!(percent_of(&waiting.next().await.unwrap()), 80.0);
    }

    /// Every stream of the job encodes what its subscription hands it: the ones waiting when
    /// the ending arrives, one joining afterwards, and a second copy of the ending (a resync)
    /// changes nothing. One encoding between them all.
    #[tokio::test]
    async fn news_is_encoded_once_whoever_asks() {
        let hub = Hub::new();
        let id = JobId::generate();
        let mut waiting: Vec<_> = (0..3).map(|_| Box::pin(hub.subscribe(&id))).collect();
        hub.deliver(&id, &completed());
        hub.deliver(&id, &completed());
        let late = hub.subscribe(&id);
        let mut handed = Vec::new();
        for sub in &mut waiting {
            handed.push(sub.next().await.expect("the ending"));
        }
        handed.push(
            late.delivered()
                .expect("the ending, to a late subscription"),
        );
        let encodings = std::sync::atomic::AtomicUsize::new(0);
        for news in &handed {
            let encoded = news.encoded(|_| {
                encodings.fetch_add(1, Ordering::Relaxed);
                "encoded".into()
            });
            assert_eq!(encoded, "encoded");
        }
        assert_eq!(encodings.load(Ordering::Relaxed), 1);
    }
}
