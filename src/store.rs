//! The `jobs` table in SQLite (the embedded default) or PostgreSQL (scale-out): the truth about
//! every job; the live admin sessions (`admin_sessions`); and, with webhooks on, the webhook
//! outbox (`webhooks`, written with the endings, sent from `outbox`). All SQL is in here.
//!
//! [`Store`] is the only way in. The hot statements go through the lanes (`lanes`: batched,
//! group-committed, on a generic batch runner, `batch`, with their SQL in `sql`); the rest runs on
//! a pool. Each statement is written once in SQL both databases accept, and `db` dispatches it.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

use crate::domain::{Job, JobId, JobStatus, Message, MoveUrl, Progress, now_millis};
use crate::metrics::StoreTimings;

mod batch;
mod checkpoint;
mod db;
mod lanes;
mod outbox;
mod sql;

use checkpoint::Checkpoints;
use db::{Db, JOB_COLUMNS, JobRow, LaneConn, Pool, on_db};
use lanes::Lanes;
pub use outbox::{DueWebhook, Settled};

/// A database failure; its text goes to the log, never to a client.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// One failure answered to every request of a batch.
    #[error("database error: {0}")]
    Shared(Arc<sqlx::Error>),
    /// The request was cut off by the server shutting down; it may or may not have been stored.
    #[error("cut off by the server shutting down")]
    ShuttingDown,
    /// The write lane already has `waiting` requests of this kind queued, its room for them:
    /// nothing was stored, and a retry shortly may go through.
    #[error("{waiting} {what} are waiting for the database, the limit")]
    Busy { what: &'static str, waiting: usize },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the folder for the SQLite file {path}: {source}")]
    Folder {
        path: String,
        source: std::io::Error,
    },
    #[error("a stored row is corrupt: {0}")]
    Corrupt(String),
}

/// How a request wants a job to end.
#[derive(Debug, Clone)]
pub struct EndRequest {
    /// `Complete` or `Failed` (expiry is the store's own sweep).
    pub status: JobStatus,
    /// Overrides the target asked for at creation.
    pub move_url: Option<MoveUrl>,
    pub message: Option<Message>,
}

/// What asking a job to end did.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// This call ended the job: publish it.
    Now(Job),
    /// The job had ended the same way already; nothing changed.
    Already(Job),
    /// The job had ended another way; nothing changed.
    Conflict(Job),
    NotFound,
}

/// Handle on the job table; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    /// For everything but the hot statements, which go through `lanes`.
    pool: Pool,
    lanes: Lanes,
    /// Whether the last write failed. A reader-only check cannot see a write lock held by
    /// someone else (SQLite in WAL mode reads on), so `/healthz` asks this too.
    writes_failing: Arc<AtomicBool>,
    /// Whether endings write webhook outbox rows (webhooks on).
    outbox: bool,
}

impl Store {
    /// Connects, creating the SQLite file and its folder when needed, and runs the migrations.
    /// On PostgreSQL the migrator holds an advisory lock, so instances may start together.
    /// `room`: how many creations, and apart from them how many endings, may wait for the
    /// write lane, and how many reads for the read lane; beyond it they are refused with
    /// [`StoreError::Busy`].
    pub async fn connect(url: &str, room: usize) -> Result<Self, StoreError> {
        Self::connect_with(
            url,
            (room, room),
            crate::config::DEFAULT_DB_POOL,
            None,
            StoreTimings::default(),
        )
        .await
    }

