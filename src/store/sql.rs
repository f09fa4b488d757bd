//! The lanes' statements, each answering many requests at once: `SELECT … WHERE id IN (…)`, a
//! many-row `INSERT`, and one `UPDATE … RETURNING` that completes many jobs in one commit.

use std::collections::HashMap;

use super::db::{JOB_COLUMNS, JobRow, LaneConn, on_db, placeholders};
use crate::domain::{Job, JobId, MoveUrl, now_millis};

/// The most requests one statement answers; also bounds the SQL text and its parameters.
pub(super) const MAX_BATCH: usize = 64;

/// Rows by id, as the database returned them.
pub(super) type Rows = HashMap<String, JobRow>;

/// Statement sizes are rounded up to a power of two (the last argument repeated), so a lane
/// prepares at most a handful of statements and its connection caches them all.
fn padded_len(n: usize) -> usize {
    n.next_power_of_two().min(MAX_BATCH.max(n))
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
        let Some(last) = chunk.last() else { continue };
        let n = padded_len(chunk.len());
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id IN ({})",
            placeholders(1, n)
        ));
        let found: Vec<JobRow> = on_lane!(conn, e => {
            let mut query = sqlx::query_as(sql);
            for id in chunk.iter().chain(std::iter::repeat(last)).take(n) {
                query = query.bind(id.as_str());
            }
            query.fetch_all(e).await
        })?;
        rows.extend(by_id(found));
    }
    Ok(rows)
}

/// One statement, so one commit, for at most [`MAX_BATCH`] new jobs.
pub(super) async fn insert_many(conn: &mut LaneConn, jobs: &[&Job]) -> Result<(), sqlx::Error> {
    debug_assert!(jobs.len() <= MAX_BATCH);
    let values: Vec<String> = (0..jobs.len())
        .map(|i| {
            format!(
                "({}, 'pending', {})",
                placeholders(3 * i + 1, 1),
                placeholders(3 * i + 2, 2)
            )
        })
        .collect();
    let sql = sqlx::AssertSqlSafe(format!(
        "INSERT INTO jobs (id, status, move_url, created_at) VALUES {}",
        values.join(", ")
    ));
    on_lane!(conn, e => {
        let mut query = sqlx::query(sql);
        for job in jobs {
            query = query
                .bind(job.id.as_str())
                .bind(job.move_url.as_ref().map(MoveUrl::as_str))
                .bind(job.created_at);
        }
        query.execute(e).await.map(drop)
    })
}

/// One statement, so one commit, for at most [`MAX_BATCH`] completions of distinct jobs: the
/// pending ones become complete (with the `moveUrl` their completion names, else the one they
/// had). Returns the rows it changed.
pub(super) async fn complete_many(
    conn: &mut LaneConn,
    items: &[(&JobId, Option<&MoveUrl>)],
) -> Result<Rows, sqlx::Error> {
    debug_assert!(items.len() <= MAX_BATCH);
    let Some(last) = items.last() else {
        return Ok(Rows::new());
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
    let changed: Vec<JobRow> = on_lane!(conn, e => {
        let mut query = sqlx::query_as(sql).bind(now_millis());
        for (id, move_url) in items.iter().chain(std::iter::repeat(last)).take(n) {
            query = query.bind(id.as_str()).bind(move_url.map(MoveUrl::as_str));
        }
        query.fetch_all(e).await
    })?;
    Ok(by_id(changed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_padded_to_a_few_statement_sizes() {
        let sizes: std::collections::HashSet<usize> = (1..=MAX_BATCH).map(padded_len).collect();
        assert_eq!(sizes.len(), 7);
        assert!((1..=MAX_BATCH).all(|n| padded_len(n) >= n));
    }
}
