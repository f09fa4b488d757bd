//! The webhook outbox's sender statements, on the pool: claiming the due webhooks (a conditional
//! update with a lease, so that of several instances one sends each), and settling each after
//! its attempt. Its rows are written with the endings (`sql`'s `ending!`) and the streams'
//! receipts (`sql::receipts_many`), on the write lane.

use super::db::on_db;
use super::{Store, StoreError};
use crate::domain::{JobId, JobStatus};

/// A webhook due to be sent, claimed by this instance until `lease`.
#[derive(Debug, Clone, PartialEq)]
pub struct DueWebhook {
    pub job: JobId,
    /// How the job ended: complete, failed or expired.
    pub status: JobStatus,
    /// Some stream took the ending (`delivered`); otherwise none did in time (`unclaimed`).
    pub delivered: bool,
    /// How many streams took the ending.
    pub streams: i64,
    pub ended_at: i64,
    pub delivered_at: Option<i64>,
    /// This attempt's number, from 1.
    pub attempt: i64,
    /// The claim: this instance may settle the webhook only while the row still carries it.
    pub lease: i64,
}

#[derive(sqlx::FromRow)]
struct DueRow {
    id: String,
    status: String,
    state: String,
    streams: i64,
    ended_at: i64,
    delivered_at: Option<i64>,
    attempts: i64,
}

/// How an attempt ended, as the outbox keeps it.
#[derive(Debug, Clone)]
pub enum Settled {
    /// The receiver answered 2xx: done.
    Sent { at: i64 },
    /// Failed; try again at `due`.
    Retry { due: i64, error: String },
    /// Failed for the last time (attempts or age used up): kept until purged, never sent again.
    Dead { at: i64, error: String },
}

/// The rows still to send that are due at `now` (a parameter) and claimed by nobody (or by an
/// instance whose lease ran out, say one that crashed).
fn claimable(now: &str) -> String {
    format!(
        "state IN ('waiting', 'delivered') AND due_at <= {now} \
         AND (claimed_until IS NULL OR claimed_until < {now})"
    )
}

impl Store {
    /// Claims up to `limit` due webhooks until `lease` and counts an attempt for each: no other
    /// instance takes them before `lease`, when a crashed claimer's rows become due again.
    pub async fn claim_webhooks(
        &self,
        now: i64,
        lease: i64,
        limit: i64,
    ) -> Result<Vec<DueWebhook>, StoreError> {
        // A read first: in SQLite an UPDATE takes the write lock even when it matches nothing,
        // and the write lane's endings would wait behind it twice a second. A read does not.
        let any_due = sqlx::AssertSqlSafe(format!(
            "SELECT id FROM webhooks WHERE {} LIMIT 1",
            claimable("$1")
        ));
        let due: Option<(String,)> = on_db!(self.pool.executor(), p => {
            sqlx::query_as(any_due).bind(now).fetch_optional(p).await?
        });
        if due.is_none() {
            return Ok(Vec::new());
        }
        // The condition is repeated outside the subquery: on PostgreSQL a row another instance
        // claimed meanwhile is re-checked once its lock is released, and skipped.
        let claimable = claimable("$2");
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE webhooks SET claimed_until = $1, attempts = attempts + 1 WHERE {claimable} \
             AND id IN (SELECT id FROM webhooks WHERE {claimable} ORDER BY due_at LIMIT $3) \
             RETURNING id, status, state, streams, ended_at, delivered_at, attempts"
        ));
        let rows: Vec<DueRow> = on_db!(self.pool.executor(), p => {
            sqlx::query_as(sql).bind(lease).bind(now).bind(limit).fetch_all(p).await?
        });
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            let corrupt = |what: &str| format!("{what} in webhook {:?}", row.id);
            let parsed = JobId::parse(&row.id)
                .map_err(|_| corrupt("invalid id"))
                .and_then(|job| {
                    let status =
                        JobStatus::parse(&row.status).ok_or_else(|| corrupt("unknown status"))?;
                    Ok((job, status))
                });
            match parsed {
                Ok((job, status)) => due.push(DueWebhook {
                    job,
                    status,
                    delivered: row.state == "delivered",
                    streams: row.streams,
                    ended_at: row.ended_at,
                    delivered_at: row.delivered_at,
                    attempt: row.attempts,
                    lease,
                }),
                // A row this version cannot read is given up on its own: left claimed, it would
                // come back first every lease and hold up nothing but itself, for ever.
                Err(why) => {
                    log::error!("webhook outbox: {why}; given up, never sent");
                    let dead = sqlx::AssertSqlSafe(
                        "UPDATE webhooks SET state = 'dead', settled_at = $2, last_error = $3, \
                         claimed_until = NULL WHERE id = $1 AND claimed_until = $4",
                    );
                    on_db!(self.pool.executor(), p => {
                        sqlx::query(dead)
                            .bind(row.id.as_str())
                            .bind(now)
                            .bind(why.as_str())
                            .bind(lease)
                            .execute(p)
                            .await?
                            .rows_affected()
                    });
                }
            }
        }
        Ok(due)
    }

    /// Records how each attempt of a round ended, in one transaction: on SQLite the sender then
    /// takes the write lock once a round, however many webhooks failed. For each, false when its
    /// claim had run out and another instance holds it now (nothing changed for it).
    pub async fn settle_webhooks(
        &self,
        outcomes: &[(&DueWebhook, &Settled)],
    ) -> Result<Vec<bool>, StoreError> {
        let mut kept = Vec::with_capacity(outcomes.len());
        on_db!(self.pool.executor(), p => {
            let mut tx = p.begin().await?;
            for (webhook, settled) in outcomes {
                // Each statement binds what it uses: PostgreSQL refuses a parameter it does not
                // see.
                let (set, value, error) = match settled {
                    Settled::Sent { at } => (
                        "state = 'sent', settled_at = $3, last_error = NULL",
                        *at,
                        None,
                    ),
                    Settled::Retry { due, error } => {
                        ("due_at = $3, last_error = $4", *due, Some(error))
                    }
                    Settled::Dead { at, error } => (
                        "state = 'dead', settled_at = $3, last_error = $4",
                        *at,
                        Some(error),
                    ),
                };
                let sql = sqlx::AssertSqlSafe(format!(
                    "UPDATE webhooks SET {set}, claimed_until = NULL \
                     WHERE id = $1 AND claimed_until = $2"
                ));
                let query = sqlx::query(sql)
                    .bind(webhook.job.as_str())
                    .bind(webhook.lease)
                    .bind(value);
                let query = match error {
                    Some(error) => query.bind(error.as_str()),
                    None => query,
                };
                kept.push(query.execute(&mut *tx).await?.rows_affected() > 0);
            }
            tx.commit().await?;
        });
        Ok(kept)
    }
}
