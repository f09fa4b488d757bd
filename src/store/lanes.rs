//! The hot requests, batched: status reads (every new stream makes one) on the read lane; job
//! creation, endings, progress and expiry on the write lane, which group-commits.
//!
//! Each lane is a [`Queue`] with a connection of its own. Under load hundreds of round trips
//! become a few; with nothing queued a request is a batch of one. Every caller is answered only
//! after its statement has returned, so a completion is durable before it is acknowledged or
//! published, and one writer means SQLite never sees two of ours fight over its lock.
//!
//! The write lane's queue is bounded per kind of write ([`WriteClass`]): creations, endings, and
//! the timers' progress and expiry writes each have their own room, so a flood of creations is
//! refused ([`StoreError::Busy`]) while completions still find room; and each batch runs at most
//! one room's worth of creations before the endings waiting with them. The read lane's queue has
//! a room of its own, so a flood of lookups is refused too instead of queueing without end; and a
//! read whose caller has gone (its client hung up, so actix dropped the handler) is skipped.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::oneshot;

use super::batch::{Batch, Full, Queue};
use super::checkpoint::{self, Checkpoints};
use super::db::{Db, LaneConn};
use super::sql::{self, EndItem, MAX_BATCH, Rows};
use super::{EndRequest, Ended, StoreError};
use crate::domain::{Job, JobId, JobStatus, Progress};
use crate::metrics::{StoreTimings, statement};

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
    End {
        id: JobId,
        request: EndRequest,
        reply: Reply<Ended>,
    },
    Progress {
        reports: Vec<(JobId, Progress)>,
        reply: Reply<()>,
    },
    Expire {
        now: i64,
        reply: Reply<Vec<Job>>,
    },
    /// With webhooks on: how many streams took each job's ending since the last round.
    Receipts {
        receipts: Vec<(JobId, i64)>,
        now: i64,
        due: i64,
        reply: Reply<()>,
    },
}

/// The kinds of write that never take each other's room in the write lane's queue.
#[derive(Debug, Clone, Copy)]
enum WriteClass {
    Create = 0,
    End = 1,
    /// The timers' writes: one progress store, one expiry sweep and one record of receipts at a
    /// time.
    Upkeep = 2,
}

/// Room for the timers' writes; each timer has at most one waiting.
const UPKEEP_ROOM: usize = 16;

impl WriteClass {
    const ALL: [Self; 3] = [Self::Create, Self::End, Self::Upkeep];

    /// Its name for `/metrics`.
    fn name(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::End => "end",
            Self::Upkeep => "upkeep",
        }
    }

    /// What is waiting, as a refusal names it.
    fn what(self) -> &'static str {
        match self {
            Self::Create => "job creations",
            Self::End => "job completions and failures",
            Self::Upkeep => "progress and expiry writes",
        }
    }
}

impl Write {
    fn write_class(&self) -> WriteClass {
        match self {
            Write::Create { .. } => WriteClass::Create,
            Write::End { .. } => WriteClass::End,
            Write::Progress { .. } | Write::Expire { .. } | Write::Receipts { .. } => {
                WriteClass::Upkeep
            }
        }
    }
}

/// The read lane's connection.
struct Reader {
    conn: LaneConn,
    timings: StoreTimings,
}

/// The write lane's connection, and the flag `/healthz` reads.
struct Writer {
    conn: LaneConn,
    timings: StoreTimings,
    /// Set after a failed write, cleared after one that went through.
    failing: Arc<AtomicBool>,
    /// With webhooks on, how long a webhook waits for a stream (ms): endings and expiries then
    /// write their outbox rows in their own transaction.
    outbox: Option<i64>,
    /// On SQLite: the checkpoints taken off this lane, told of its commits.
    checkpoints: Option<Checkpoints>,
}

/// The two lanes: reads on one connection, writes on another (SQLite in WAL mode reads on while
/// it writes); cheap to clone.
#[derive(Clone)]
pub(super) struct Lanes {
    reads: Arc<Queue<Read>>,
    writes: Arc<Queue<Write>>,
    /// The write lane's room per [`WriteClass`].
    rooms: [usize; 3],
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
    /// `write_room`: how many creations, and apart from them how many endings, may wait for the
    /// write lane at once; `read_room`: how many reads may wait for the read lane. `outbox` and
    /// `checkpoints`: see [`Writer`].
    pub(super) fn new(
        reader: LaneConn,
        writer: LaneConn,
        writes_failing: Arc<AtomicBool>,
        (write_room, read_room): (usize, usize),
        outbox: Option<i64>,
        checkpoints: Option<Checkpoints>,
        timings: StoreTimings,
    ) -> Self {
        let mut bounds = [0; 3];
        bounds[WriteClass::Create as usize] = write_room;
        bounds[WriteClass::End as usize] = write_room;
        bounds[WriteClass::Upkeep as usize] = UPKEEP_ROOM;
        Self {
            reads: Queue::new(
                Reader {
                    conn: reader,
                    timings: timings.clone(),
                },
                &[read_room],
            ),
            writes: Queue::new(
                Writer {
                    conn: writer,
                    timings,
                    failing: writes_failing,
                    outbox,
                    checkpoints,
                },
                &bounds,
            ),
            rooms: bounds,
        }
    }

