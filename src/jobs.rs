//! What can be done with a job, whoever asks (the API, the admin page, the demo form, a stream):
//! create, report progress, complete, fail, read, watch and list; and in the background, expire
//! jobs at their deadline, store the latest progress, purge old jobs.
//!
//! A job's life: `pending` → `complete` | `failed` | `expired`, the three end states final.
//! Progress is delivered at once but stored at most every [`PROGRESS_STORE_EVERY`] per job (the
//! latest report wins), so many reports a second cost neither a commit each nor a write per
//! stream each.
//!
//! [`Jobs`] owns the store, the delivery and the metrics, and answers in domain terms
//! ([`JobsError`]); the routes translate. Each change logs one line at info level; a moveUrl
//! (which may carry secrets) is never logged.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::delivery::Delivery;
use crate::domain::{
    Job, JobId, JobStatus, Message, MoveUrl, Percent, Progress, millis, now_millis,
};
pub use crate::hub::{News, Subscription, Update};
use crate::metrics::Metrics;
pub use crate::store::EndRequest;
use crate::store::{Ended, Store, StoreError};
pub use crate::webhooks::Receipts;

/// How often the latest progress reports are stored, and pending jobs past their deadline
/// expired: a job expires within this long of its deadline.
pub const PROGRESS_STORE_EVERY: Duration = Duration::from_millis(250);
/// The demo job's length, in one-second steps.
const DEMO_STEPS: u32 = 8;

/// Why a use case did not go through.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("no job with this id")]
    NotFound,
    /// The job is in an end state that does not allow the request.
    #[error("the job is {} already", .0.as_str())]
    Ended(JobStatus),
    #[error("deadlineSecs must be from 1 to {max} (the retention)")]
    DeadlineOutOfRange { max: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long jobs may live, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// A job's deadline when its creator names none.
    pub default_deadline: Duration,
    /// How long a job is kept; no deadline may be later.
    pub retention: Duration,
}

/// What a stream opened on a job waits for.
#[derive(Debug)]
pub enum Watch {
    /// The job had ended when the stream opened (connect-and-send).
    Ended(Arc<News>),
    /// Registered for the job's news.
    Waiting(Subscription),
}

/// What a stream registered as `subscription` waits for, given the job as read after registering.
fn watch_as_read(subscription: Subscription, job: Job) -> Watch {
    match job.ending() {
        Some(ending) => Watch::Ended(News::ended(ending)),
        None => {
            subscription.record_pending_read();
            if let Some(progress) = job.progress {
                subscription.offer_stored_progress(&News::progress(progress));
            }
            Watch::Waiting(subscription)
        }
    }
}

/// One operation of a batch ([`Jobs::apply_all`]).
#[derive(Debug)]
pub enum Operation {
    /// Complete or fail, as [`Jobs::complete`] and [`Jobs::fail`].
    End(EndRequest),
    /// As [`Jobs::report_progress`].
    Progress {
        percent: Option<Percent>,
        message: Option<Message>,
    },
}

