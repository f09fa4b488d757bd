//! `handoff-bench`: opens N event streams against Handoff or another SSE server on loopback,
//! completes their jobs over a few keep-alive connections, and measures connect time, delivery
//! latency, completions per second and the server's memory per stream, on one clock in one
//! process. Every expected event must arrive exactly once, or the exit code is non-zero.
//!
//! ```text
//! handoff-bench --handoff http://127.0.0.1:8080 --token T -n 10000 --mode single
//! handoff-bench --sub-url 'http://127.0.0.1:8081/sub/{id}' --pub-url 'http://127.0.0.1:8081/pub?id={id}'
//! ```

mod http;
mod one_by_one;
mod report;
mod split;
mod streams;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use report::{Percentiles, Report, rss_kb};
use streams::Board;
use target::Target;

/// File descriptors the tool keeps for itself beyond the streams: publishers, stdio, runtime.
const SPARE_FDS: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// One job (channel) per stream, each completed once.
    Distinct,
    /// Every stream on one job, completed once.
    Single,
    /// One job at a time: its stream opens, its completion is sent, its result read, and only
    /// then the next. With a fleet, stream i opens on instance i mod k and its job is completed
    /// through instance (i + 1) mod k, so every completion crosses to another instance.
    OneByOne,
}

#[derive(Debug, Parser)]
#[command(about = "SSE fan-out benchmark: Handoff or any SSE pub/sub server, loopback only")]
struct Args {
    /// Handoff's base URL, e.g. http://127.0.0.1:8080, or a fleet's, comma-separated: jobs are
    /// created through the first and completed through the API, spread over them all.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["sub_url", "pub_url"],
          required_unless_present = "sub_url")]
    handoff: Vec<String>,
    /// Handoff's API token (default: $HANDOFF_API_TOKEN).
    #[arg(long)]
    token: Option<String>,
    /// A generic target's stream URL with {id}, e.g. 'http://127.0.0.1:8081/sub/{id}';
    /// comma-separated for a fleet.
    #[arg(long, value_delimiter = ',', requires = "pub_url")]
    sub_url: Vec<String>,
    /// A generic target's publish URL with {id}, one per --sub-url; the bench POSTs the event
    /// data to it.
    #[arg(long, value_delimiter = ',', requires = "sub_url")]
    pub_url: Vec<String>,
    /// How many streams to open.
    #[arg(short = 'n', long, default_value_t = 1000)]
    streams: usize,
    #[arg(long, value_enum, default_value_t = Mode::Distinct)]
    mode: Mode,
    /// Streams being opened at once.
    #[arg(long, default_value_t = 100)]
    connect_concurrency: usize,
    /// Keep-alive connections that create and complete jobs, per instance.
    #[arg(long, default_value_t = 4)]
    publishers: usize,
    /// Split the client into this many processes (distinct mode only), each opening its share
    /// of the streams and completing its share of the jobs: one process holds at most as many
    /// streams as its open-file limit allows.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Set by a split run on its parts: this process is part I of K (`I/K`), and waits on
    /// stdin between opening its streams and completing its jobs.
    #[arg(long, hide = true, value_parser = split::parse_part)]
    part: Option<split::Part>,
    /// Set by a split run on its parts: where the source ports start, the same for every part.
    #[arg(long, hide = true)]
    port_seed: Option<usize>,
    /// Upper bound in seconds on each phase (open, create, complete, deliver).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// How long to keep listening after the last expected event, to catch duplicates (ms).
    #[arg(long, default_value_t = 200)]
    settle_ms: u64,
    /// Close each stream as soon as its result arrives, as page A does when it moves on to
    /// page B. Every server then tears its streams down inside the completion window, whether
    /// or not it ends them itself; a duplicate sent later on the same stream goes unseen.
    #[arg(long)]
    leave_on_result: bool,
    /// Handoff only: before completing, send this many progress reports a second to the first
    /// job, for `--progress-secs`, over the publisher connections: what a job runner reporting
    /// often does to the job's streams. Reports are not counted as results.
    #[arg(long, default_value_t = 0)]
    progress_rate: usize,
    #[arg(long, default_value_t = 5)]
    progress_secs: u64,
    /// Complete the jobs in batches of this many, each batch one request: Handoff's
    /// `POST /api/jobs/batch`, or a generic target's multi-channel publish, whose --pub-url then
    /// gets the batch's ids comma-joined for {id} (Nchan's `/multipub?id={id}`). Latency counts
    /// from the batch's request. 0: one request per job.
    #[arg(long, default_value_t = 0)]
    batch: usize,
    /// The servers' pids, comma-separated (for Nchan: the workers'), to read their resident
    /// memory; a fleet's is the sum.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    /// Where to write the figures as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A shell command run, and waited for, once every stream is open and before the first
    /// completion: e.g. to read the servers' counters, so that they cover the completions alone.
    #[arg(long)]
    on_opened: Option<String>,
    /// An instance that watches a share of the jobs without completing any: its stream URL with
    /// {id} (Handoff: `http://127.0.0.1:P/sse/connect/{id}`). One more stream opens there for
    /// every `--watch-every`-th job, and each must get its result once, as the others must.
    /// What a fleet member holding a few of the fleet's streams pays for the rest of its
    /// completions.
    #[arg(long)]
    watcher: Option<String>,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    watch_every: u64,
    /// Keep every latency (ms, in the jobs' order) in the JSON, for the whole distribution and
    /// where in the run the slow ones fell.
    #[arg(long)]
    samples: bool,
    /// A name for this run in the table and JSON.
    #[arg(long, default_value = "run")]
    label: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let fd_limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("handoff-bench: cannot raise the open-file limit: {e}");
            return ExitCode::from(2);
        }
    };
    let in_one_process = match args.part {
        Some(part) => part.share(args.streams).0,
        None => args.streams.div_ceil(args.processes.max(1)),
    };
    if in_one_process as u64 + SPARE_FDS > fd_limit {
        eprintln!(
            "handoff-bench: {in_one_process} streams in one process need more than the open-file \
             limit of {fd_limit} allows (at most {}); split the client with --processes",
            fd_limit.saturating_sub(SPARE_FDS)
        );
        return ExitCode::from(2);
    }
    let token = args
        .token
        .clone()
        .or_else(|| std::env::var("HANDOFF_API_TOKEN").ok());
    let targets = match Target::fleet(&args.handoff, token, &args.sub_url, &args.pub_url) {
        Ok(targets) => targets,
        Err(why) => {
            eprintln!("handoff-bench: {why}");
            return ExitCode::from(2);
        }
    };
    let watcher = match args
        .watcher
        .as_deref()
        .map(target::UrlTemplate::parse_with_id)
    {
        None => None,
        Some(Ok(template)) if args.mode == Mode::Distinct && args.processes <= 1 => Some(template),
        Some(Ok(_)) => {
            eprintln!("handoff-bench: --watcher applies to distinct runs in one process");
            return ExitCode::from(2);
        }
        Some(Err(why)) => {
            eprintln!("handoff-bench: --watcher: {why}");
            return ExitCode::from(2);
        }
    };
    if args.mode == Mode::OneByOne && args.progress_rate > 0 {
        eprintln!("handoff-bench: --progress-rate applies to distinct and single runs");
        return ExitCode::from(2);
    }
    let report = if args.processes > 1 {
        if args.mode != Mode::Distinct {
            eprintln!("handoff-bench: --processes splits distinct runs only");
            return ExitCode::from(2);
        }
        split::run(&args)
    } else {
        // One thread: every send and receive time comes from one clock, and the client stays on
        // the core it is pinned to.
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) if args.mode == Mode::OneByOne => {
                runtime.block_on(one_by_one::run(&args, &targets))
            }
            Ok(runtime) => runtime.block_on(run(&args, &targets, watcher)),
            Err(e) => {
                eprintln!("handoff-bench: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    if args.part.is_some() {
        return split::answer(&report);
    }
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|json| std::fs::write(path, json).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("handoff-bench: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `--on-opened`; a failure is an error of the run.
fn run_hook(command: &str, errors: &mut Vec<String>) {
    match std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => errors.push(format!("--on-opened: {status}")),
        Err(e) => errors.push(format!("--on-opened: {e}")),
    }
}

/// The resident memory of every server, summed; `None` when no pid was given.
fn fleet_rss_kb(pids: &[u32], errors: &mut Vec<String>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    match pids
        .iter()
        .map(|&pid| rss_kb(pid))
        .sum::<Result<u64, String>>()
    {
        Ok(kb) => Some(kb),
        Err(why) => {
            errors.push(why);
            None
        }
    }
}

async fn run(args: &Args, targets: &[Target], watcher: Option<target::UrlTemplate>) -> Report {
    let phase = Duration::from_secs(args.timeout);
    let target = &targets[0];
    let (streams, index_base) = args
        .part
        .map_or((args.streams, 0), |part| part.share(args.streams));
    let mut report = Report {
        label: args.label.clone(),
        instances: targets.len(),
        processes: 1,
        target: if target.handoff_token.is_some() {
            "handoff".into()
        } else {
            "generic".into()
        },
        mode: format!("{:?}", args.mode).to_lowercase(),
        streams,
        connect_concurrency: args.connect_concurrency,
        publishers: args.publishers,
        leave_on_result: args.leave_on_result,
        batch: args.batch,
        expected: streams,
        ..Report::default()
    };
    let channels = match args.mode {
        Mode::Distinct | Mode::OneByOne => streams,
        Mode::Single => 1,
    };
    let deadline = Instant::now() + phase;
    let ids = match channel_ids(target, args.publishers, channels, args.batch, deadline).await {
        Ok(ids) => Arc::new(ids),
        Err(why) => {
            report.errors.push(why);
            return report;
        }
    };
    if args.part.is_some()
        && let Err(why) = split::say_and_wait(split::CREATED, ids.len(), "open").await
    {
        report.errors.push(why);
        return report;
    }
    let rss = |report: &mut Report| fleet_rss_kb(&args.server_pid, &mut report.errors);
    report.rss_before_kb = rss(&mut report);

    // Open every stream.
    let board = Board::new(streams);
    let stop = CancellationToken::new();
    let start = Instant::now();
    let channel_of = {
        let ids = ids.clone();
        move |i: usize| ids[i % ids.len()].clone()
    };
    let subscribe: Vec<_> = targets.iter().map(|t| t.subscribe.clone()).collect();
    let mut opened = streams::open_all(
        &subscribe,
        channel_of,
        &streams::Opening {
            streams,
            concurrency: args.connect_concurrency,
            leave_on_result: args.leave_on_result,
            deadline: start + phase,
            index_base,
            port_seed: args.port_seed.unwrap_or_else(streams::port_seed),
        },
        &board,
        &stop,
    );
    let mut connect_times = Vec::with_capacity(streams);
    for _ in 0..streams {
        match opened.recv().await.map(|o| o.result) {
            Some(Ok(time)) => connect_times.push(time),
            Some(Err(why)) => {
                report.connect_failures += 1;
                note(&mut report.errors, why);
            }
            None => break,
        }
    }
    report.connect_secs = start.elapsed().as_secs_f64();
    report.opened = connect_times.len();
    report.connects_per_sec = report.opened as f64 / report.connect_secs;
    if args.part.is_some() {
        report.connect_samples_ms = millis(&connect_times);
    }
    report.connect_ms = Percentiles::of(connect_times);
    report.rss_after_kb = rss(&mut report);
    if let (Some(before), Some(after)) = (report.rss_before_kb, report.rss_after_kb)
        && report.opened > 0
    {
        report.bytes_per_stream =
            Some(after.saturating_sub(before) as f64 * 1024.0 / report.opened as f64);
    }

    // The watcher's streams open after the fleet's are open and measured, so that the fleet's
    // connect and memory figures stay its own.
    let every = usize::try_from(args.watch_every).unwrap_or(usize::MAX);
    let watched = watcher.as_ref().map_or(0, |_| streams.div_ceil(every));
    let watcher_board = Board::new(watched);
    if let Some(template) = &watcher {
        let ids = ids.clone();
        let mut opened = streams::open_all(
            std::slice::from_ref(template),
            move |i| ids[i * every].clone(),
            &streams::Opening {
                streams: watched,
                concurrency: args.connect_concurrency,
                leave_on_result: args.leave_on_result,
                deadline: Instant::now() + phase,
                // Source ports apart from the fleet's streams'.
                index_base: index_base + streams,
                port_seed: args.port_seed.unwrap_or_else(streams::port_seed),
            },
            &watcher_board,
            &stop,
        );
        for _ in 0..watched {
            match opened.recv().await.map(|o| o.result) {
                Some(Ok(_)) => report.watcher_opened += 1,
                Some(Err(why)) => {
                    report.connect_failures += 1;
                    note(&mut report.errors, format!("watcher: {why}"));
                }
                None => break,
            }
        }
        report.watcher_expected = watched;
    }
    if args.part.is_some()
        && let Err(why) = split::say_and_wait(split::OPENED, report.opened, "go").await
    {
        report.errors.push(why);
        return report;
    }
    if let Some(command) = &args.on_opened {
        run_hook(command, &mut report.errors);
    }

    if args.progress_rate > 0 {
        match &target.progress {
            Some(progress) => {
                flood_progress(args, target, progress, &ids[0], &mut report).await;
                report.rss_after_progress_kb = rss(&mut report);
            }
            None => report
                .errors
                .push("--progress-rate needs a Handoff target".into()),
        }
    }

    // Complete every job and wait for the events.
    let deadline = Instant::now() + phase;
    let outcomes = complete_all(targets, args.publishers, args.batch, &ids, deadline).await;
    let mut first_sent: Option<Instant> = None;
    let mut last_done: Option<Instant> = None;
    let mut sent_at = Vec::with_capacity(channels);
    let mut answered_at = Vec::with_capacity(channels);
    for outcome in &outcomes {
        match outcome {
            Some(o) if matches!(&o.result, Ok((status, _)) if status.is_success()) => {
                report.completions += 1;
                first_sent = Some(first_sent.map_or(o.sent_at, |t| t.min(o.sent_at)));
                last_done = Some(last_done.map_or(o.done_at, |t| t.max(o.done_at)));
                sent_at.push(Some(o.sent_at));
                answered_at.push(Some(o.done_at));
            }
            other => {
                report.completion_failures += 1;
                let why = match other.as_ref().map(|o| &o.result) {
                    Some(Ok((status, body))) => {
                        format!(
                            "completion: status {status}: {}",
                            String::from_utf8_lossy(body)
                        )
                    }
                    Some(Err(why)) => format!("completion: {why}"),
                    None => "completion: not sent before the timeout".into(),
                };
                note(&mut report.errors, why);
                sent_at.push(None);
                answered_at.push(None);
            }
        }
    }
    if let (Some(first), Some(last)) = (first_sent, last_done) {
        report.completion_secs = last.duration_since(first).as_secs_f64();
        report.completions_per_sec = report.completions as f64 / report.completion_secs.max(1e-9);
    }
    board.wait_for(report.opened, Instant::now() + phase).await;
    watcher_board
        .wait_for(report.watcher_opened, Instant::now() + phase)
        .await;
    tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
    stop.cancel();

    report.delivered = board.delivered();
    report.duplicates = board.duplicates() + watcher_board.duplicates();
    report.watcher_delivered = watcher_board.delivered();
    let latencies: Vec<Duration> = (0..streams)
        .filter_map(|i| {
            Some(
                board
                    .arrival(i)?
                    .saturating_duration_since(sent_at[i % channels]?),
            )
        })
        .collect();
    if args.part.is_some() || args.samples {
        report.latency_samples_ms = millis(&latencies);
    }
    let arrivals: Vec<(Instant, Instant)> = (0..streams)
        .filter_map(|i| Some((board.arrival(i)?, answered_at[i % channels]?)))
        .collect();
    report.before_answer = arrivals.iter().filter(|(at, answer)| at < answer).count();
    report.after_answer_ms = Percentiles::of(
        arrivals
            .iter()
            .map(|(at, answer)| at.saturating_duration_since(*answer))
            .collect(),
    );
    report.latency_ms = Percentiles::of(latencies);
    conclude(&mut report);
    report
}

/// Sends `--progress-rate` reports a second to job `id` for `--progress-secs`: each second's
/// reports as fast as the publisher connections take them, then a pause until the next second
/// (none when the server took longer than a second: the rate reached is the sent count over the
/// time taken).
async fn flood_progress(
    args: &Args,
    target: &Target,
    progress: &target::UrlTemplate,
    id: &str,
    report: &mut Report,
) {
    let Some(token) = target.handoff_token.clone() else {
        return;
    };
    let (host, path) = (progress.host.clone(), progress.path(id));
    let make = Arc::new(move |i: usize| {
        let body = format!(r#"{{"percent":{},"message":"report {i}"}}"#, i % 101);
        http::request_with_body("POST", &host, &path, Some(&token), Bytes::from(body))
    });
    let start = Instant::now();
    for second in 0..args.progress_secs {
        let outcomes = http::drive(
            progress.addr,
            args.publishers,
            args.progress_rate,
            start + Duration::from_secs(second + 1 + args.timeout),
            make.clone(),
        )
        .await;
        report.progress_sent += outcomes.len();
        report.progress_ok += outcomes
            .iter()
            .filter(|o| matches!(o, Some(o) if matches!(&o.result, Ok((status, _)) if status.is_success())))
            .count();
        tokio::time::sleep_until(start + Duration::from_secs(second + 1)).await;
    }
    report.progress_secs = start.elapsed().as_secs_f64();
    if report.progress_ok < report.progress_sent {
        note(
            &mut report.errors,
            format!(
                "{} progress reports were not answered 200",
                report.progress_sent - report.progress_ok
            ),
        );
    }
}

/// Says whether the run went well: every stream got its event once, and nothing failed.
fn conclude(report: &mut Report) {
    if report.delivered < report.expected {
        note(
            &mut report.errors,
            format!(
                "{} streams never got their event",
                report.expected - report.delivered
            ),
        );
    }
    if report.watcher_delivered < report.watcher_expected {
        note(
            &mut report.errors,
            format!(
                "{} of the watcher's streams never got their event",
                report.watcher_expected - report.watcher_delivered
            ),
        );
    }
    report.ok = report.delivered == report.expected
        && report.watcher_delivered == report.watcher_expected
        && report.progress_ok == report.progress_sent
        && report.duplicates == 0
        && report.connect_failures == 0
        && report.completion_failures == 0;
}

/// Keeps the first few distinct failure messages.
fn note(errors: &mut Vec<String>, why: String) {
    if errors.len() < 5 && !errors.contains(&why) {
        errors.push(why);
    }
}

/// The job (channel) ids to stream on: created through Handoff's API, or made up for a generic
/// target (unique per run, so a server's buffered messages from an earlier run never match).
async fn channel_ids(
    target: &Target,
    publishers: usize,
    count: usize,
    batch: usize,
    deadline: Instant,
) -> Result<Vec<String>, String> {
    let (Some(token), Some(create)) = (target.handoff_token.clone(), target.create.clone()) else {
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        let pid = std::process::id();
        if batch > 0 {
            // Nchan caps a multi-channel publish's whole id at 1,024 characters: a batch of 100
            // ids needs them at most 9 long.
            let tag = (run as u32 ^ pid) & 0xffff;
            return Ok((0..count).map(|i| format!("{tag:04x}{i:x}")).collect());
        }
        return Ok((0..count).map(|i| format!("b{run:x}-{pid}-{i}")).collect());
    };
    let path = create.path("");
    let make = Arc::new(move |_| http::request("POST", &create.host, &path, Some(&token)));
    let addr = target
        .create
        .as_ref()
        .map_or(target.publish.addr, |c| c.addr);
    let outcomes = http::drive(addr, publishers, count, deadline, make).await;
    outcomes
        .into_iter()
        .map(|outcome| {
            let (status, body) = outcome
                .ok_or("creating jobs: not done before the timeout")?
                .result
                .map_err(|why| format!("creating a job: {why}"))?;
            if status != hyper::StatusCode::CREATED {
                return Err(format!(
                    "creating a job: status {status}: {}",
                    String::from_utf8_lossy(&body)
                ));
            }
            let job: serde_json::Value = serde_json::from_slice(&body)
                .map_err(|e| format!("creating a job: the answer is not JSON: {e}"))?;
            job["id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| "creating a job: no id in the answer".into())
        })
        .collect()
}

/// Completes (publishes) every id once, over `publishers` keep-alive connections to each
/// instance, one request per job or (`batch` > 0) per batch of that many. Job i goes to instance
/// (i / k) mod k: each instance gets an equal share, and since stream i is on instance i mod k,
/// k − 1 in k completions must cross to another instance. A batch's outcome is each of its jobs'.
async fn complete_all(
    targets: &[Target],
    publishers: usize,
    batch: usize,
    ids: &Arc<Vec<String>>,
    deadline: Instant,
) -> Vec<Option<http::Outcome>> {
    let k = targets.len();
    let mut shares = vec![Vec::new(); k];
    for i in 0..ids.len() {
        shares[(i / k) % k].push(i);
    }
    let mut drives = tokio::task::JoinSet::new();
    for (target, share) in targets.iter().zip(shares) {
        let groups: Arc<Vec<Vec<usize>>> =
            Arc::new(share.chunks(batch.max(1)).map(<[usize]>::to_vec).collect());
        let addr = target.publish.addr;
        let (ids, target) = (ids.clone(), target.clone());
        let jobs = groups.clone();
        let make = Arc::new(move |n: usize| {
            let group: Vec<&str> = jobs[n].iter().map(|&i| ids[i].as_str()).collect();
            publish_request(&target, batch > 0, &group)
        });
        drives.spawn(async move {
            let outcomes = http::drive(addr, publishers, groups.len(), deadline, make).await;
            (groups, outcomes)
        });
    }
    let mut all = vec![None; ids.len()];
    while let Some(done) = drives.join_next().await {
        if let Ok((groups, outcomes)) = done {
            for (group, outcome) in groups.iter().zip(outcomes) {
                for (place, &i) in group.iter().enumerate() {
                    all[i] = outcome.as_ref().map(|o| batch_member(o, batch > 0, place));
                }
            }
        }
    }
    all
}

/// The request that completes `group`: one job's completion or publish, or a batch's.
fn publish_request(target: &Target, batched: bool, group: &[&str]) -> hyper::Request<http::Body> {
    let publish = &target.publish;
    let data = |id: &str| format!(r#"{{"status":"result","moveUrl":"/done?id={id}"}}"#);
    match (&target.handoff_token, &target.batch) {
        (Some(token), Some(endpoint)) if batched => {
            let operations: Vec<serde_json::Value> = group
                .iter()
                .map(|id| serde_json::json!({ "op": "complete", "id": id }))
                .collect();
            let body = serde_json::json!({ "operations": operations }).to_string();
            http::request_with_body(
                "POST",
                &endpoint.host,
                &endpoint.path(""),
                Some(token),
                Bytes::from(body),
            )
        }
        (Some(token), _) => {
            http::request("POST", &publish.host, &publish.path(group[0]), Some(token))
        }
        // One message for the whole batch: what a multi-channel publish carries.
        (None, _) => http::request_with_body(
            "POST",
            &publish.host,
            &publish.path(&group.join(",")),
            None,
            Bytes::from(data(if batched { "batch" } else { group[0] })),
        ),
    }
}

/// A batch's outcome as its `place`-th job's: Handoff answers each job apart, in order.
fn batch_member(outcome: &http::Outcome, batched: bool, place: usize) -> http::Outcome {
    let mut member = outcome.clone();
    if let (true, Ok((status, body))) = (batched, &outcome.result)
        && status.is_success()
        && let Ok(answer) = serde_json::from_slice::<serde_json::Value>(body)
        && let Some(result) = answer["results"].get(place)
        && result["status"] != 200
    {
        member.result = Err(format!("batch result: {result}"));
    }
    member
}

fn millis(samples: &[Duration]) -> Vec<f64> {
    samples.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}
