//! All SQL: the `jobs` table in SQLite (the embedded default) or PostgreSQL (scale-out).
//!
//! The table is the truth about every job. Each statement is written once in SQL both databases
//! accept; `on_pool!` runs it on whichever pool is configured. The two hot statements (a stream's
//! status read, a completion) go through [`batch`], which answers many callers per round trip.

mod batch;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::domain::{Job, JobId, JobStatus, MoveUrl, now_millis};

/// A database failure; its text goes to the log, never to a client.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("cannot create the folder for the SQLite file {path}: {source}")]
    Folder {
        path: String,
        source: std::io::Error,
    },
    #[error("a stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("the store's batching task has stopped")]
    Closed,
}

#[derive(Debug, Clone)]
enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to the configured pool, whichever database it is.
macro_rules! on_pool {
    (pool $pool_ref:expr, $pool:ident => $body:expr) => {
        match $pool_ref {
            Pool::Sqlite($pool) => $body,
            Pool::Postgres($pool) => $body,
        }
    };
    ($store:expr, $pool:ident => $body:expr) => {
        on_pool!(pool &$store.pool, $pool => $body)
    };
}

/// What completing a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// This call completed the job: publish it.
    Completed(Job),
    /// The job was complete already; nothing changed.
    AlreadyComplete(Job),
    NotFound,
}

/// Handle on the job table; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    batcher: batch::Batcher,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: String,
    status: String,
    move_url: Option<String>,
    created_at: i64,
    completed_at: Option<i64>,
}

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("{what} in job {:?}", row.id));
        let status = match row.status.as_str() {
            "pending" => JobStatus::Pending,
            "complete" => JobStatus::Complete,
            _ => return Err(corrupt("unknown status")),
        };
        let move_url = match &row.move_url {
            Some(raw) => Some(MoveUrl::parse(raw).map_err(|_| corrupt("invalid move_url"))?),
            None => None,
        };
        Ok(Job {
            id: JobId::parse(&row.id).map_err(|_| corrupt("invalid id"))?,
            status,
            move_url,
            created_at: row.created_at,
            completed_at: row.completed_at,
        })
    }
}

const JOB_COLUMNS: &str = "id, status, move_url, created_at, completed_at";

impl Store {
    /// Connects, creating the SQLite file and its folder when needed, and runs the migrations.
    /// On PostgreSQL the migrator holds an advisory lock, so instances may start together.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = if url.starts_with("sqlite:") {
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
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await?,
            )
        } else {
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect(url)
                    .await?,
            )
        };
        on_pool!(pool &pool, p => sqlx::migrate!("./migrations").run(p).await?);
        Ok(Self {
            batcher: batch::Batcher::start(pool.clone()),
            pool,
        })
    }

    /// Which database this is, for logs and health output.
    pub fn kind(&self) -> &'static str {
        match self.pool {
            Pool::Sqlite(_) => "sqlite",
            Pool::Postgres(_) => "postgres",
        }
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(self, p => {
            sqlx::query("SELECT 1").execute(p).await?;
        });
        Ok(())
    }

    /// Stores a new pending job with a fresh id.
    pub async fn create_job(&self, move_url: Option<MoveUrl>) -> Result<Job, StoreError> {
        let job = Job {
            id: JobId::generate(),
            status: JobStatus::Pending,
            move_url,
            created_at: now_millis(),
            completed_at: None,
        };
        let sql =
            "INSERT INTO jobs (id, status, move_url, created_at) VALUES ($1, 'pending', $2, $3)";
        on_pool!(self, p => {
            sqlx::query(sql)
                .bind(job.id.as_str())
                .bind(job.move_url.as_ref().map(MoveUrl::as_str))
                .bind(job.created_at)
                .execute(p)
                .await?;
        });
        Ok(job)
    }

    /// The job, if it exists. Batched with other concurrent reads.
    pub async fn get_job(&self, id: &JobId) -> Result<Option<Job>, StoreError> {
        self.batcher.get(id).await
    }

    /// Marks the job complete, durably, exactly once. `move_url` overrides the target asked for
    /// at creation. Completing a complete job changes nothing and returns it as stored.
    /// Batched with other concurrent completions into one statement and one commit; answered
    /// only after that commit.
    pub async fn complete_job(
        &self,
        id: &JobId,
        move_url: Option<MoveUrl>,
    ) -> Result<Completion, StoreError> {
        self.batcher.complete(id, move_url).await
    }

    /// The completed jobs among `ids`, for delivering what a subscriber may have missed.
    pub async fn completed_among(&self, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
        let mut done = Vec::new();
        for chunk in ids.chunks(500) {
            let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let sql = sqlx::AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'complete' AND id IN ({})",
                placeholders.join(", ")
            ));
            let rows: Vec<JobRow> = on_pool!(self, p => {
                let mut query = sqlx::query_as(sql);
                for id in chunk {
                    query = query.bind(id.as_str());
                }
                query.fetch_all(p).await?
            });
            for row in rows {
                done.push(row.try_into()?);
            }
        }
        Ok(done)
    }

    /// One page of jobs, newest first.
    pub async fn recent_jobs(&self, limit: i64, offset: i64) -> Result<Vec<Job>, StoreError> {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, id LIMIT $1 OFFSET $2"
        ));
        let rows: Vec<JobRow> =
            on_pool!(self, p => sqlx::query_as(sql).bind(limit).bind(offset).fetch_all(p).await?);
        rows.into_iter().map(Job::try_from).collect()
    }

    pub async fn count_jobs(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) =
            on_pool!(self, p => sqlx::query_as("SELECT COUNT(*) FROM jobs").fetch_one(p).await?);
        Ok(n)
    }

    /// Deletes jobs created before `cutoff_millis`; returns how many went.
    pub async fn purge_before(&self, cutoff_millis: i64) -> Result<u64, StoreError> {
        let done = on_pool!(self, p => sqlx::query("DELETE FROM jobs WHERE created_at < $1")
            .bind(cutoff_millis)
            .execute(p)
            .await?
            .rows_affected());
        Ok(done)
    }
}

