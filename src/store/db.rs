//! The one place that tells SQLite from PostgreSQL: the [`Db`] enum and its `on_db!` dispatch,
//! the lanes' own connections, and the row type both databases return.

use sqlx::ConnectOptions;
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool};

use super::StoreError;
use crate::domain::{Job, JobId, JobStatus, Message, MoveUrl, Percent, Progress};

/// Something of either database: a pool, a connection, an executor.
#[derive(Debug, Clone)]
pub(super) enum Db<S, P> {
    Sqlite(S),
    Postgres(P),
}

/// Runs `$body` with `$e` bound to what `$db` (a [`Db`]) holds, whichever database it is: the
/// body is written once and compiled for each.
macro_rules! on_db {
    ($db:expr, $e:ident => $body:expr) => {
        match $db {
            $crate::store::db::Db::Sqlite($e) => $body,
            $crate::store::db::Db::Postgres($e) => $body,
        }
    };
}
pub(super) use on_db;

/// The shared pool, for everything but the lanes' statements.
pub(super) type Pool = Db<SqlitePool, PgPool>;

impl Pool {
    pub(super) fn executor(&self) -> Db<&SqlitePool, &PgPool> {
        match self {
            Self::Sqlite(pool) => Db::Sqlite(pool),
            Self::Postgres(pool) => Db::Postgres(pool),
        }
    }
}

/// A lane's database. On SQLite a connection of the lane's own, not one borrowed from the pool:
/// the pool pings a connection when it lends it and again when it takes it back, each a hop to
/// the connection's thread and back. PostgreSQL is across the network: there the pool lets one
/// batch go while the next one waits.
pub(super) type LaneConn = Db<SqliteLane, PgPool>;

pub(super) struct SqliteLane {
    options: Box<SqliteConnectOptions>,
    /// Opened when first needed, and again after a failure that may have broken it.
    conn: Option<SqliteConnection>,
}

impl LaneConn {
    pub(super) fn sqlite(options: &SqliteConnectOptions) -> Self {
        Self::Sqlite(SqliteLane {
            options: Box::new(options.clone()),
            conn: None,
        })
    }

    /// What a statement runs on, connecting first if needed.
    pub(super) async fn executor(
        &mut self,
    ) -> Result<Db<&mut SqliteConnection, &PgPool>, sqlx::Error> {
        match self {
            Self::Sqlite(lane) => {
                if lane.conn.is_none() {
                    lane.conn = Some(lane.options.connect().await?);
                }
                lane.conn
                    .as_mut()
                    .map(Db::Sqlite)
                    .ok_or(sqlx::Error::PoolClosed)
            }
            Self::Postgres(pool) => Ok(Db::Postgres(pool)),
        }
    }

    /// Passes `result` on, forgetting the connection after a failure that may have broken it;
    /// a plain SQL error (a locked database, a constraint) leaves it usable.
    pub(super) fn checked<T>(&mut self, result: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if let Err(err) = &result
            && !matches!(err, sqlx::Error::Database(_))
        {
            self.forget();
        }
        result
    }

    /// Forgets the SQLite connection; the next statement opens a new one.
    pub(super) fn forget(&mut self) {
        if let Self::Sqlite(lane) = self {
            lane.conn = None;
        }
    }
}

/// A job as both databases return it.
#[derive(Clone, sqlx::FromRow)]
pub(super) struct JobRow {
    pub(super) id: String,
    pub(super) status: String,
    move_url: Option<String>,
    created_at: i64,
    pub(super) completed_at: Option<i64>,
    deadline: i64,
    progress_percent: Option<f64>,
    progress_message: Option<String>,
    progress_at: Option<i64>,
    message: Option<String>,
}

/// The columns of [`JobRow`], in its order.
pub(super) const JOB_COLUMNS: &str = "id, status, move_url, created_at, completed_at, deadline, \
     progress_percent, progress_message, progress_at, message";

impl TryFrom<JobRow> for Job {
    type Error = StoreError;

    fn try_from(row: JobRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("{what} in job {:?}", row.id));
        let status = JobStatus::parse(&row.status).ok_or_else(|| corrupt("unknown status"))?;
        let move_url = match &row.move_url {
            Some(raw) => Some(MoveUrl::parse(raw).map_err(|_| corrupt("invalid move_url"))?),
            None => None,
        };
        let message = |raw: &Option<String>| {
            raw.as_deref()
                .map(Message::parse)
                .transpose()
                .map_err(|_| corrupt("invalid message"))
        };
        let progress = match row.progress_at {
            Some(at) => Some(Progress {
                percent: row
                    .progress_percent
                    .map(Percent::parse)
                    .transpose()
                    .map_err(|_| corrupt("invalid percent"))?,
                message: message(&row.progress_message)?,
                at,
            }),
            None => None,
        };
        Ok(Job {
            id: JobId::parse(&row.id).map_err(|_| corrupt("invalid id"))?,
            status,
            move_url,
            created_at: row.created_at,
            completed_at: row.completed_at,
            deadline: row.deadline,
            progress,
            message: message(&row.message)?,
        })
    }
}

/// `$from, $from+1, …`: `n` numbered parameters, as both databases accept them.
pub(super) fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}
