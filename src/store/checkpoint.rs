//! SQLite's WAL checkpoints, off the write lane. SQLite's automatic checkpoint runs inside the
//! commit that finds the WAL past its size, so the completions of that batch, and every one
//! queued behind it, wait for pages to be copied into the database file and for two `fsync`s.
//! Here the write lane's connection has automatic checkpoints off; a task of its own, on a
//! connection of its own, takes a `PASSIVE` checkpoint (which never blocks the writer) at most
//! once per [`EVERY`] while there are commits to copy.
//!
//! A passive checkpoint copies the pages, but only a write that begins when every page has been
//! copied starts the WAL over from its beginning: under steady writes the checkpoint never quite
//! catches up, and the WAL file would grow without end. So once it holds [`LANE_BOUND`] frames
//! (pages), the write lane checkpoints it itself, after it has answered its batch: that copies
//! only what the last background checkpoint left, and the lane's next write starts the WAL over.
//! Nothing about durability changes: a commit is as durable as before, and is answered only
//! after it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use tokio::sync::mpsc;

/// The least time between two background checkpoints while writes go on.
const EVERY: Duration = Duration::from_millis(100);

/// WAL frames (pages, 4 KiB each by default) past which the write lane checkpoints itself: twice
/// SQLite's own automatic threshold, so the WAL file stays within a few times its usual size.
pub(super) const LANE_BOUND: i64 = 2_000;

/// The write lane's side: tells the checkpointer of commits, and whether the WAL is past its
/// bound.
#[derive(Debug)]
pub(super) struct Checkpoints {
    nudge: mpsc::Sender<()>,
    /// Frames in the WAL when a checkpoint last looked.
    frames: Arc<AtomicI64>,
}

impl Checkpoints {
    /// Starts the checkpointer on the current runtime; it stops once these `Checkpoints` are
    /// dropped.
    pub(super) fn start(options: &SqliteConnectOptions) -> Self {
        let (nudge, mut nudged) = mpsc::channel(1);
        let frames = Arc::new(AtomicI64::new(0));
        let seen = Arc::clone(&frames);
        let options = options.clone();
        tokio::spawn(async move {
            let mut conn = None;
            while nudged.recv().await.is_some() {
                match checkpoint(&mut conn, &options).await {
                    Ok(log) => seen.store(log, Ordering::Relaxed),
                    Err(err) => {
                        log::warn!("a background WAL checkpoint failed, will retry: {err}");
                        conn = None;
                    }
                }
                tokio::time::sleep(EVERY).await;
            }
        });
        Self { nudge, frames }
    }

    /// A write committed: there may be pages to copy.
    pub(super) fn committed(&self) {
        // Full means a checkpoint is already due.
        let _ = self.nudge.try_send(());
    }

    /// Whether the WAL holds [`LANE_BOUND`] frames or more, as last seen.
    pub(super) fn over_bound(&self) -> bool {
        self.frames.load(Ordering::Relaxed) >= LANE_BOUND
    }

    /// The lane checkpointed (its next write starts the WAL over), or tried to: it looks again
    /// once the background has.
    pub(super) fn started_over(&self) {
        self.frames.store(0, Ordering::Relaxed);
    }
}

/// A passive checkpoint on `conn` (connected first if need be); the frames in the WAL.
async fn checkpoint(
    conn: &mut Option<SqliteConnection>,
    options: &SqliteConnectOptions,
) -> Result<i64, sqlx::Error> {
    if conn.is_none() {
        *conn = Some(options.connect().await?);
    }
    let conn = conn.as_mut().ok_or(sqlx::Error::PoolClosed)?;
    passive(conn).await
}

/// `PRAGMA wal_checkpoint(PASSIVE)`: copies what it can without waiting for anyone; answers the
/// frames in the WAL.
pub(super) async fn passive(conn: &mut SqliteConnection) -> Result<i64, sqlx::Error> {
    let (_busy, log, _copied): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(conn)
        .await?;
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{JobStatus, now_millis};
    use crate::store::{EndRequest, Ended, Store};

    /// SQLite's default page size: one WAL frame holds one page.
    const PAGE: u64 = 4096;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_writes_that_never_pause() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handoff.db");
        let store = Store::connect(&format!("sqlite://{}", path.display()), 64)
            .await
            .unwrap();
        let wal = || std::fs::metadata(dir.path().join("handoff.db-wal")).map_or(0, |m| m.len());
        // Every creation and every completion is a commit of its own, one right after the
        // other: each writes a few frames, several times the bound in all, and the lane never
        // waits long enough for a checkpoint beside it to copy every frame.
        let mut largest = 0;
        for _ in 0..6_000 {
            let job = store
                .create_job(None, now_millis() + 3_600_000)
                .await
                .unwrap();
            let request = EndRequest {
                status: JobStatus::Complete,
                move_url: None,
                message: None,
            };
            let ended = store.end_job(&job.id, request).await.unwrap();
            assert!(matches!(ended, Ended::Now(_)));
            largest = largest.max(wal());
        }
        // The background checkpointer looks at most every EVERY: what the lane writes meanwhile
        // comes on top of the bound. With no bound at all the WAL would grow past 100 MB here.
        let bound = 4 * LANE_BOUND as u64 * PAGE;
        assert!(
            largest <= bound,
            "the WAL grew to {largest} bytes, past {bound}"
        );
        assert!(largest > 0, "the store wrote no WAL at all");
    }
}
