//! The write floor under Handoff's completions per second in BENCHMARKS.md: Handoff's own store
//! (`Store::end_job`: the write lane and the durable SQLite commit the server makes for every
//! completion) with no HTTP, no hub and no streams, driven the way the bench tool drives the
//! server: `callers` tasks (the bench's 4 publishers), each waiting for its answer before it
//! sends the next. One thread, plus sqlx's SQLite threads. `scripts/bench.sh` pins it to the
//! server's core: the server does this work and all its HTTP work on that one core, so the core
//! time this takes per completion is part of Handoff's, and no change outside the write path
//! brings Handoff's time per completion below it (less whatever HTTP work the server fits into
//! the core's idle moments while it waits for sqlx's thread).
//!
//!   cargo run --release -p handoff-bench --example store_alone -- \
//!       [jobs (10000)] [callers (4)] [report.json]

use std::time::Instant;

use futures_util::future::join_all;
use handoff::domain::{JobId, JobStatus};
use handoff::store::{EndRequest, Ended, Store};

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(serde::Serialize)]
struct Report {
    label: &'static str,
    callers: usize,
    completions: usize,
    completion_failures: usize,
    completion_secs: f64,
    completions_per_sec: f64,
    /// The first failure, if any, as the store reported it.
    first_error: Option<String>,
    ok: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let jobs: usize = args.next().map_or(Ok(10_000), |n| n.parse())?;
    let callers: usize = args.next().map_or(Ok(4), |n| n.parse())?.max(1);
    let json = args.next();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(jobs, callers))?;
    println!(
        "store alone: {} completions by {callers} callers in {:.3} s: {:.0}/s, {:.1} µs each{}",
        report.completions,
        report.completion_secs,
        report.completions_per_sec,
        // Wall time per completion on the pinned core: the inverse of the rate.
        report.completion_secs * 1e6 / report.completions.max(1) as f64,
        match &report.first_error {
            None => String::new(),
            Some(error) => format!(" ({} FAILED; first: {error})", report.completion_failures),
        }
    );
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    if report.ok {
        Ok(())
    } else {
        Err(format!("{} completion(s) failed", report.completion_failures).into())
    }
}

/// Creates `jobs` jobs in a fresh SQLite file, then completes them all with `callers` callers.
async fn measure(jobs: usize, callers: usize) -> Result<Report, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}/store-alone.db", dir.path().display());
    let store = Store::connect(&url, handoff::config::DEFAULT_WRITE_QUEUE).await?;
    // The jobs exist first, as in the bench (not timed): every completion below finds its job.
    let created = join_all((0..callers).map(|caller| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in (caller..jobs).step_by(callers) {
                ids.push(store.create_job(None, i64::MAX).await?.id);
            }
            Ok::<Vec<JobId>, handoff::store::StoreError>(ids)
        })
    }))
    .await;
    let mut shares = Vec::with_capacity(callers);
    for share in created {
        shares.push(share??);
    }

    let start = Instant::now();
    let finished = join_all(shares.into_iter().map(|ids| {
        let store = store.clone();
        tokio::spawn(async move {
            let (mut completed, mut first_error) = (0, None);
            for id in &ids {
                let complete = EndRequest {
                    status: JobStatus::Complete,
                    move_url: None,
                    message: None,
                };
                match store.end_job(id, complete).await {
                    Ok(Ended::Now(_)) => completed += 1,
                    other => {
                        first_error.get_or_insert_with(|| format!("job {id}: {other:?}"));
                    }
                }
            }
            (completed, ids.len() - completed, first_error)
        })
    }))
    .await;
    let secs = start.elapsed().as_secs_f64();
    let (mut completions, mut completion_failures, mut first_error) = (0, 0, None);
    for caller in finished {
        let (done, failed, error) = caller?;
        completions += done;
        completion_failures += failed;
        first_error = first_error.or(error);
    }
    Ok(Report {
        label: "store-alone",
        callers,
        completions,
        completion_failures,
        completion_secs: secs,
        completions_per_sec: completions as f64 / secs.max(1e-9),
        first_error,
        ok: completion_failures == 0 && completions == jobs,
    })
}

// `test = true` in Cargo.toml: `cargo test` runs this, so the write floor keeps working.
#[cfg(test)]
mod tests {
    use super::measure;

    #[tokio::test(flavor = "current_thread")]
    async fn the_write_floor_completes_every_job_once_and_says_so() {
        for callers in [1, 4] {
            let report = measure(200, callers).await.expect("a report");
            assert!(report.ok, "{:?}", report.first_error);
            assert_eq!(report.completions, 200);
            assert_eq!(report.completion_failures, 0);
            assert!(report.completions_per_sec > 0.0);
        }
    }
}
