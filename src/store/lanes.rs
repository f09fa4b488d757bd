//! The hot requests, batched: status reads (every new stream makes one) on the read lane, job
//! creation and completion on the write lane, which group-commits.
//!
//! Each lane is a [`Queue`] with a connection of its own. Under load hundreds of round trips
//! become a few; with nothing queued a request is a batch of one. Every caller is answered only
//! after its statement has returned, so a completion is durable before it is acknowledged or
//! published, and one writer means SQLite never sees two of ours fight over its lock.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;

use super::batch::{Batch, Queue};
use super::db::LaneConn;
use super::sql::{self, MAX_BATCH, Rows};
use super::{Completion, StoreError};
use crate::domain::{Job, JobId, MoveUrl};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Reads the stored jobs among some ids.
struct Read {
    ids: Vec<JobId>,
    reply: Reply<Vec<Job>>,
}

enum Write {
    Create {
        job: Job,
        reply: Reply<()>,
    },
    Complete {
        id: JobId,
        move_url: Option<MoveUrl>,
        reply: Reply<Completion>,
    },
}

/// The write lane's connection, and the flag `/healthz` reads.
struct Writer {
    conn: LaneConn,
    /// Set after a failed write, cleared after one that went through.
    failing: Arc<AtomicBool>,
}

/// The two lanes: reads on one connection, writes on another (SQLite in WAL mode reads on while
/// it writes); cheap to clone.
#[derive(Clone)]
pub(super) struct Lanes {
    reads: Arc<Queue<Read>>,
    writes: Arc<Queue<Write>>,
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes").finish_non_exhaustive()
    }
}

/// Waits for a lane's answer; a lane that dropped the request was stopped by the shutdown.
async fn answer<T>(answer: oneshot::Receiver<Result<T, StoreError>>) -> Result<T, StoreError> {
    answer.await.map_err(|_| StoreError::ShuttingDown)?
}

impl Lanes {
    pub(super) fn new(reader: LaneConn, writer: LaneConn, writes_failing: Arc<AtomicBool>) -> Self {
        Self {
            reads: Queue::new(reader),
            writes: Queue::new(Writer {
                conn: writer,
                failing: writes_failing,
            }),
        }
    }

    /// The stored jobs among `ids`, in no particular order; unknown ids are left out.
    pub(super) async fn get_many(&self, ids: Vec<JobId>) -> Result<Vec<Job>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.reads.push(Read { ids, reply });
        answer(rx).await
    }

    pub(super) async fn create(&self, job: Job) -> Result<(), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writes.push(Write::Create { job, reply });
        answer(rx).await
    }

    pub(super) async fn complete(
        &self,
        id: &JobId,
        move_url: Option<MoveUrl>,
    ) -> Result<Completion, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writes.push(Write::Complete {
            id: id.clone(),
            move_url,
            reply,
        });
        answer(rx).await
    }
}

impl Batch for Read {
    type Worker = LaneConn;

    async fn serve(conn: &mut LaneConn, batch: Vec<Self>) {
        let ids: Vec<JobId> = batch.iter().flat_map(|read| read.ids.clone()).collect();
        match sql::select_many(conn, &ids).await {
            Ok(rows) => {
                for read in batch {
                    let jobs = read
                        .ids
                        .iter()
                        .filter_map(|id| row_for(&rows, id))
                        .collect();
                    let _ = read.reply.send(jobs);
                }
            }
            Err(err) => fail_all("reading", batch.into_iter().map(|read| read.reply), err),
        }
    }

    fn interrupted(conn: &mut LaneConn) {
        conn.forget();
    }
}

impl Batch for Write {
    type Worker = Writer;

