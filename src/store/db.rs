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
    pub(super) ended_at: Option<i64>,
    deadline: i64,
    progress_percent: Option<f64>,
    progress_message: Option<String>,
    progress_at: Option<i64>,
    message: Option<String>,
}

/// The columns of [`JobRow`], in its order. The end time keeps the column name it was created
/// with, read as `ended_at`: renaming the column would break the instances of the release before
/// during a rolling upgrade.
pub(super) const JOB_COLUMNS: &str = "id, status, move_url, created_at, completed_at AS ended_at, deadline, \
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
                .map(Message::stored)
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
            ended_at: row.ended_at,
            deadline: row.deadline,
            progress,
            message: message(&row.message)?,
        })
    }
}

/// The numbered parameters (`$n`, as both databases take them) of a statement about `rows`
/// rows: `width` parameters per row from `$first` on, the row's id first. The one way the
/// statements number their parameters: `CASE id WHEN $id THEN $value … END` picks each row's
/// value, `id IN (…)` picks the rows, and `(…), (…)` are the rows of an `INSERT`.
pub(super) struct PerRow {
    pub(super) first: usize,
    pub(super) width: usize,
    pub(super) rows: usize,
}

impl PerRow {
    fn param(&self, row: usize, k: usize) -> String {
        format!("${}", self.first + self.width * row + k)
    }

    /// `CASE id WHEN $id THEN $value … END`, the value being each row's `k`-th parameter.
    pub(super) fn case(&self, k: usize) -> String {
        let whens: String = (0..self.rows)
            .map(|row| format!(" WHEN {} THEN {}", self.param(row, 0), self.param(row, k)))
            .collect();
        format!("CASE id{whens} END")
    }

    /// Each row's id parameter, for `id IN (…)`.
    pub(super) fn ids(&self) -> String {
        (0..self.rows)
            .map(|row| self.param(row, 0))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `($1, …, $width, <constants>), …`: each row's parameters and then `constants`, the rows
    /// of an `INSERT … VALUES`.
    pub(super) fn values(&self, constants: &str) -> String {
        (0..self.rows)
            .map(|row| {
                let params: Vec<String> = (0..self.width).map(|k| self.param(row, k)).collect();
                format!("({}, {constants})", params.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_row_parameters_number_each_row_from_its_first_id_on() {
        let rows = PerRow {
            first: 3,
            width: 2,
            rows: 2,
        };
        assert_eq!(rows.case(1), "CASE id WHEN $3 THEN $4 WHEN $5 THEN $6 END");
        assert_eq!(rows.ids(), "$3, $5");
        assert_eq!(
            rows.values("'waiting'"),
            "($3, $4, 'waiting'), ($5, $6, 'waiting')"
        );
    }
}