/// Waits for a task that stores and publishes: it runs on even when its caller is dropped (actix
/// drops a handler whose client went away), since an ending on its way to the database must
/// still be published once stored.
async fn finish<T>(task: tokio::task::JoinHandle<Result<T, JobsError>>) -> Result<T, JobsError> {
    match task.await {
        Ok(done) => done,
        // Only when the runtime shuts down (a panic in the task would be a bug, and says so).
        Err(err) if err.is_cancelled() => Err(StoreError::ShuttingDown.into()),
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

/// A job as the admin page lists it.
#[derive(Debug)]
pub struct Listed {
    pub job: Job,
    /// Streams open on it on this instance.
    pub streams: usize,
}

/// How long a health check's result is reused: a flood of `/healthz` calls costs at most one
/// database query (and one Redis `PING`) a second.
const HEALTH_FRESH_FOR: Duration = Duration::from_secs(1);

/// What the database and Redis answered to a health check.
#[derive(Debug, Clone, Copy)]
struct Probed {
    database: Result<(), &'static str>,
    redis: Option<Result<(), &'static str>>,
}

/// The state of what the jobs depend on, for `/healthz`.
#[derive(Debug)]
pub struct Health {
    /// `sqlite` or `postgres`.
    pub database_kind: &'static str,
    pub database: Result<(), &'static str>,
    /// `None` without Redis.
    pub redis: Option<Result<(), &'static str>>,
}

impl Health {
    pub fn is_ok(&self) -> bool {
        self.database.is_ok() && self.redis.is_none_or(|r| r.is_ok())
    }
}

/// The use cases; cheap to clone.
#[derive(Debug, Clone)]
pub struct Jobs {
    store: Store,
    delivery: Delivery,
    metrics: Metrics,
    lifetimes: Lifetimes,
    /// The latest report of each job since the last store, waiting for the next one.
    unstored_progress: Arc<Mutex<HashMap<JobId, Progress>>>,
    /// With webhooks on: the streams that wrote each job's ending, stored with the progress.
    receipts: Option<Receipts>,
    /// The last answers of the database and Redis to a health check, and when they came. A
    /// tokio `Mutex`, held across the check on purpose: callers that arrive during a check wait
    /// for its answers instead of each asking again.
    last_probe: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, Probed)>>>,
}

impl Jobs {
    /// `receipts`: `Some` with webhooks on, to count the streams that wrote each ending.
    pub fn new(
        store: Store,
        delivery: Delivery,
        metrics: Metrics,
        lifetimes: Lifetimes,
        receipts: Option<Receipts>,
    ) -> Self {
        Self {
            store,
            delivery,
            metrics,
            lifetimes,
            unstored_progress: Arc::default(),
            receipts,
            last_probe: Arc::default(),
        }
    }

    /// Creates a pending job that expires after `deadline` (default: the configured one).
    pub async fn create(
        &self,
        move_url: Option<MoveUrl>,
        deadline: Option<Duration>,
    ) -> Result<Job, JobsError> {
        let max = self.lifetimes.retention;
        let deadline = deadline.unwrap_or(self.lifetimes.default_deadline.min(max));
        if deadline < Duration::from_secs(1) || deadline > max {
            return Err(JobsError::DeadlineOutOfRange { max: max.as_secs() });
        }
        let deadline_at = now_millis().saturating_add(millis(deadline));
        let job = self.store.create_job(move_url, deadline_at).await?;
        self.metrics.jobs_created.inc();
        log::info!(job:% = job.id; "job {} created", job.id);
        Ok(job)
    }

    /// Reports how far a pending job got: delivered to its streams at once, stored within
    /// [`PROGRESS_STORE_EVERY`]. Returns the job with the report.
    pub async fn report_progress(
        &self,
        id: &JobId,
        percent: Option<Percent>,
        message: Option<Message>,
    ) -> Result<Job, JobsError> {
        let mut job = self.get(id).await?;
        if job.status.is_end() {
            return Err(JobsError::Ended(job.status));
        }
        let progress = Progress {
            percent,
            message,
            at: now_millis(),
        };
        self.unstored_progress
            .lock()
            .insert(id.clone(), progress.clone());
        self.metrics.progress_reports.inc();
        self.delivery.publish_progress(id, progress.clone()).await;
        job.progress = Some(progress);
        Ok(job)
    }

    /// Runs the landing page's demo job: a report every second, as a real job runner would
    /// send them, then completion after [`DEMO_STEPS`] seconds.
    pub fn spawn_demo_runner(&self, id: JobId) {
        let jobs = self.clone();
        tokio::spawn(async move {
            for step in 1..DEMO_STEPS {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let percent = Percent::parse(f64::from(step) * 100.0 / f64::from(DEMO_STEPS)).ok();
                let message = Message::parse(&format!("Step {step} of {DEMO_STEPS}")).ok();
                if jobs.report_progress(&id, percent, message).await.is_err() {
                    // Ended by someone else (the admin page), or the database is down.
                    return;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Err(err) = jobs.complete(&id, None).await {
                log::info!(job:% = id; "demo job {id} not completed: {err}");
            }
        });
    }

    /// Marks a pending job complete. Completing a complete job again changes nothing and
    /// answers it as stored; completing a failed or expired one is refused.
    pub async fn complete(&self, id: &JobId, move_url: Option<MoveUrl>) -> Result<Job, JobsError> {
        let request = EndRequest {
            status: JobStatus::Complete,
            move_url,
            message: None,
        };
        self.end(id, request).await
    }

    /// Marks a pending job failed, as [`Jobs::complete`] does complete.
    pub async fn fail(
        &self,
        id: &JobId,
        message: Option<Message>,
        move_url: Option<MoveUrl>,
    ) -> Result<Job, JobsError> {
        let request = EndRequest {
            status: JobStatus::Failed,
            move_url,
            message,
        };
        self.end(id, request).await
    }

    /// Stores the ending durably, then publishes it. Ending the same way again returns the
    /// stored job and changes nothing stored, but publishes it once more: the first call may have
    /// committed and then failed to answer or to publish (connection dropped, instance killed,
    /// nginx passing the retry to another instance), and its waiting tabs should not wait for a
    /// resync or a timeout.
    ///
    /// Both steps run in a task of their own: actix drops a handler whose client went away, and
    /// an ending already on its way to the database must still be published once stored.
    async fn end(&self, id: &JobId, request: EndRequest) -> Result<Job, JobsError> {
        let this = self.clone();
        let id = id.clone();
        finish(tokio::spawn(async move {
            let status = request.status;
            let ended = this.store.end_job(&id, request).await;
            this.announce(&id, status, ended).await
        }))
        .await
    }

    /// [`Jobs::end`] for several jobs at once: every ending is handed to the store together, so
    /// that they share its commits; each is published once its own commit is done. Each answer in
    /// the order of `endings`; a job named twice is handled in that order.
    pub async fn end_many(&self, endings: Vec<(JobId, EndRequest)>) -> Vec<Result<Job, JobsError>> {
        let this = self.clone();
        let count = endings.len();
        let task = tokio::spawn(async move {
            let asked: Vec<(JobId, JobStatus)> = endings
                .iter()
                .map(|(id, request)| (id.clone(), request.status))
                .collect();
            let answers = this.store.end_jobs(endings).await;
            let announced = asked
                .iter()
                .zip(answers)
                .map(|((id, status), ended)| this.announce(id, *status, ended));
            // Together, so that a slow Redis delays the batch once, not once per job.
            Ok(futures_util::future::join_all(announced).await)
        });
        // The task itself never fails: only the runtime's shutdown stops it.
        finish(task).await.unwrap_or_else(|_| {
            (0..count)
                .map(|_| Err(StoreError::ShuttingDown.into()))
                .collect()
        })
    }

    /// Applies `operations` in their order, as the single calls would one after another; each
    /// answer in that order. Consecutive endings go to the store together; a progress report on
    /// a job with an ending among them waits for that ending first.
    pub async fn apply_all(
        &self,
        operations: Vec<(JobId, Operation)>,
    ) -> Vec<Result<Job, JobsError>> {
        let mut answers: Vec<Option<Result<Job, JobsError>>> =
            operations.iter().map(|_| None).collect();
        let mut endings: Vec<(usize, JobId, EndRequest)> = Vec::new();
        let mut ending: HashSet<JobId> = HashSet::new();
        for (at, (id, operation)) in operations.into_iter().enumerate() {
            match operation {
                Operation::End(request) => {
                    ending.insert(id.clone());
                    endings.push((at, id, request));
                }
                Operation::Progress { percent, message } => {
                    if ending.contains(&id) {
                        ending.clear();
                        self.end_queued(&mut endings, &mut answers).await;
                    }
                    answers[at] = Some(self.report_progress(&id, percent, message).await);
                }
            }
        }
        self.end_queued(&mut endings, &mut answers).await;
        answers
            .into_iter()
            .map(|answer| answer.expect("every operation is answered"))
            .collect()
    }

    /// Ends the queued `endings` together, answering each at its place in `answers`.
    async fn end_queued(
        &self,
        endings: &mut Vec<(usize, JobId, EndRequest)>,
        answers: &mut [Option<Result<Job, JobsError>>],
    ) {
        if endings.is_empty() {
            return;
        }
        let (places, endings): (Vec<usize>, Vec<(JobId, EndRequest)>) = std::mem::take(endings)
            .into_iter()
            .map(|(at, id, request)| (at, (id, request)))
            .unzip();
        for (at, answer) in places.into_iter().zip(self.end_many(endings).await) {
            answers[at] = Some(answer);
        }
    }

    /// After the store answered an ending: publishes it (once more when it had ended this way
    /// already), and counts and logs a first ending.
    async fn announce(
        &self,
        id: &JobId,
        status: JobStatus,
        ended: Result<Ended, StoreError>,
    ) -> Result<Job, JobsError> {
        let (job, first) = match ended? {
            Ended::Now(job) => (job, true),
            Ended::Already(job) => (job, false),
            Ended::Conflict(job) => return Err(JobsError::Ended(job.status)),
            Ended::NotFound => return Err(JobsError::NotFound),
        };
        if let Some(ending) = job.ending() {
            let reached = self.delivery.publish(id, ending).await;
            if first {
                let (counter, done) = match status {
                    JobStatus::Failed => (&self.metrics.jobs_failed, "failed"),
                    _ => (&self.metrics.jobs_completed, "completed"),
                };
                counter.inc();
                log::info!(job:% = id, streams = reached; "job {id} {done}; {reached} stream(s) here notified");
            }
        }
        Ok(job)
    }

    /// The job as stored.
    pub async fn get(&self, id: &JobId) -> Result<Job, JobsError> {
        self.store.get_job(id).await?.ok_or(JobsError::NotFound)
    }

    /// Registers a stream for the job's news (here, and with Redis on the job's channel), then
    /// reads its status, in that order: an ending stored after the read is delivered to the
    /// registration, one stored before is seen by the read. The read is skipped when the job's
    /// ending has reached its streams here already, or another stream of it here read it as
    /// pending a moment ago (after its own channel subscription).
    pub async fn watch(&self, id: &JobId) -> Result<Watch, JobsError> {
        let subscription = self.delivery.hub().subscribe(id);
        if let Some(news) = subscription.delivered() {
            return Ok(Watch::Ended(news));
        }
        self.delivery.routed(id).await;
        if subscription.pending_read_is_fresh() {
            return Ok(Watch::Waiting(subscription));
        }
        Ok(watch_as_read(subscription, self.get(id).await?))
    }

    /// [`Jobs::watch`] for several jobs at once, for one stream: registers for every job first,
    /// then reads all of them that have not ended here with one batched read. Each job's answer,
    /// in the order of `ids`; a job that does not exist (or was purged) is `None`.
    pub async fn watch_many(&self, ids: &[JobId]) -> Result<Vec<Option<Watch>>, JobsError> {
        let hub = self.delivery.hub();
        let subscriptions: Vec<Subscription> = ids.iter().map(|id| hub.subscribe(id)).collect();
        futures_util::future::join_all(ids.iter().map(|id| self.delivery.routed(id))).await;
        let unread: Vec<JobId> = subscriptions
            .iter()
            .zip(ids)
            .filter(|(subscription, _)| subscription.delivered().is_none())
            .map(|(_, id)| id.clone())
            .collect();
        let mut stored: HashMap<JobId, Job> = if unread.is_empty() {
            HashMap::new()
        } else {
            let jobs = self.store.jobs_among(&unread).await?;
            jobs.into_iter().map(|job| (job.id.clone(), job)).collect()
        };
        Ok(subscriptions
            .into_iter()
            .zip(ids)
            .map(|(subscription, id)| match subscription.delivered() {
                Some(news) => Some(Watch::Ended(news)),
                None => stored
                    .remove(id)
                    .map(|job| watch_as_read(subscription, job)),
            })
            .collect())
    }

    /// One page of jobs, newest first, with their open streams here.
    pub async fn recent(&self, limit: i64, offset: i64) -> Result<Vec<Listed>, JobsError> {
        let hub = self.delivery.hub();
        Ok(self
            .store
            .recent_jobs(limit, offset)
            .await?
            .into_iter()
            .map(|job| Listed {
                streams: hub.subscriptions_on(&job.id),
                job,
            })
            .collect())
    }

    pub async fn count(&self) -> Result<i64, JobsError> {
        Ok(self.store.count_jobs().await?)
    }

    /// How many jobs have at least one open stream here.
    pub fn watched_jobs(&self) -> usize {
        self.delivery.hub().watched_jobs()
    }

    /// How many writes of each kind wait for the store's write lane (beyond its room for them
    /// they are refused).
    pub fn writes_waiting(&self) -> [(&'static str, usize, usize); 3] {
        self.store.writes_waiting()
    }

    /// Whether the database (and Redis, when used) answer, and the last write went through.
    /// The answers of the database and Redis are asked at most once per [`HEALTH_FRESH_FOR`];
    /// how the last write went is known here and always current.
    pub async fn health(&self) -> Health {
        let probed = self.probe().await;
        let database = match probed.database {
            // Reads can go on while writes cannot (another writer holds SQLite's lock).
            Ok(()) if self.store.writes_failing() => Err("writes failing"),
            answer => answer,
        };
        Health {
            database_kind: self.store.kind(),
            database,
            redis: probed.redis,
        }
    }

    /// What the database and Redis answered, asked anew when the last answer is stale.
    async fn probe(&self) -> Probed {
        let mut last = self.last_probe.lock().await;
        if let Some((at, probed)) = *last
            && at.elapsed() < HEALTH_FRESH_FOR
        {
            return probed;
        }
        self.metrics.health_checks.inc();
        let database = match self.store.ping().await {
            Ok(()) => Ok(()),
            Err(err) => {
                log::warn!("health check: database: {err}");
                Err("down")
            }
        };
        let redis = match self.delivery.fanout() {
            Some(fanout) => Some(fanout.check().await),
            None => None,
        };
        let probed = Probed { database, redis };
        *last = Some((tokio::time::Instant::now(), probed));
        probed
    }

    /// Where the streams count the endings they write, with webhooks on.
    pub fn receipts(&self) -> Option<&Receipts> {
        self.receipts.as_ref()
    }

    /// Ends every open stream (shutdown); browsers reconnect, to another instance.
    pub fn close_streams(&self) {
        self.delivery.hub().close();
    }

    /// Until `shutdown`: expires pending jobs past their deadline (stored, then published; with
    /// several instances sweeping, the conditional update gives each job to one), and stores the
    /// latest progress reports and (webhooks on) which streams took which ending.
    pub async fn run_timers(&self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(PROGRESS_STORE_EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                () = shutdown.cancelled() => true,
                _ = ticks.tick() => false,
            };
            self.store_progress().await;
            if let Some(receipts) = &self.receipts {
                receipts.store(&self.store).await;
            }
            // The last round stores what streams took in their last moments, so that a job the
            // user saw is not reported unclaimed after a restart.
            if stopping {
                return;
            }
            match self.store.expire_due().await {
                Ok(expired) => {
                    // Together, so that a slow Redis delays the round once, not once per job.
                    let published = expired.into_iter().filter_map(|job| {
                        let ending = job.ending()?;
                        self.metrics.jobs_expired.inc();
                        Some(async move {
                            let reached = self.delivery.publish(&job.id, ending).await;
                            log::info!(job:% = job.id, streams = reached; "job {} expired; {reached} stream(s) here notified", job.id);
                        })
                    });
                    futures_util::future::join_all(published).await;
                }
                Err(err) => log::warn!("expiring jobs failed, will retry: {err}"),
            }
        }
    }

    /// Stores the reports made since the last call, in one commit; a failure is logged, and the
    /// next report replaces what was lost.
    async fn store_progress(&self) {
        let reports: Vec<(JobId, Progress)> = std::mem::take(&mut *self.unstored_progress.lock())
            .into_iter()
            .collect();
        if reports.is_empty() {
            return;
        }
        if let Err(err) = self.store.save_progress(reports).await {
            log::warn!("storing progress reports failed: {err}");
        }
    }

    /// Deletes jobs older than `retention` now, then every quarter of it (between 1 s and 1 h),
    /// until `shutdown`. A purged job is simply gone: it answers like one that never existed.
    /// A failed purge (database down) is logged and retried at the next round.
    pub async fn purge_old_jobs(&self, retention: Duration, shutdown: CancellationToken) {
        let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let retention_millis = millis(retention);
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticks.tick() => {}
            }
            match self
                .store
                .purge_before(now_millis().saturating_sub(retention_millis))
                .await
            {
                Ok(0) => {}
                Ok(n) => log::info!("purged {n} job(s) older than {retention:?}"),
                Err(err) => log::warn!("purging old jobs failed, will retry: {err}"),
            }
        }
    }
}
