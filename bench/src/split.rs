//! A run split over several client processes: one process may hold only as many streams as its
//! open-file limit allows (20,000 here), and a capacity rehearsal needs 100,000.
//!
//! The parent starts K copies of itself with `--part I/K`. Each part creates its own jobs, says
//! `created N` on stdout and waits. When every part has, the parent reads the servers' memory
//! and answers `open` on every stdin, so that the memory before the streams excludes the jobs'
//! and every part starts opening at once. Each part opens its share of the streams, says
//! `opened N`, and waits again. When every part has opened, the parent reads the servers'
//! memory again and answers `go`, so the completions of all parts start together. Each part completes its own jobs (so its latencies
//! are on its own clock) and answers with its report as one JSON line; the parent merges them,
//! taking percentiles over every part's raw samples.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::str::FromStr;

use tokio::io::AsyncBufReadExt;

use crate::report::{Percentiles, Report};
use crate::{Args, fleet_rss_kb};

/// Part `index` (0-based) of `of`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub index: usize,
    pub of: usize,
}

impl Part {
    /// This part's streams out of `streams`, and the index of its first stream in the whole run:
    /// the first `streams mod of` parts take one more.
    pub fn share(self, streams: usize) -> (usize, usize) {
        let (base, extra) = (streams / self.of, streams % self.of);
        let count = base + usize::from(self.index < extra);
        (count, self.index * base + self.index.min(extra))
    }
}

/// `I/K` with I < K.
pub fn parse_part(value: &str) -> Result<Part, String> {
    let (index, of) = value
        .split_once('/')
        .ok_or_else(|| format!("{value:?}: expected I/K"))?;
    let (index, of) = (usize::from_str(index), usize::from_str(of));
    match (index, of) {
        (Ok(index), Ok(of)) if index < of => Ok(Part { index, of }),
        _ => Err(format!("{value:?}: expected I/K with I < K")),
    }
}

pub const CREATED: &str = "created ";
pub const OPENED: &str = "opened ";
const REPORT: &str = "report ";

/// In a part: says `what` and a count on stdout, then waits for the parent to answer `go_word`.
pub async fn say_and_wait(what: &str, count: usize, go_word: &str) -> Result<(), String> {
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{what}{count}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("telling the parent: {e}"))?;
    }
    // One line at a time: the parent writes the next word only after this part's next message.
    let mut line = String::new();
    tokio::io::BufReader::new(tokio::io::stdin())
        .read_line(&mut line)
        .await
        .map_err(|e| format!("waiting for {go_word}: {e}"))?;
    if line.trim() == go_word {
        Ok(())
    } else {
        Err(format!("the parent went away before saying {go_word}"))
    }
}