/// Pads a batch to the next power of two (repeating its last item) so that only a handful of
/// distinct statements exist and each stays in the driver's prepared-statement cache.
fn padded_len(n: usize) -> usize {
    n.next_power_of_two().min(batch::MAX_BATCH.max(n))
}

/// One job by id: the unbatched read, for retries.
async fn get_one(pool: &Pool, id: &JobId) -> Result<Option<Job>, StoreError> {
    let sql = sqlx::AssertSqlSafe(format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"));
    let row: Option<JobRow> = on_pool!(pool pool, p => sqlx::query_as(sql)
        .bind(id.as_str())
        .fetch_optional(p)
        .await?);
    row.map(Job::try_from).transpose()
}

/// The jobs among `ids` that exist, in one statement.
async fn get_many(pool: &Pool, ids: &[JobId]) -> Result<Vec<Job>, StoreError> {
    let Some(last) = ids.last() else {
        return Ok(Vec::new());
    };
    let n = padded_len(ids.len());
    let placeholders: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    let sql = sqlx::AssertSqlSafe(format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id IN ({})",
        placeholders.join(", ")
    ));
    let rows: Vec<JobRow> = on_pool!(pool pool, p => {
        let mut query = sqlx::query_as(sql);
        for id in ids.iter().chain(std::iter::repeat(last)).take(n) {
            query = query.bind(id.as_str());
        }
        query.fetch_all(p).await?
    });
    rows.into_iter().map(Job::try_from).collect()
}

/// Completes one job: the unbatched statement, for retries and repeated ids.
async fn complete_one(
    pool: &Pool,
    id: &JobId,
    move_url: Option<MoveUrl>,
) -> Result<Completion, StoreError> {
    let mut done = complete_many(pool, &[(id.clone(), move_url)]).await?;
    if let Some(job) = done.pop() {
        return Ok(Completion::Completed(job));
    }
    Ok(match get_one(pool, id).await? {
        Some(job) => Completion::AlreadyComplete(job),
        None => Completion::NotFound,
    })
}

