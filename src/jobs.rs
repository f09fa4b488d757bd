//! What can be done with a job, whoever asks (the API, the admin page, the demo form, a stream):
//! create, complete, read, watch and list, and purge old ones in the background.
//!
//! [`Jobs`] owns the store, the delivery and the metrics, and answers in domain terms
//! ([`JobsError`]); the routes translate. Each change logs one line at info level; a moveUrl
//! (which may carry secrets) is never logged.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::delivery::Delivery;
use crate::domain::{Job, JobId, MoveUrl, now_millis};
use crate::hub::{News, Subscription};
use crate::metrics::Metrics;
use crate::store::{Completion, Store, StoreError};

/// Why a use case did not go through.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("no job with this id")]
    NotFound,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a stream opened on a job waits for.
#[derive(Debug)]
pub enum Watch {
    /// The job had ended when the stream opened (connect-and-send).
    Ended(Arc<News>),
    /// Registered for the job's news.
    Waiting(Subscription),
}

/// A job as the admin page lists it.
#[derive(Debug)]
pub struct Listed {
    pub job: Job,
    /// Streams open on it on this instance.
    pub streams: usize,
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
}

impl Jobs {
    pub fn new(store: Store, delivery: Delivery, metrics: Metrics) -> Self {
        Self {
            store,
            delivery,
            metrics,
        }
    }

    pub async fn create(&self, move_url: Option<MoveUrl>) -> Result<Job, JobsError> {
        let job = self.store.create_job(move_url).await?;
        self.metrics.jobs_created.inc();
        log::info!("job {} created", job.id);
        Ok(job)
    }

    /// Stores the completion durably, then publishes it. Completing again returns the stored job
    /// and changes nothing stored, but publishes it once more: the first call may have committed
    /// and then failed to answer or to publish (connection dropped, instance killed, nginx
    /// passing the retry to another instance), and its waiting tabs should not wait for a resync
    /// or a timeout.
    ///
    /// Both steps run in a task of their own: actix drops a handler whose client went away, and
    /// a completion already on its way to the database must still be published once stored.
    pub async fn complete(&self, id: &JobId, move_url: Option<MoveUrl>) -> Result<Job, JobsError> {
        let this = self.clone();
        let id = id.clone();
        let task = tokio::spawn(async move {
            let (job, first) = match this.store.complete_job(&id, move_url).await? {
                Completion::Completed(job) => (job, true),
                Completion::AlreadyComplete(job) => (job, false),
                Completion::NotFound => return Err(JobsError::NotFound),
            };
            if let Some(ending) = job.ending() {
                let reached = this.delivery.publish(&id, ending).await;
                if first {
                    this.metrics.jobs_completed.inc();
                    log::info!("job {id} completed; {reached} stream(s) here notified");
                }
            }
            Ok(job)
        });
        match task.await {
            Ok(done) => done,
            // Only when the runtime shuts down (a panic in the task would be a bug, and says so).
            Err(err) if err.is_cancelled() => Err(StoreError::ShuttingDown.into()),
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }

    /// The job as stored.
    pub async fn get(&self, id: &JobId) -> Result<Job, JobsError> {
        self.store.get_job(id).await?.ok_or(JobsError::NotFound)
    }

    /// Registers a stream for the job's news, then reads its status, in that order: an ending
    /// stored after the read is delivered to the registration, one stored before is seen by the
    /// read. The read is skipped when the job's ending has reached its streams here already, or
    /// another stream of it here read it as pending a moment ago.
    pub async fn watch(&self, id: &JobId) -> Result<Watch, JobsError> {
        let subscription = self.delivery.hub().subscribe(id);
        if let Some(news) = subscription.delivered() {
            return Ok(Watch::Ended(news));
        }
        if subscription.pending_read_is_fresh() {
            return Ok(Watch::Waiting(subscription));
        }
        match self.get(id).await?.ending() {
            Some(ending) => Ok(Watch::Ended(News::new(ending))),
            None => {
                subscription.record_pending_read();
                Ok(Watch::Waiting(subscription))
            }
        }
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

    /// Whether the database (and Redis, when used) answer, and the last write went through.
    pub async fn health(&self) -> Health {
        let database = match self.store.ping().await {
            // Reads can go on while writes cannot (another writer holds SQLite's lock).
            Ok(()) if self.store.writes_failing() => Err("writes failing"),
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
        Health {
            database_kind: self.store.kind(),
            database,
            redis,
        }
    }

    /// Ends every open stream (shutdown); browsers reconnect, to another instance.
    pub fn close_streams(&self) {
        self.delivery.hub().close();
    }

    /// Deletes jobs older than `retention` now, then every quarter of it (between 1 s and 1 h),
    /// until `shutdown`. A purged job is simply gone: it answers like one that never existed.
    /// A failed purge (database down) is logged and retried at the next round.
    pub async fn purge_old_jobs(&self, retention: Duration, shutdown: CancellationToken) {
        let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let retention_millis = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
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
