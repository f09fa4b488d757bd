//! The actions that change jobs: creating and completing one (shared by the API, the admin page
//! and the demo form), and purging old ones in the background. Each logs one line at info level;
//! the moveUrl (which may carry secrets) is never logged.

use std::time::Duration;

use crate::domain::{Job, JobId, MoveUrl, now_millis};
use crate::error::AppError;
use crate::startup::AppState;
use crate::store::{Completion, StoreError};

pub async fn create(state: &AppState, move_url: Option<MoveUrl>) -> Result<Job, AppError> {
    let job = state.store.create_job(move_url).await?;
    state.metrics.jobs_created.inc();
    log::info!("job {} created", job.id);
    Ok(job)
}

/// Stores the completion durably, then publishes it. Completing again returns the stored job
/// and changes nothing stored, but publishes it once more: the first call may have committed and
/// then failed to answer or to publish (connection dropped, instance killed, nginx passing the
/// retry to another instance), and its waiting tabs should not wait for a resync or a timeout.
///
/// Both steps run in a task of their own: actix drops a handler whose client went away, and a
/// completion already on its way to the database must still be published once it is stored.
pub async fn complete(
    state: &AppState,
    id: &JobId,
    move_url: Option<MoveUrl>,
) -> Result<Job, AppError> {
    let store = state.store.clone();
    let hub = state.hub.clone();
    let completed = state.metrics.jobs_completed.clone();
    let id = id.clone();
    let task = tokio::spawn(async move {
        match store.complete_job(&id, move_url).await? {
            Completion::Completed(job) => {
                completed.inc();
                let reached = hub.publish(&job).await;
                log::info!("job {id} completed; {reached} stream(s) here notified");
                Ok(job)
            }
            Completion::AlreadyComplete(job) => {
                // A duplicate delivery is harmless: a stream ends at its first result.
                hub.publish(&job).await;
                Ok(job)
            }
            Completion::NotFound => Err(AppError::JobNotFound),
        }
    });
    match task.await {
        Ok(done) => done,
        // Only when the runtime shuts down (a panic in the task would be a bug, and says so).
        Err(err) if err.is_cancelled() => Err(StoreError::ShuttingDown.into()),
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

/// Deletes jobs older than `retention` now, then every quarter of it (between 1 s and 1 h),
/// until shutdown. A purged job is simply gone: it answers like one that never existed.
/// A failed purge (database down) is logged and retried at the next round.
pub async fn purge_old_jobs(state: &AppState, retention: Duration) {
    let every = (retention / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
    let retention_millis = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match state
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