    /// Write requests waiting for the write lane's next batch, by kind (`create`, `end`,
    /// `upkeep`), each with its room: how many may wait.
    pub(super) fn writes_waiting(&self) -> [(&'static str, usize, usize); 3] {
        let waiting = self.writes.waiting();
        WriteClass::ALL.map(|class| {
            let i = class as usize;
            (class.name(), waiting[i], self.rooms[i])
        })
    }

    /// The stored jobs among `ids`, in no particular order; unknown ids are left out. Refused
    /// ([`StoreError::Busy`]) when the read lane has its room full.
    pub(super) async fn get_many(&self, ids: Vec<JobId>) -> Result<Vec<Job>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.reads
            .push(Read { ids, reply })
            .map_err(|Full { bound }| StoreError::Busy {
                what: "job reads",
                waiting: bound,
            })?;
        answer(rx).await
    }

    /// Queues `write` on the write lane and waits for its answer, or says its room is full.
    async fn write<T>(&self, write: impl FnOnce(Reply<T>) -> Write) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        let write = write(reply);
        let class = write.write_class();
        self.writes
            .push(write)
            .map_err(|Full { bound }| StoreError::Busy {
                what: class.what(),
                waiting: bound,
            })?;
        answer(rx).await
    }

    pub(super) async fn create(&self, job: Job) -> Result<(), StoreError> {
        self.write(|reply| Write::Create { job, reply }).await
    }

    pub(super) async fn end(&self, id: &JobId, request: EndRequest) -> Result<Ended, StoreError> {
        let id = id.clone();
        self.write(|reply| Write::End { id, request, reply }).await
    }

    /// Ends several jobs, queued together so that they share the write lane's next batch (and
    /// its statements, a statement's worth of distinct jobs per status at a time); each answer in
    /// the order of `endings`. A job named twice is ended by its first request, which the later
    /// ones find, as if they had come later. Refused as a whole when the endings' room is full.
    pub(super) async fn end_many(
        &self,
        endings: Vec<(JobId, EndRequest)>,
    ) -> Vec<Result<Ended, StoreError>> {
        let (writes, answers): (Vec<Write>, Vec<_>) = endings
            .into_iter()
            .map(|(id, request)| {
                let (reply, rx) = oneshot::channel();
                (Write::End { id, request, reply }, rx)
            })
            .unzip();
        if let Err(Full { bound }) = self.writes.push_many(writes) {
            return answers
                .iter()
                .map(|_| {
                    Err(StoreError::Busy {
                        what: WriteClass::End.what(),
                        waiting: bound,
                    })
                })
                .collect();
        }
        let mut ended = Vec::with_capacity(answers.len());
        for rx in answers {
            ended.push(answer(rx).await);
        }
        ended
    }

    pub(super) async fn save_progress(
        &self,
        reports: Vec<(JobId, Progress)>,
    ) -> Result<(), StoreError> {
        self.write(|reply| Write::Progress { reports, reply }).await
    }

    pub(super) async fn expire_due(&self, now: i64) -> Result<Vec<Job>, StoreError> {
        self.write(|reply| Write::Expire { now, reply }).await
    }

    pub(super) async fn record_receipts(
        &self,
        receipts: Vec<(JobId, i64)>,
        now: i64,
        due: i64,
    ) -> Result<(), StoreError> {
        self.write(|reply| Write::Receipts {
            receipts,
            now,
            due,
            reply,
        })
        .await
    }
}

impl Batch for Read {
    type Worker = Reader;