/// Completes every pending job among `items` (distinct ids) in one statement, hence one commit;
/// returns the jobs it changed. `$1` is the completion time; each job's id and optional new
/// target follow as a pair.
async fn complete_many(
    pool: &Pool,
    items: &[(JobId, Option<MoveUrl>)],
) -> Result<Vec<Job>, StoreError> {
    let Some(last) = items.last() else {
        return Ok(Vec::new());
    };
    let n = padded_len(items.len());
    let cases: String = (0..n)
        .map(|i| format!(" WHEN ${} THEN ${}", 2 + 2 * i, 3 + 2 * i))
        .collect();
    let ids: Vec<String> = (0..n).map(|i| format!("${}", 2 + 2 * i)).collect();
    let sql = sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET status = 'complete', completed_at = $1, \
         move_url = COALESCE(CASE id{cases} END, move_url) \
         WHERE status = 'pending' AND id IN ({}) RETURNING {JOB_COLUMNS}",
        ids.join(", ")
    ));
    let rows: Vec<JobRow> = on_pool!(pool pool, p => {
        let mut query = sqlx::query_as(sql).bind(now_millis());
        for (id, move_url) in items.iter().chain(std::iter::repeat(last)).take(n) {
            query = query
                .bind(id.as_str())
                .bind(move_url.as_ref().map(MoveUrl::as_str));
        }
        query.fetch_all(p).await?
    });
    rows.into_iter().map(Job::try_from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sqlite_store() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/jobs.db", dir.path().display());
        (Store::connect(&url).await.unwrap(), dir)
    }

    #[tokio::test]
    async fn concurrent_completions_are_batched_and_each_caller_gets_its_own_answer() {
        let (store, _dir) = sqlite_store().await;
        completions_each_get_their_own_answer(&store).await;
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL at 127.0.0.1:5432 (scripts/test.sh starts it)"]
    async fn batched_completions_work_on_postgresql_too() {
        let url = std::env::var("TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let store = Store::connect(&url).await.unwrap_or_else(|err| {
            panic!("PostgreSQL at {url} is needed (start it, or run scripts/test.sh): {err}")
        });
        completions_each_get_their_own_answer(&store).await;
    }

    async fn completions_each_get_their_own_answer(store: &Store) {
        let mut jobs = Vec::new();
        for _ in 0..150 {
            jobs.push(store.create_job(None).await.unwrap());
        }
        let unknown = JobId::generate();
        // Every job once (every third with its own target), the first ten twice, one unknown id.
        let mut calls = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let target = (i % 3 == 0).then(|| MoveUrl::parse(&format!("/done/{i}")).unwrap());
            calls.push((job.id.clone(), target));
        }
        for job in &jobs[..10] {
            calls.push((job.id.clone(), None));
        }
        calls.push((unknown.clone(), None));
        let answers = futures_util::future::join_all(
            calls
                .iter()
                .map(|(id, target)| store.complete_job(id, target.clone())),
        )
        .await;

        let (mut completed, mut again, mut missing) = (0, 0, 0);
        for ((id, target), answer) in calls.iter().zip(answers) {
            match answer.unwrap() {
                Completion::Completed(job) => {
                    completed += 1;
                    assert_eq!(&job.id, id);
                    assert!(job.is_complete());
                    assert_eq!(job.move_url.as_ref(), target.as_ref());
                }
                Completion::AlreadyComplete(job) => {
                    again += 1;
                    assert_eq!(&job.id, id);
                }
                Completion::NotFound => {
                    missing += 1;
                    assert_eq!(id, &unknown);
                }
            }
        }
        assert_eq!((completed, again, missing), (150, 10, 1));
        for (i, job) in jobs.iter().enumerate() {
            let stored = store.get_job(&job.id).await.unwrap().unwrap();
            assert!(stored.is_complete(), "job {i} is stored complete");
        }
    }

    #[tokio::test]
    async fn concurrent_reads_each_get_their_own_job_or_none() {
        let (store, _dir) = sqlite_store().await;
        let mut ids = Vec::new();
        for _ in 0..100 {
            ids.push(store.create_job(None).await.unwrap().id);
        }
        ids.push(JobId::generate());
        let answers = futures_util::future::join_all(ids.iter().map(|id| store.get_job(id))).await;
        for (id, answer) in ids.iter().zip(answers) {
            match answer.unwrap() {
                Some(job) => assert_eq!(&job.id, id),
                None => assert_eq!(id, ids.last().unwrap(), "only the unknown id is missing"),
            }
        }
    }
}
