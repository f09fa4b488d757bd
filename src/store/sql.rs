//! The lanes' statements, each answering many requests at once: `SELECT … WHERE id IN (…)`, a
//! many-row `INSERT`, one `UPDATE … RETURNING` that ends many jobs in one commit, one `UPDATE`
//! for many progress reports, and the expiry sweep. With webhooks on, the endings and the sweep
//! write their jobs' webhook outbox rows in the same transaction, and one `UPDATE` records which
//! jobs' endings streams took.

use std::collections::HashMap;

use super::db::{JOB_COLUMNS, JobRow, LaneConn, PerRow, on_db};
use crate::domain::{Job, JobId, JobStatus, Message, MoveUrl, Percent, Progress, now_millis};

/// The most requests one statement answers; also bounds the SQL text and its parameters.
pub(super) const MAX_BATCH: usize = 64;

/// The most jobs one expiry round ends.
const EXPIRE_BATCH: usize = 512;

/// Rows by id, as the database returned them.
pub(super) type Rows = HashMap<String, JobRow>;

/// Statement sizes are rounded up to a power of two (the last argument repeated), so a lane
/// prepares at most a handful of statements and its connection caches them all.
fn padded_len(n: usize) -> usize {
    n.next_power_of_two().min(MAX_BATCH.max(n))
}

/// What a statement of [`padded_len`] rows binds: `items`, then the last of them repeated.
fn padded<T>(items: &[T]) -> impl Iterator<Item = &T> {
    let repeated = items.last().into_iter().flat_map(std::iter::repeat);
    items.iter().chain(repeated).take(padded_len(items.len()))
}

/// Runs `$body` with `$e` bound to the lane's executor, and lets the lane forget a connection
/// the statement may have broken.
macro_rules! on_lane {
    ($conn:expr, $e:ident => $body:expr) => {{
        let result = match $conn.executor().await {
            Ok(db) => on_db!(db, $e => $body),
            Err(err) => Err(err),
        };
        $conn.checked(result)
    }};
}

fn by_id(rows: Vec<JobRow>) -> Rows {
    rows.into_iter().map(|row| (row.id.clone(), row)).collect()
}

/// The stored rows of `ids`, one statement per [`MAX_BATCH`] of them.
pub(super) async fn select_many(conn: &mut LaneConn, ids: &[JobId]) -> Result<Rows, sqlx::Error> {
    let mut rows = Rows::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_BATCH) {
        let ids = PerRow {
            first: 1,
            width: 1,
            rows: padded_len(chunk.len()),
        };
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id IN ({})",
            ids.ids()
        ));
        let found: Vec<JobRow> = on_lane!(conn, e => {
            let mut query = sqlx::query_as(sql);
            for id in padded(chunk) {
                query = query.bind(id.as_str());
            }
            query.fetch_all(e).await
        })?;
        rows.extend(by_id(found));
    }
    Ok(rows)
}