    async fn serve(reader: &mut Reader, mut batch: Vec<Self>) {
        // Nobody waits for these answers any more: their reads would cost the database for
        // nothing (a flood that hangs up at once would otherwise still be read in full).
        batch.retain(|read| !read.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        let ids: Vec<JobId> = batch.iter().flat_map(|read| read.ids.clone()).collect();
        let read = sql::select_many(&mut reader.conn, &ids);
        match reader.timings.time(statement::READ, ids.len(), read).await {
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

    fn interrupted(reader: &mut Reader) {
        reader.conn.forget();
    }
}

impl Batch for Write {
    type Worker = Writer;

    fn class(&self) -> usize {
        self.write_class() as usize
    }

    async fn serve(writer: &mut Writer, batch: Vec<Self>) {
        let Sorted {
            creates,
            endings,
            progress,
            expiries,
            receipts,
        } = Sorted::from(batch);
        // An expiry sweep alone (the timers' round, every 250 ms) mostly writes nothing.
        let writes = !(creates.is_empty()
            && endings.is_empty()
            && progress.is_empty()
            && receipts.is_empty());
        // Creations first: an ending queued behind its job's creation must find the job.
        create_all(writer, creates).await;
        end_all(writer, endings).await;
        for (reports, reply) in progress {
            save_progress(writer, reports, reply).await;
        }
        for (now, reply) in expiries {
            expire(writer, now, reply).await;
        }
        for (taken, now, due, reply) in receipts {
            record_receipts(writer, taken, now, due, reply).await;
        }
        if writes {
            checkpoint_if_due(writer).await;
        }
    }

    fn interrupted(writer: &mut Writer) {
        writer.conn.forget();
    }
}

type CreateRequest = (Job, Reply<()>);
type EndingRequest = (JobId, EndRequest, Reply<Ended>);
type ProgressRequest = (Vec<(JobId, Progress)>, Reply<()>);
type ExpiryRequest = (i64, Reply<Vec<Job>>);
type ReceiptsRequest = (Vec<(JobId, i64)>, i64, i64, Reply<()>);

/// A write batch sorted by kind, each kind in the order it was queued.
#[derive(Default)]
struct Sorted {
    creates: Vec<CreateRequest>,
    endings: Vec<EndingRequest>,
    progress: Vec<ProgressRequest>,
    expiries: Vec<ExpiryRequest>,
    receipts: Vec<ReceiptsRequest>,
}

impl From<Vec<Write>> for Sorted {
    fn from(batch: Vec<Write>) -> Self {
        let mut sorted = Self::default();
        for write in batch {
            match write {
                Write::Create { job, reply } => sorted.creates.push((job, reply)),
                Write::End { id, request, reply } => sorted.endings.push((id, request, reply)),
                Write::Progress { reports, reply } => sorted.progress.push((reports, reply)),
                Write::Expire { now, reply } => sorted.expiries.push((now, reply)),
                Write::Receipts {
                    receipts,
                    now,
                    due,
                    reply,
                } => sorted.receipts.push((receipts, now, due, reply)),
            }
        }
        sorted
    }
}

/// Tells the background checkpointer of the batch's commits; and, with every request of the batch
/// answered, checkpoints the WAL here once it is past its bound (`checkpoint`'s module says why
/// the background alone cannot bound it).
async fn checkpoint_if_due(writer: &mut Writer) {
    let Some(checkpoints) = &writer.checkpoints else {
        return;
    };
    checkpoints.committed();
    if !checkpoints.over_bound() {
        return;
    }
    let done = match writer.conn.executor().await {
        Ok(Db::Sqlite(conn)) => checkpoint::passive(conn).await.map(drop),
        Ok(Db::Postgres(_)) => Ok(()),
        Err(err) => Err(err),
    };
    // Tried again after the next background checkpoint looks, not after every batch meanwhile.
    checkpoints.started_over();
    if let Err(err) = writer.conn.checked(done) {
        log::warn!("checkpointing the WAL on the write lane failed: {err}");
    }
}

/// Stores new jobs, a statement's worth at a time. Each statement commits on its own, so each
/// chunk is answered from its own statement.
async fn create_all(writer: &mut Writer, mut creates: Vec<CreateRequest>) {
    while !creates.is_empty() {
        let chunk = take_chunk(&mut creates);
        let jobs: Vec<&Job> = chunk.iter().map(|(job, _)| job).collect();
        let insert = sql::insert_many(&mut writer.conn, &jobs);
        let written = writer
            .timings
            .time(statement::CREATE, jobs.len(), insert)
            .await;
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
}

/// Ends jobs in rounds of distinct jobs, one statement per status and chunk. A job named twice
/// in one batch: the first request ends it, the later ones run in a round after it and find it
/// ended, exactly as if they had come later.
async fn end_all(writer: &mut Writer, mut endings: Vec<EndingRequest>) {
    while !endings.is_empty() {
        let mut seen = HashSet::with_capacity(endings.len());
        let (mut round, again): (Vec<_>, Vec<_>) = endings
            .into_iter()
            .partition(|(id, _, _)| seen.insert(id.clone()));
        endings = again;
        while let Some(status) = round.first().map(|(_, request, _)| request.status) {
            let (mut same, rest): (Vec<_>, Vec<_>) = round
                .into_iter()
                .partition(|(_, request, _)| request.status == status);
            round = rest;
            while !same.is_empty() {
                end_round(writer, status, take_chunk(&mut same)).await;
            }
        }
    }
}

/// Stores one timer round's latest progress reports.
async fn save_progress(writer: &mut Writer, reports: Vec<(JobId, Progress)>, reply: Reply<()>) {
    in_chunks(
        writer,
        reports,
        reply,
        ("storing progress of", statement::PROGRESS),
        async |conn, chunk| {
            let items: Vec<(&JobId, &Progress)> = chunk.iter().map(|(id, p)| (id, p)).collect();
            sql::progress_many(conn, &items).await
        },
    )
    .await;
}

/// Expires the pending jobs past their deadline at `now`, answering with those it expired.
async fn expire(writer: &mut Writer, now: i64, reply: Reply<Vec<Job>>) {
    let sweep = sql::expire_due(&mut writer.conn, now, writer.outbox);
    let expired = writer.timings.time(statement::EXPIRE, 1, sweep).await;
    writer.failing.store(expired.is_err(), Ordering::Relaxed);
    match expired {
        Ok(rows) => {
            // A corrupt row is logged and left out: the others are expired already and must
            // still be published.
            let jobs = rows
                .into_iter()
                .filter_map(|row| {
                    Job::try_from(row)
                        .inspect_err(|err| log::error!("expired a job but cannot read it: {err}"))
                        .ok()
                })
                .collect();
            let _ = reply.send(Ok(jobs));
        }
        Err(err) => fail_all("expiring", std::iter::once(reply), err),
    }
}

/// Records how many streams took each job's ending (webhooks on).
async fn record_receipts(
    writer: &mut Writer,
    taken: Vec<(JobId, i64)>,
    now: i64,
    due: i64,
    reply: Reply<()>,
) {
    in_chunks(
        writer,
        taken,
        reply,
        ("recording the streams of", statement::RECEIPTS),
        async move |conn, chunk| {
            let items: Vec<(&JobId, i64)> = chunk.iter().map(|(id, n)| (id, *n)).collect();
            sql::receipts_many(conn, &items, now, due).await
        },
    )
    .await;
}

/// Writes `items` a statement's worth ([`MAX_BATCH`]) at a time, stopping at the first failure;
/// then answers `reply` whether they went through, and notes that for `/healthz`. `doing` names
/// the write for the log and the metrics.
async fn in_chunks<T>(
    writer: &mut Writer,
    mut items: Vec<T>,
    reply: Reply<()>,
    (doing, labels): (&str, statement::Labels),
    mut write: impl AsyncFnMut(&mut LaneConn, Vec<T>) -> Result<(), sqlx::Error>,
) {
    let mut written = Ok(());
    while !items.is_empty() && written.is_ok() {
        let chunk = take_chunk(&mut items);
        let rows = chunk.len();
        let statement = write(&mut writer.conn, chunk);
        written = writer.timings.time(labels, rows, statement).await;
    }
    writer.failing.store(written.is_err(), Ordering::Relaxed);
    match written {
        Ok(()) => {
            let _ = reply.send(Ok(()));
        }
        Err(err) => fail_all(doing, std::iter::once(reply), err),
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

/// Ends distinct jobs the same way in one statement. The jobs it did not change had ended
/// already or do not exist, which one more read on the same connection tells apart.
async fn end_round(writer: &mut Writer, status: JobStatus, round: Vec<EndingRequest>) {
    let items: Vec<EndItem<'_>> = round
        .iter()
        .map(|(id, request, _)| EndItem {
            id,
            move_url: request.move_url.as_ref(),
            message: request.message.as_ref(),
        })
        .collect();
    let end = sql::end_many(&mut writer.conn, status, &items, writer.outbox);
    let written = writer.timings.time(statement::END, items.len(), end).await;
    writer.failing.store(written.is_err(), Ordering::Relaxed);
    let done = match written {
        Ok(done) => done,
        Err(err) => {
            fail_all("ending", round.into_iter().map(|(_, _, reply)| reply), err);
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
            job.map(Ended::Now)
        } else {
            match &stored {
                Ok(rows) => match row_for(rows, &id) {
                    Some(Ok(job)) if job.status == status => Ok(Ended::Already(job)),
                    Some(Ok(job)) => Ok(Ended::Conflict(job)),
                    Some(Err(err)) => Err(err),
                    None => Ok(Ended::NotFound),
                },
                Err(err) => Err(StoreError::Shared(Arc::clone(err))),
            }
        };
        let _ = reply.send(answer);
    }
}
