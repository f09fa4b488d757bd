//! Batching of the two hot statements: the status read every new stream makes, and the
//! completion every job runner sends (group commit).
//!
//! Each kind has one task that takes everything queued since its last round trip and answers it
//! with a single statement (`WHERE id IN (…)`; one `UPDATE … RETURNING` for completions, which
//! commits once for the whole batch). Under load that turns hundreds of database round trips, each
//! a hop to the database driver's thread and back, into a few; with nothing queued a request is a
//! batch of one and costs what it did before. Every caller is answered only after its statement
//! has returned, so a completion is still durable before it is acknowledged or published. A single
//! completion task also means SQLite never sees two writers fight over its lock.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};

use super::{Completion, Pool, StoreError, complete_many, complete_one, get_many, get_one};
use crate::domain::{Job, JobId, MoveUrl};

/// The most requests one statement answers; also bounds the SQL text and its parameters.
pub(super) const MAX_BATCH: usize = 64;

/// How many requests may wait for their turn before callers wait to enqueue.
const QUEUE: usize = 8192;

struct Read {
    id: JobId,
    reply: oneshot::Sender<Result<Option<Job>, StoreError>>,
}

struct Complete {
    id: JobId,
    move_url: Option<MoveUrl>,
    reply: oneshot::Sender<Result<Completion, StoreError>>,
}

/// The queues in front of the two batching tasks; the tasks end when the last clone is dropped.
#[derive(Debug, Clone)]
pub(super) struct Batcher {
    reads: mpsc::Sender<Read>,
    completions: mpsc::Sender<Complete>,
}

impl Batcher {
    /// Starts the two tasks on the current tokio runtime.
    pub(super) fn start(pool: Pool) -> Self {
        let (reads, read_rx) = mpsc::channel(QUEUE);
        let (completions, complete_rx) = mpsc::channel(QUEUE);
        tokio::spawn(serve_reads(pool.clone(), read_rx));
        tokio::spawn(serve_completions(pool, complete_rx));
        Self { reads, completions }
    }

    pub(super) async fn get(&self, id: &JobId) -> Result<Option<Job>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let read = Read {
            id: id.clone(),
            reply,
        };
        self.reads
            .send(read)
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    pub(super) async fn complete(
        &self,
        id: &JobId,
        move_url: Option<MoveUrl>,
    ) -> Result<Completion, StoreError> {
        let (reply, answer) = oneshot::channel();
        let complete = Complete {
            id: id.clone(),
            move_url,
            reply,
        };
        self.completions
            .send(complete)
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

async fn serve_reads(pool: Pool, mut queue: mpsc::Receiver<Read>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let ids: Vec<JobId> = batch.iter().map(|read| read.id.clone()).collect();
        match get_many(&pool, &ids).await {
            Ok(jobs) => {
                let jobs = by_id(jobs);
                for read in batch.drain(..) {
                    let _ = read.reply.send(Ok(jobs.get(&read.id).cloned()));
                }
            }
            Err(err) => {
                // One by one, so each caller gets the error of its own statement.
                log::warn!("a batched job read failed, retrying one by one: {err}");
                for read in batch.drain(..) {
                    let _ = read.reply.send(get_one(&pool, &read.id).await);
                }
            }
        }
    }
}

async fn serve_completions(pool: Pool, mut queue: mpsc::Receiver<Complete>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // A job named twice in one batch: the first request completes it, the later ones run
        // after the batch and find it complete, exactly as if they had come later.
        let mut seen = HashMap::with_capacity(batch.len());
        let (first, again): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .partition(|c: &Complete| seen.insert(c.id.clone(), ()).is_none());
        let items: Vec<(JobId, Option<MoveUrl>)> = first
            .iter()
            .map(|c| (c.id.clone(), c.move_url.clone()))
            .collect();
        match complete_many(&pool, &items).await {
            Ok(done) => answer_completions(&pool, first, by_id(done)).await,
            Err(err) => {
                log::warn!("a batched completion failed, retrying one by one: {err}");
                for c in first {
                    let _ = c.reply.send(complete_one(&pool, &c.id, c.move_url).await);
                }
            }
        }
        for c in again {
            let _ = c.reply.send(complete_one(&pool, &c.id, c.move_url).await);
        }
    }
}

/// Answers a committed batch: jobs it changed were completed by their caller; the others were
/// complete already or do not exist, which one more (batched) read tells apart.
async fn answer_completions(pool: &Pool, batch: Vec<Complete>, mut done: HashMap<JobId, Job>) {
    let (completed, rest): (Vec<_>, Vec<_>) =
        batch.into_iter().partition(|c| done.contains_key(&c.id));
    for c in completed {
        if let Some(job) = done.remove(&c.id) {
            let _ = c.reply.send(Ok(Completion::Completed(job)));
        }
    }
    if rest.is_empty() {
        return;
    }
    let ids: Vec<JobId> = rest.iter().map(|c| c.id.clone()).collect();
    match get_many(pool, &ids).await {
        Ok(jobs) => {
            let jobs = by_id(jobs);
            for c in rest {
                let answer = match jobs.get(&c.id) {
                    Some(job) => Completion::AlreadyComplete(job.clone()),
                    None => Completion::NotFound,
                };
                let _ = c.reply.send(Ok(answer));
            }
        }
        Err(err) => {
            log::warn!("a batched read after completions failed, retrying one by one: {err}");
            for c in rest {
                let answer = get_one(pool, &c.id).await.map(|job| match job {
                    Some(job) => Completion::AlreadyComplete(job),
                    None => Completion::NotFound,
                });
                let _ = c.reply.send(answer);
            }
        }
    }
}

fn by_id(jobs: Vec<Job>) -> HashMap<JobId, Job> {
    jobs.into_iter().map(|job| (job.id.clone(), job)).collect()
}