/// In a part: hands the report to the parent.
pub fn answer(report: &Report) -> ExitCode {
    match serde_json::to_string(report) {
        Ok(json) => {
            println!("{REPORT}{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("handoff-bench: cannot encode the report: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The arguments a part gets: the parent's, without the ones only the parent acts on.
fn part_args(of: usize, index: usize, seed: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let name = arg.split('=').next().unwrap_or_default();
        if matches!(
            name,
            "--processes" | "--json" | "--server-pid" | "--part" | "--on-opened" | "--port-seed"
        ) {
            if !arg.contains('=') {
                args.next();
            }
            continue;
        }
        out.push(arg);
    }
    out.extend([
        "--part".into(),
        format!("{index}/{of}"),
        "--port-seed".into(),
        seed.to_string(),
    ]);
    out
}

struct Running {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl Running {
    /// The value after `prefix` on the part's next line that has it.
    fn next_with(&mut self, prefix: &str) -> Result<String, String> {
        for line in self.lines.by_ref() {
            let line = line.map_err(|e| format!("reading a part: {e}"))?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok(rest.to_owned());
            }
        }
        Err(format!("a part ended before saying {prefix:?}"))
    }
}

/// The sum of the counts every part says next after `prefix`.
fn counts(parts: &mut [Running], prefix: &str) -> Result<usize, String> {
    parts
        .iter_mut()
        .map(|part| {
            part.next_with(prefix)?
                .parse::<usize>()
                .map_err(|e| format!("a part's count: {e}"))
        })
        .sum()
}

/// Writes `word` to every part's stdin; `last` closes it after.
fn tell(parts: &mut [Running], word: &str, last: bool) {
    for part in parts.iter_mut() {
        if let Some(stdin) = part.child.stdin.as_mut() {
            let _ = stdin
                .write_all(format!("{word}\n").as_bytes())
                .and_then(|()| stdin.flush());
        }
        if last {
            drop(part.child.stdin.take());
        }
    }
}

/// In the parent: runs the parts and merges their reports.
pub fn run(args: &Args) -> Report {
    let mut whole = Report {
        label: args.label.clone(),
        processes: args.processes,
        ..Report::default()
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            whole.errors.push(format!("cannot find this program: {e}"));
            return whole;
        }
    };
    let seed = crate::streams::port_seed();
    let mut parts = Vec::new();
    for index in 0..args.processes {
        let spawned = Command::new(&exe)
            .args(part_args(args.processes, index, seed))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        match spawned {
            Ok(mut child) => {
                let Some(stdout) = child.stdout.take() else {
                    whole.errors.push("a part has no stdout".into());
                    break;
                };
                parts.push(Running {
                    child,
                    lines: BufReader::new(stdout).lines(),
                });
            }
            Err(e) => {
                whole.errors.push(format!("cannot start part {index}: {e}"));
                break;
            }
        }
    }
    let created = if parts.len() == args.processes {
        counts(&mut parts, CREATED)
    } else {
        Err("not every part started".into())
    };
    // After the jobs, before the streams: the memory the streams add, as one process measures it.
    whole.rss_before_kb = fleet_rss_kb(&args.server_pid, &mut whole.errors);
    // Without the word it waits for, a part gives up.
    tell(
        &mut parts,
        if created.is_ok() { "open" } else { "stop" },
        false,
    );
    let opened = created.and_then(|_| counts(&mut parts, OPENED));
    whole.rss_after_kb = fleet_rss_kb(&args.server_pid, &mut whole.errors);
    if let Err(why) = &opened {
        whole.errors.push(why.clone());
    }
    if let (Ok(_), Some(command)) = (&opened, &args.on_opened) {
        crate::run_hook(command, &mut whole.errors);
    }
    // Every part completes at once.
    tell(&mut parts, if opened.is_ok() { "go" } else { "stop" }, true);
    let reports: Vec<Report> = parts
        .iter_mut()
        .filter_map(|part| {
            let report = part
                .next_with(REPORT)
                .and_then(|json| serde_json::from_str(&json).map_err(|e| e.to_string()));
            let _ = part.child.wait();
            report.map_err(|why| whole.errors.push(why)).ok()
        })
        .collect();
    merge(whole, &reports, args.processes)
}

/// One report of the whole run: counts summed; times over the slowest part (they start
/// together); percentiles over every sample.
fn merge(mut whole: Report, parts: &[Report], expected_parts: usize) -> Report {
    let max = |f: fn(&Report) -> f64| parts.iter().map(f).fold(0.0, f64::max);
    let sum = |f: fn(&Report) -> usize| parts.iter().map(f).sum::<usize>();
    if let Some(first) = parts.first() {
        whole.target = first.target.clone();
        whole.mode = first.mode.clone();
        whole.instances = first.instances;
        whole.connect_concurrency = first.connect_concurrency;
        whole.publishers = first.publishers;
        whole.leave_on_result = first.leave_on_result;
    }
    whole.streams = sum(|r| r.streams);
    whole.opened = sum(|r| r.opened);
    whole.connect_failures = sum(|r| r.connect_failures);
    whole.connect_secs = max(|r| r.connect_secs);
    whole.connects_per_sec = whole.opened as f64 / whole.connect_secs.max(1e-9);
    let connects: Vec<f64> = parts
        .iter()
        .flat_map(|r| r.connect_samples_ms.iter().copied())
        .collect();
    whole.connect_ms = Percentiles::of_ms(&connects);
    whole.completions = sum(|r| r.completions);
    whole.completion_failures = sum(|r| r.completion_failures);
    whole.completion_secs = max(|r| r.completion_secs);
    whole.completions_per_sec = whole.completions as f64 / whole.completion_secs.max(1e-9);
    whole.expected = sum(|r| r.expected);
    whole.delivered = sum(|r| r.delivered);
    whole.duplicates = sum(|r| r.duplicates);
    let latencies: Vec<f64> = parts
        .iter()
        .flat_map(|r| r.latency_samples_ms.iter().copied())
        .collect();
    whole.latency_ms = Percentiles::of_ms(&latencies);
    if let (Some(before), Some(after)) = (whole.rss_before_kb, whole.rss_after_kb)
        && whole.opened > 0
    {
        whole.bytes_per_stream =
            Some(after.saturating_sub(before) as f64 * 1024.0 / whole.opened as f64);
    }
    for part in parts {
        for why in &part.errors {
            if whole.errors.len() < 8 && !whole.errors.contains(why) {
                whole.errors.push(why.clone());
            }
        }
    }
    whole.ok = parts.len() == expected_parts
        && whole.errors.is_empty()
        && parts.iter().all(|r| r.ok)
        && whole.delivered == whole.expected;
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_share_the_streams_without_gaps_or_overlaps() {
        let mut next = 0;
        for index in 0..6 {
            let (count, first) = Part { index, of: 6 }.share(100_003);
            assert_eq!(first, next);
            next += count;
        }
        assert_eq!(next, 100_003);
        assert_eq!(parse_part("2/6"), Ok(Part { index: 2, of: 6 }));
        assert!(parse_part("6/6").is_err());
        assert!(parse_part("x").is_err());
    }

    #[test]
    fn a_merged_report_sums_counts_and_takes_percentiles_over_all_samples() {
        let part = |latencies: Vec<f64>, delivered| Report {
            streams: latencies.len(),
            opened: latencies.len(),
            expected: latencies.len(),
            delivered,
            completions: latencies.len(),
            completion_secs: 1.0,
            connect_secs: 0.5,
            latency_samples_ms: latencies,
            ok: true,
            ..Report::default()
        };
        let whole = merge(
            Report::default(),
            &[part(vec![1.0; 99], 99), part(vec![50.0], 1)],
            2,
        );
        assert_eq!(
            (whole.opened, whole.delivered, whole.expected),
            (100, 100, 100)
        );
        assert!(whole.ok);
        let latency = whole.latency_ms.unwrap();
        assert_eq!((latency.p50, latency.max), (1.0, 50.0));
        assert_eq!(whole.completions_per_sec, 100.0);
        let short = merge(Report::default(), &[part(vec![1.0; 3], 2)], 1);
        assert!(!short.ok, "a part that lost a result fails the whole");
    }
}
