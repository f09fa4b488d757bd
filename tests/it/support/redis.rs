//! Redis for the tests: the shared server at 127.0.0.1:6379 (each test on a channel of its own),
//! or a private `redis-server` ([`RedisServer`]) that a test may stop, restart or cut off
//! without disturbing anyone else.

use std::process::{Child, Command, Stdio};

use super::{WAIT, eventually, free_port};

pub const SHARED_REDIS: &str = "redis://127.0.0.1:6379";

/// A Pub/Sub channel no other test run uses.
pub fn fresh_channel() -> String {
    format!("handoff:test:{:016x}", rand::random::<u64>())
}

/// The shared Redis, or a panic saying how to start it.
pub async fn shared_redis() -> &'static str {
    if let Err(e) = ping(SHARED_REDIS).await {
        panic!(
            "this test needs Redis at {SHARED_REDIS}: run scripts/test.sh, or start redis-server: {e}"
        );
    }
    SHARED_REDIS
}

/// A private `redis-server` on a free port, with no persistence; stopped on drop.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let mut server = Self {
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): run scripts/test.sh, or apt-get install redis-server"
                )
            });
        self.child = Some(child);
        let url = self.url();
        let up = eventually(WAIT, || async { ping(&url).await.is_ok() });
        assert!(
            up.await,
            "redis-server on port {} did not answer",
            self.port
        );
    }

    /// SIGKILL: every client's connection breaks at once.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends one command (`args[0]` with the rest as its arguments); its answer.
    pub async fn command(&self, args: &[&str]) -> redis::Value {
        command(&self.url(), args).await
    }
}

/// Sends one command (`args[0]` with the rest as its arguments) to the Redis at `url`; its
/// answer, as `T`.
pub async fn command<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> T {
    let client = redis::Client::open(url).expect("a Redis URL");
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("a connection");
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command
        .query_async(&mut connection)
        .await
        .expect("a Redis answer")
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn ping(url: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    redis::cmd("PING")
        .query_async::<String>(&mut connection)
        .await?;
    Ok(())
}