/// Runs `$query`, a `query_as` of the job rows it ends, on the lane; returns the rows it
/// changed. With `$outbox` (webhooks on: `Some` of how long a webhook waits for a stream, in
/// ms), the jobs it changed get their webhook outbox rows in the same transaction: an ending is
/// stored with its webhook or not at all, so no crash between the two loses a webhook. With
/// webhooks off the statement runs alone, as it always did.
macro_rules! ending {
    ($conn:expr, $outbox:expr, $query:expr) => {
        on_lane!($conn, e => match $outbox {
            None => $query.fetch_all(e).await,
            Some(unclaimed_ms) => async {
                let mut tx = sqlx::Acquire::begin(e).await?;
                let rows: Vec<JobRow> = $query.fetch_all(&mut *tx).await?;
                if !rows.is_empty() {
                    let mut insert = sqlx::query(sqlx::AssertSqlSafe(outbox_insert(rows.len())));
                    for row in &rows {
                        let ended: i64 = row.ended_at.unwrap_or_else(now_millis);
                        insert = insert
                            .bind(row.id.as_str())
                            .bind(row.status.as_str())
                            .bind(ended)
                            .bind(ended.saturating_add(unclaimed_ms));
                    }
                    insert.execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok::<_, sqlx::Error>(rows)
            }
            .await,
        })
    };
}

/// The outbox rows of `n` jobs that just ended: each waits for a stream until its `due_at`.
/// A row already there (it cannot be: a job ends once) is left as it is.
fn outbox_insert(n: usize) -> String {
    // Per row: id, status, ended_at, due_at.
    let rows = PerRow {
        first: 1,
        width: 4,
        rows: n,
    };
    format!(
        "INSERT INTO webhooks (id, status, ended_at, due_at, state) VALUES {} \
         ON CONFLICT (id) DO NOTHING",
        rows.values("'waiting'")
    )
}

/// One statement, so one commit, for at most [`MAX_BATCH`] new jobs.
pub(super) async fn insert_many(conn: &mut LaneConn, jobs: &[&Job]) -> Result<(), sqlx::Error> {
    debug_assert!(jobs.len() <= MAX_BATCH);
    // Per job: id, moveUrl, creation, deadline.
    let rows = PerRow {
        first: 1,
        width: 4,
        rows: jobs.len(),
    };
    let sql = sqlx::AssertSqlSafe(format!(
        "INSERT INTO jobs (id, move_url, created_at, deadline, status) VALUES {}",
        rows.values("'pending'")
    ));
    on_lane!(conn, e => {
        let mut query = sqlx::query(sql);
        for job in jobs {
            query = query
                .bind(job.id.as_str())
                .bind(job.move_url.as_ref().map(MoveUrl::as_str))
                .bind(job.created_at)
                .bind(job.deadline);
        }
        query.execute(e).await.map(drop)
    })
}

/// How one request wants a job to end.
pub(super) struct EndItem<'a> {
    pub(super) id: &'a JobId,
    /// Overrides the target asked for at creation.
    pub(super) move_url: Option<&'a MoveUrl>,
    pub(super) message: Option<&'a Message>,
}

/// One statement, so one commit, for at most [`MAX_BATCH`] distinct jobs ending in `status`:
/// the pending ones among them end (with the `moveUrl` their request names, else the one they
/// had). Returns the rows it changed. `outbox`: see [`ending!`].
///
/// A `CASE id WHEN … END` picks each row's `moveUrl` and message; it is left out when no item of
/// the statement names one (a batch of plain completions), which then binds only the ids (66
/// parameters instead of 194 for 64 jobs), and the row keeps its target, with no message.
pub(super) async fn end_many(
    conn: &mut LaneConn,
    status: JobStatus,
    items: &[EndItem<'_>],
    outbox: Option<i64>,
) -> Result<Rows, sqlx::Error> {
    debug_assert!(items.len() <= MAX_BATCH);
    if items.is_empty() {
        return Ok(Rows::new());
    }
    let with_url = items.iter().any(|item| item.move_url.is_some());
    let with_message = items.iter().any(|item| item.message.is_some());
    // $1 status, $2 time; then per item: id, and its moveUrl and message when any item has one.
    let rows = PerRow {
        first: 3,
        width: 1 + usize::from(with_url) + usize::from(with_message),
        rows: padded_len(items.len()),
    };
    let move_url = if with_url {
        format!(", move_url = COALESCE({}, move_url)", rows.case(1))
    } else {
        String::new()
    };
    let message = if with_message {
        rows.case(1 + usize::from(with_url))
    } else {
        "NULL".into()
    };
    let sql = sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET status = $1, completed_at = $2{move_url}, message = {message} \
         WHERE status = 'pending' AND id IN ({}) RETURNING {JOB_COLUMNS}",
        rows.ids()
    ));
    let changed: Vec<JobRow> = ending!(conn, outbox, {
        let mut query = sqlx::query_as(sql).bind(status.as_str()).bind(now_millis());
        for item in padded(items) {
            query = query.bind(item.id.as_str());
            if with_url {
                query = query.bind(item.move_url.map(MoveUrl::as_str));
            }
            if with_message {
                query = query.bind(item.message.map(Message::as_str));
            }
        }
        query
    })?;
    Ok(by_id(changed))
}