    /// [`Store::connect`] with rooms of their own for writes and reads (`(write_room,
    /// read_room)`), at most `pg_pool` PostgreSQL connections and, given `unclaimed`,
    /// webhooks on: every job that ends gets a webhook outbox row in the same transaction as its
    /// ending, due `unclaimed` later unless a stream takes the ending. The lanes' statements are
    /// timed into `timings`.
    pub async fn connect_with(
        url: &str,
        rooms: (usize, usize),
        pg_pool: u32,
        unclaimed: Option<Duration>,
        timings: StoreTimings,
    ) -> Result<Self, StoreError> {
        let outbox = unclaimed.map(crate::domain::millis);
        let (pool, lane_conns) = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                // WAL with synchronous=NORMAL survives a crash of the process; only an OS crash or
                // power loss can lose the last commits (README: "Durability").
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
            let path = options.get_filename();
            if let Some(folder) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(folder).map_err(|source| StoreError::Folder {
                    path: path.display().to_string(),
                    source,
                })?;
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options.clone())
                .await?;
            // The write lane never checkpoints inside a commit; `checkpoint` takes them aside.
            let writer = options.clone().pragma("wal_autocheckpoint", "0");
            let lanes = (
                LaneConn::sqlite(&options),
                LaneConn::sqlite(&writer),
                Some(Checkpoints::start(&options)),
            );
            (Db::Sqlite(pool), lanes)
        } else {
            let pool = PgPoolOptions::new()
                .max_connections(pg_pool)
                .acquire_timeout(Duration::from_secs(5))
                .connect(url)
                .await?;
            let lanes = (Db::Postgres(pool.clone()), Db::Postgres(pool.clone()), None);
            (Db::Postgres(pool), lanes)
        };
        on_db!(pool.executor(), p => sqlx::migrate!("./migrations").run(p).await?);
        let writes_failing = Arc::<AtomicBool>::default();
        let (reader, writer, checkpoints) = lane_conns;
        Ok(Self {
            pool,
            lanes: Lanes::new(
                reader,
                writer,
                Arc::clone(&writes_failing),
                rooms,
                outbox,
                checkpoints,
                timings,
            ),
            writes_failing,
            outbox: outbox.is_some(),
        })
    }

    /// True when the last write (create or complete) failed and none has succeeded since.
    pub fn writes_failing(&self) -> bool {
        self.writes_failing.load(Ordering::Relaxed)
    }

    /// Write requests waiting for the write lane's next batch, by kind: `create`, `end`
    /// (completions and failures) and `upkeep` (the timers' progress and expiry writes); each
    /// with its room, how many may wait before the next is refused.
    pub fn writes_waiting(&self) -> [(&'static str, usize, usize); 3] {
        self.lanes.writes_waiting()
    }

    /// Which database this is, for logs and health output.
    pub fn kind(&self) -> &'static str {
        match self.pool {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        on_db!(self.pool.executor(), p => {
            sqlx::query("SELECT 1").execute(p).await?;
        });
        Ok(())
    }

    /// Stores a new pending job with a fresh id, expiring at `deadline` (Unix milliseconds).
    pub async fn create_job(
        &self,
        move_url: Option<MoveUrl>,
        deadline: i64,
    ) -> Result<Job, StoreError> {
        let job = Job {
            id: JobId::generate(),
            status: JobStatus::Pending,
            move_url,
            created_at: now_millis(),
            ended_at: None,
            deadline,
            progress: None,
            message: None,
        };
        self.lanes.create(job.clone()).await?;
        Ok(job)
    }

    pub async fn get_job(&self, id: &JobId) -> Result<Option<Job>, StoreError> {
        Ok(self.lanes.get_many(vec![id.clone()]).await?.pop())
    }

    /// The stored jobs among `ids`, in no particular order; unknown ids are left out.
    pub async fn jobs_among(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
        self.lanes.get_many(ids.to_vec()).await
    }

    /// Ends a pending job as `request` says, durably, exactly once. Asking again changes nothing
    /// and returns the job as stored.
    pub async fn end_job(&self, id: &JobId, request: EndRequest) -> Result<Ended, StoreError> {
        self.lanes.end(id, request).await
    }

    /// Ends several jobs together: in the same write batch, so in as few commits as its
    /// statements allow. Each answer in the order of `endings`.
    pub async fn end_jobs(
        &self,
        endings: Vec<(JobId, EndRequest)>,
    ) -> Vec<Result<Ended, StoreError>> {
        self.lanes.end_many(endings).await
    }

    /// Stores the latest progress report of each job, for those still pending: one statement,
    /// so one commit, per 64 jobs.
    pub async fn save_progress(&self, reports: Vec<(JobId, Progress)>) -> Result<(), StoreError> {
        self.lanes.save_progress(reports).await
    }

    /// Expires every pending job past its deadline; returns those this call expired.
    pub async fn expire_due(&self) -> Result<Vec<Job>, StoreError> {
        self.lanes.expire_due(now_millis()).await
    }

    /// Records that `receipts` streams took each job's ending (webhooks on), one statement (so
    /// one commit) per 64 jobs: a webhook still waiting for a stream becomes `delivered`, due at
    /// `due`.
    pub async fn record_receipts(
        &self,
        receipts: Vec<(JobId, i64)>,
        due: i64,
    ) -> Result<(), StoreError> {
        self.lanes
            .record_receipts(receipts, now_millis(), due)
            .await
    }

    /// One page of jobs, newest first.
    pub async fn recent_jobs(&self, limit: i64, offset: i64) -> Result<Vec<Job>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, id LIMIT $1 OFFSET $2"
        ));
        let rows: Vec<JobRow> = on_db!(self.pool.executor(), p => {
            sqlx::query_as(sql).bind(limit).bind(offset).fetch_all(p).await?
        });
        rows.into_iter().map(Job::try_from).collect()
    }

    pub async fn count_jobs(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = on_db!(self.pool.executor(), p => {
            sqlx::query_as("SELECT COUNT(*) FROM jobs").fetch_one(p).await?
        });
        Ok(n)
    }

    /// Records a live admin session until `expires_at` (Unix milliseconds), and forgets those
    /// that have expired, so the table holds at most the sessions of the last few hours.
    pub async fn add_admin_session(&self, id: &str, expires_at: i64) -> Result<(), StoreError> {
        on_db!(self.pool.executor(), p => {
            sqlx::query("DELETE FROM admin_sessions WHERE expires_at <= $1")
                .bind(now_millis())
                .execute(p)
                .await?;
            sqlx::query("INSERT INTO admin_sessions (id, expires_at) VALUES ($1, $2)")
                .bind(id)
                .bind(expires_at)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Whether admin session `id` is live at `now`: recorded, not ended, not expired.
    pub async fn admin_session_live(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let (n,): (i64,) = on_db!(self.pool.executor(), p => {
            sqlx::query_as("SELECT COUNT(*) FROM admin_sessions WHERE id = $1 AND expires_at > $2")
                .bind(id)
                .bind(now)
                .fetch_one(p)
                .await?
        });
        Ok(n > 0)
    }

    /// Ends admin session `id` (logout); ending an ended one changes nothing.
    pub async fn remove_admin_session(&self, id: &str) -> Result<(), StoreError> {
        on_db!(self.pool.executor(), p => {
            sqlx::query("DELETE FROM admin_sessions WHERE id = $1")
                .bind(id)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Deletes jobs created before `cutoff_millis`, and the webhooks of jobs that ended before
    /// it: with webhooks on, those sent or given up (one still to send is kept: the sender gives
    /// it up at its age bound, and the next purge takes it); with webhooks off (turned off since),
    /// all of them, since nothing will send them.
    pub async fn purge_before(&self, cutoff_millis: i64) -> Result<u64, StoreError> {
        let webhooks = if self.outbox {
            "DELETE FROM webhooks WHERE ended_at < $1 AND state IN ('sent', 'dead')"
        } else {
            "DELETE FROM webhooks WHERE ended_at < $1"
        };
        let done = on_db!(self.pool.executor(), p => {
            sqlx::query(webhooks).bind(cutoff_millis).execute(p).await?;
            sqlx::query("DELETE FROM jobs WHERE created_at < $1")
                .bind(cutoff_millis)
                .execute(p)
                .await?
                .rows_affected()
        });
        Ok(done)
    }
}