    async fn serve(writer: &mut Writer, batch: Vec<Self>) {
        let mut creates = Vec::new();
        let mut completions = Vec::new();
        for write in batch {
            match write {
                Write::Create { job, reply } => creates.push((job, reply)),
                Write::Complete {
                    id,
                    move_url,
                    reply,
                } => completions.push((id, move_url, reply)),
            }
        }
        // Creations first: a completion queued behind its job's creation must find the job.
        // Each statement commits on its own, so each chunk is answered from its own statement.
        while !creates.is_empty() {
            let chunk = take_chunk(&mut creates);
            let jobs: Vec<&Job> = chunk.iter().map(|(job, _)| job).collect();
            let written = sql::insert_many(&mut writer.conn, &jobs).await;
            writer.failing.store(written.is_err(), Ordering::Relaxed);
            match written {
                Ok(()) => {
                    for (_, reply) in chunk {
                        let _ = reply.send(Ok(()));
                    }
                }
                Err(err) => fail_all("storing", chunk.into_iter().map(|(_, reply)| reply), err),
            }
        }
        // A job named twice in one batch: the first request completes it, the later ones run
        // in a round after it and find it complete, exactly as if they had come later.
        while !completions.is_empty() {
            let mut seen = HashSet::with_capacity(completions.len());
            let (mut round, again): (Vec<_>, Vec<_>) = completions
                .into_iter()
                .partition(|(id, _, _)| seen.insert(id.clone()));
            completions = again;
            while !round.is_empty() {
                complete_round(writer, take_chunk(&mut round)).await;
            }
        }
    }

    fn interrupted(writer: &mut Writer) {
        writer.conn.forget();
    }
}

/// The first [`MAX_BATCH`] requests of `queue` (one statement's worth), taken out of it.
fn take_chunk<T>(queue: &mut Vec<T>) -> Vec<T> {
    let rest = queue.split_off(queue.len().min(MAX_BATCH));
    std::mem::replace(queue, rest)
}

/// Answers every request of a failed statement with its one error, logged once.
fn fail_all<T>(doing: &str, replies: impl ExactSizeIterator<Item = Reply<T>>, err: sqlx::Error) {
    log::warn!("{doing} {} job(s) failed: {err}", replies.len());
    let err = Arc::new(err);
    for reply in replies {
        let _ = reply.send(Err(StoreError::Shared(Arc::clone(&err))));
    }
}

fn row_for(rows: &Rows, id: &JobId) -> Option<Result<Job, StoreError>> {
    rows.get(id.as_str()).cloned().map(Job::try_from)
}

type CompleteRequest = (JobId, Option<MoveUrl>, Reply<Completion>);

/// Completes distinct jobs in one statement. The jobs it did not change were complete already
/// or do not exist, which one more read on the same connection tells apart.
async fn complete_round(writer: &mut Writer, round: Vec<CompleteRequest>) {
    let items: Vec<(&JobId, Option<&MoveUrl>)> = round
        .iter()
        .map(|(id, move_url, _)| (id, move_url.as_ref()))
        .collect();
    let written = sql::complete_many(&mut writer.conn, &items).await;
    writer.failing.store(written.is_err(), Ordering::Relaxed);
    let done = match written {
        Ok(done) => done,
        Err(err) => {
            fail_all(
                "completing",
                round.into_iter().map(|(_, _, reply)| reply),
                err,
            );
            return;
        }
    };
    let unchanged: Vec<JobId> = round
        .iter()
        .filter(|(id, _, _)| !done.contains_key(id.as_str()))
        .map(|(id, _, _)| id.clone())
        .collect();
    let stored = if unchanged.is_empty() {
        Ok(Rows::new())
    } else {
        sql::select_many(&mut writer.conn, &unchanged)
            .await
            .map_err(Arc::new)
    };
    for (id, _, reply) in round {
        let answer = if let Some(job) = row_for(&done, &id) {
            job.map(Completion::Completed)
        } else {
            match &stored {
                Ok(rows) => match row_for(rows, &id) {
                    Some(job) => job.map(Completion::AlreadyComplete),
                    None => Ok(Completion::NotFound),
                },
                Err(err) => Err(StoreError::Shared(Arc::clone(err))),
            }
        };
        let _ = reply.send(answer);
    }
}
