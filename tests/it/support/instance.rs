//! The `handoff` binary as a process of its own ([`Instance`]): started on port 0 with the
//! variables a test gives, its log captured line by line, stopped with SIGTERM or SIGKILL at will
//! and killed when dropped. [`Instance::in_fleet`] starts one of several sharing a database
//! and a Redis channel.

use std::io::{BufRead, BufReader};
use std::ops::Deref;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::client::Handoff;
use super::{FreshDb, TOKEN, eventually};

/// Every line the binary has logged so far.
pub type CapturedLog = Arc<Mutex<Vec<String>>>;

/// A running `handoff` process and a [`Handoff`] client of it (through `Deref`).
pub struct Instance {
    pub child: Child,
    pub log: CapturedLog,
    handoff: Handoff,
}

impl Deref for Instance {
    type Target = Handoff;

    fn deref(&self) -> &Handoff {
        &self.handoff
    }
}

impl Instance {
    /// Starts the binary on port 0 in `dir` with the API token [`TOKEN`] and `envs` (log level
    /// info unless `envs` says otherwise); returns once it listens.
    pub fn start(dir: &Path, envs: &[(&str, &str)]) -> Self {
        Self::start_command(Command::new(env!("CARGO_BIN_EXE_handoff")), dir, envs)
    }

    /// Like [`Instance::start`], through a command that ends by running the binary (e.g.
    /// `prlimit … --`).
    pub fn start_command(mut command: Command, dir: &Path, envs: &[(&str, &str)]) -> Self {
        let mut child = command
            .current_dir(dir)
            .env("HANDOFF_ADDR", "127.0.0.1:0")
            .env("HANDOFF_API_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start handoff");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let log = CapturedLog::default();
        let base = loop {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!(
                    "handoff exited before listening; its log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            };
            log.lock().unwrap().push(line.clone());
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .expect("an address")
                    .to_owned();
            }
        };
        // Keep draining the log so the child never blocks on a full pipe.
        // Its warnings and errors also go to this test's output.
        let sink = Arc::clone(&log);
        let tag = base.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if line.contains(" WARN ") || line.contains(" ERROR ") {
                    eprintln!("[handoff {tag}] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            log,
            handoff: Handoff::new(base),
        }
    }

    /// One instance of a fleet: on `db`, publishing and subscribing on `channel` of
    /// `redis_url` when there is one, with `more` variables.
    pub fn in_fleet(
        db: &FreshDb,
        redis_url: Option<&str>,
        channel: &str,
        more: &[(&str, &str)],
    ) -> Self {
        let mut envs = vec![
            ("DATABASE_URL", db.url()),
            ("HANDOFF_REDIS_CHANNEL", channel),
        ];
        if let Some(url) = redis_url {
            envs.push(("REDIS_URL", url));
        }
        envs.extend_from_slice(more);
        Self::start(&std::env::temp_dir(), &envs)
    }

    /// Everything it logged so far, one line after the other.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL: no shutdown, its connections simply break, as in a crash.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("the killed instance is reaped");
    }

    /// Sends SIGTERM; returns when it was sent.
    pub fn sigterm(&self) -> Instant {
        let started = Instant::now();
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(kill.success(), "kill -TERM failed");
        started
    }

    /// Waits for the process to exit, failing once `limit` has passed since `started`.
    pub async fn exit_within(&mut self, started: Instant, limit: Duration) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "still running {limit:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Its resident memory, in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id();
        let status =
            std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse()
                    .ok()
            })
            .expect("a VmRSS line")
    }

    /// Waits until its subscriber has counted a reconnect and `/healthz` is `ok` again. Each
    /// instance backs off on its own, so one may be back seconds before another.
    pub async fn wait_resubscribed(&self) {
        let back = eventually(Duration::from_secs(10), || async {
            self.metric("handoff_redis_reconnects_total").await >= 1.0
        });
        assert!(back.await, "{} counts its reconnect", self.base);
        self.wait_healthy().await;
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two instances on one PostgreSQL database and a fresh channel of `redis_url`, with `more`
/// variables, both healthy.
pub async fn pair(db: &FreshDb, redis_url: &str, more: &[(&str, &str)]) -> (Instance, Instance) {
    let channel = super::redis::fresh_channel();
    let one = Instance::in_fleet(db, Some(redis_url), &channel, more);
    let two = Instance::in_fleet(db, Some(redis_url), &channel, more);
    one.wait_healthy().await;
    two.wait_healthy().await;
    (one, two)
}
