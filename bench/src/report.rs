//! The figures of one run: computed from raw times, printed as a table and written as JSON.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency percentiles in milliseconds (nearest rank).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    /// The tail past p99: at 10,000 samples, the 10th worst.
    #[serde(default)]
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// From samples in milliseconds.
    pub fn of_ms(samples: &[f64]) -> Option<Self> {
        Self::of(
            samples
                .iter()
                .map(|&ms| Duration::from_secs_f64(ms.max(0.0) / 1e3))
                .collect(),
        )
    }

    pub fn of(mut samples: Vec<Duration>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let rank = |p: f64| {
            // Nearest rank: the smallest sample with at least p of all samples at or below it.
            let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
            millis(samples[i])
        };
        Some(Self {
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            p999: rank(0.999),
            max: rank(1.0),
        })
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Everything one run measured; the JSON the bench script reads.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub target: String,
    /// Servers the streams and completions were spread over.
    pub instances: usize,
    /// Processes the client was split into.
    pub processes: usize,
    pub mode: String,
    pub streams: usize,
    pub connect_concurrency: usize,
    pub publishers: usize,
    /// Jobs per completion request; 0 for one request per job.
    #[serde(default)]
    pub batch: usize,
    pub leave_on_result: bool,
    pub opened: usize,
    pub connect_failures: usize,
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    pub connect_ms: Option<Percentiles>,
    pub completions: usize,
    pub completion_failures: usize,
    pub completion_secs: f64,
    pub completions_per_sec: f64,
    pub expected: usize,
    pub delivered: usize,
    /// Duplicates on every stream, the watcher's included.
    pub duplicates: usize,
    /// With `--watcher`: its streams, how many opened, and how many got their result.
    #[serde(default)]
    pub watcher_expected: usize,
    #[serde(default)]
    pub watcher_opened: usize,
    #[serde(default)]
    pub watcher_delivered: usize,
    pub latency_ms: Option<Percentiles>,
    /// From the completion's answer (a batch's, for a batch) to the event; an event that came
    /// before its answer counts as 0.
    #[serde(default)]
    pub after_answer_ms: Option<Percentiles>,
    /// Events that arrived before their completion's answer.
    #[serde(default)]
    pub before_answer: usize,
    /// One-by-one runs: from sending each completion to its `200` having been read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_ms: Option<Percentiles>,
    pub rss_before_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
    pub bytes_per_stream: Option<f64>,
    /// With `--progress-rate`: reports sent to the first job before the completions, how many
    /// were answered `200`, over how long, and the server's memory after them.
    pub progress_sent: usize,
    pub progress_ok: usize,
    pub progress_secs: f64,
    pub rss_after_progress_kb: Option<u64>,
    /// A split run's parts hand their raw times (ms) to the whole, so that its percentiles are
    /// taken over every sample rather than merged from the parts'. With `--samples`, the
    /// latencies are kept here too, in the jobs' order, for the whole distribution.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connect_samples_ms: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_samples_ms: Vec<f64>,
    /// The first few failure messages, to say what went wrong.
    pub errors: Vec<String>,
    pub ok: bool,
}

impl Report {
    /// A readable table for the terminal.
    pub fn table(&self) -> String {
        let pct = |p: &Option<Percentiles>| match p {
            Some(p) => format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms",
                p.p50, p.p90, p.p99, p.p999, p.max
            ),
            None => "-".into(),
        };
        let opt = |v: Option<u64>| v.map_or("-".into(), |v| format!("{v} kB"));
        let rows = [
            (
                "run",
                format!(
                    "{} ({}, {}; {} instance(s), {} client process(es))",
                    self.label, self.target, self.mode, self.instances, self.processes
                ),
            ),
            (
                "streams",
                format!(
                    "{}{}",
                    self.streams,
                    if self.leave_on_result {
                        ", each closed by the client at its result"
                    } else {
                        ""
                    }
                ),
            ),
            (
                "opened",
                format!(
                    "{} ({} failed) in {:.3} s: {:.0} connects/s",
                    self.opened, self.connect_failures, self.connect_secs, self.connects_per_sec
                ),
            ),
            ("connect time", pct(&self.connect_ms)),
            (
                "progress",
                format!(
                    "{} of {} reports answered 200 in {:.3} s; memory after: {}",
                    self.progress_ok,
                    self.progress_sent,
                    self.progress_secs,
                    opt(self.rss_after_progress_kb)
                ),
            ),
            (
                "completions",
                format!(
                    "{} ({} failed) in {:.3} s over {} connections: {:.0}/s",
                    self.completions,
                    self.completion_failures,
                    self.completion_secs,
                    self.publishers,
                    self.completions_per_sec
                ),
            ),
            (
                "delivered",
                format!(
                    "{} / {} expected, {} duplicates",
                    self.delivered, self.expected, self.duplicates
                ),
            ),
            (
                "watcher",
                format!(
                    "{} / {} expected ({} opened)",
                    self.watcher_delivered, self.watcher_expected, self.watcher_opened
                ),
            ),
            ("latency", pct(&self.latency_ms)),
            ("answered", pct(&self.answer_ms)),
            (
                "after answer",
                format!(
                    "{} ({} events before their answer)",
                    pct(&self.after_answer_ms),
                    self.before_answer
                ),
            ),
            (
                "server RSS",
                format!(
                    "{} before, {} after: {}",
                    opt(self.rss_before_kb),
                    opt(self.rss_after_kb),
                    self.bytes_per_stream
                        .map_or("-".into(), |b| format!("{b:.0} bytes per stream"))
                ),
            ),
            (
                "verdict",
                if self.ok {
                    "OK".into()
                } else {
                    "FAILED".into()
                },
            ),
        ];
        let mut out = String::new();
        for (name, value) in rows {
            out.push_str(&format!("{name:>14}  {value}\n"));
        }
        for error in &self.errors {
            out.push_str(&format!("{:>14}  {error}\n", "error"));
        }
        out
    }
}

/// The resident memory of a process, from `/proc/PID/status`.
pub fn rss_kb(pid: u32) -> Result<u64, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples = (1..=1000).map(Duration::from_millis).collect();
        let p = Percentiles::of(samples).unwrap();
        assert_eq!(
            (p.p50, p.p90, p.p99, p.p999, p.max),
            (500.0, 900.0, 990.0, 999.0, 1000.0)
        );
        assert!(Percentiles::of(Vec::new()).is_none());
    }

    #[test]
    fn the_resident_memory_of_this_process_is_readable() {
        assert!(rss_kb(std::process::id()).unwrap() > 0);
    }
}