/// One statement, so one commit, storing the latest report of each of at most [`MAX_BATCH`]
/// distinct jobs that are still pending.
pub(super) async fn progress_many(
    conn: &mut LaneConn,
    reports: &[(&JobId, &Progress)],
) -> Result<(), sqlx::Error> {
    debug_assert!(reports.len() <= MAX_BATCH);
    if reports.is_empty() {
        return Ok(());
    }
    let n = padded_len(reports.len());
    // Per report: id, percent, message, time.
    let rows = PerRow {
        first: 1,
        width: 4,
        rows: n,
    };
    let sql = sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET progress_percent = {}, progress_message = {}, progress_at = {} \
         WHERE status = 'pending' AND id IN ({})",
        rows.case(1),
        rows.case(2),
        rows.case(3),
        rows.ids()
    ));
    on_lane!(conn, e => {
        let mut query = sqlx::query(sql);
        for (id, progress) in padded(reports) {
            query = query
                .bind(id.as_str())
                .bind(progress.percent.map(Percent::get))
                .bind(progress.message.as_ref().map(Message::as_str))
                .bind(progress.at);
        }
        query.execute(e).await.map(drop)
    })
}

/// Ends every pending job whose deadline has passed as `expired`; returns those it changed. A
/// conditional update: of several instances sweeping at once, each job is changed by one.
/// `outbox`: see [`ending!`].
pub(super) async fn expire_due(
    conn: &mut LaneConn,
    now: i64,
    outbox: Option<i64>,
) -> Result<Vec<JobRow>, sqlx::Error> {
    // At most EXPIRE_BATCH a round, the earliest first, so one round after a long outage stays
    // short; the outer `status = 'pending'` keeps each job to one instance on PostgreSQL too.
    let sql = sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET status = 'expired', completed_at = $1 WHERE status = 'pending' AND id IN \
         (SELECT id FROM jobs WHERE status = 'pending' AND deadline <= $1 ORDER BY deadline \
         LIMIT {EXPIRE_BATCH}) RETURNING {JOB_COLUMNS}"
    ));
    ending!(conn, outbox, sqlx::query_as(sql).bind(now))
}

/// One statement, so one commit, recording that streams took the endings of at most
/// [`MAX_BATCH`] distinct jobs: `(job, how many streams)`. A job's webhook still waiting for a
/// stream becomes `delivered`, due at `due` (a moment later, so that the other tabs' streams are
/// counted too); one delivered already adds the streams. A webhook that has been attempted (or
/// is being sent) keeps what it was sent as: its id promises one meaning.
pub(super) async fn receipts_many(
    conn: &mut LaneConn,
    receipts: &[(&JobId, i64)],
    now: i64,
    due: i64,
) -> Result<(), sqlx::Error> {
    debug_assert!(receipts.len() <= MAX_BATCH);
    if receipts.is_empty() {
        return Ok(());
    }
    // $1 now, $2 due; then per job: id, streams. A padded repeat matches no second time: a
    // CASE takes its first WHEN.
    let rows = PerRow {
        first: 3,
        width: 2,
        rows: padded_len(receipts.len()),
    };
    let sql = sqlx::AssertSqlSafe(format!(
        "UPDATE webhooks SET streams = streams + {}, state = 'delivered', \
         delivered_at = COALESCE(delivered_at, $1), \
         due_at = CASE WHEN state = 'waiting' THEN $2 ELSE due_at END \
         WHERE state IN ('waiting', 'delivered') AND attempts = 0 AND id IN ({})",
        rows.case(1),
        rows.ids()
    ));
    on_lane!(conn, e => {
        let mut query = sqlx::query(sql).bind(now).bind(due);
        for (id, streams) in padded(receipts) {
            query = query.bind(id.as_str()).bind(*streams);
        }
        query.execute(e).await.map(drop)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_padded_to_a_few_statement_sizes() {
        let sizes: std::collections::HashSet<usize> = (1..=MAX_BATCH).map(padded_len).collect();
        assert_eq!(sizes.len(), 7);
        assert!((1..=MAX_BATCH).all(|n| padded_len(n) >= n));
        assert_eq!(
            padded(&[1, 2, 3]).copied().collect::<Vec<_>>(),
            [1, 2, 3, 3]
        );
        assert_eq!(padded::<u8>(&[]).count(), 0);
    }
}
