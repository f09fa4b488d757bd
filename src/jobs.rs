//! The two actions that change a job, shared by the API, the admin page and the demo form.
//! Each logs one line at info level; the moveUrl (which may carry secrets) is never logged.

use crate::domain::{Job, JobId, MoveUrl};
use crate::error::AppError;
use crate::startup::AppState;
use crate::store::Completion;

pub async fn create(state: &AppState, move_url: Option<MoveUrl>) -> Result<Job, AppError> {
    let job = state.store.create_job(move_url).await?;
    state.metrics.jobs_created.inc();
    log::info!("job {} created", job.id);
    Ok(job)
}

/// Stores the completion durably, then publishes it. Completing again returns the stored job
/// and changes nothing.
pub async fn complete(
    state: &AppState,
    id: &JobId,
    move_url: Option<MoveUrl>,
) -> Result<Job, AppError> {
    match state.store.complete_job(id, move_url).await? {
        Completion::Completed(job) => {
            state.metrics.jobs_completed.inc();
            let reached = state.hub.publish(&job).await;
            log::info!("job {id} completed; {reached} stream(s) here notified");
            Ok(job)
        }
        Completion::AlreadyComplete(job) => Ok(job),
        Completion::NotFound => Err(AppError::JobNotFound),
    }
}
