//! A real Redis Cluster for the tests: 3 masters and 3 replicas, each `redis-server` on a
//! loopback port in a temp folder of its own, joined by `redis-cli --cluster create`. A test may
//! kill a node (its replica takes over), stop and restart them all, cut the subscribers' links,
//! or start a planned failover.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::eventually;

/// How long a cluster may take to agree after a create or a failover.
const SETTLE: Duration = Duration::from_secs(30);

struct Node {
    port: u16,
    child: Option<Child>,
}

/// Six nodes, killed when dropped.
pub struct RedisCluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

/// A port free for a node and for its cluster bus (the port + 10000).
fn free_node_port() -> u16 {
    // Below the ephemeral range (32768 and up here), with the bus port (+10,000) too: a node
    // restarted on its port after a kill must find it free, and an ephemeral port can meanwhile
    // become some other test's outgoing connection (it did, under load in CI: "did not answer").
    const FIRST: u16 = 20_000;
    const PAST: u16 = 22_768;
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        FIRST + (std::process::id() % u32::from(PAST - FIRST)) as u16,
        std::sync::atomic::Ordering::Relaxed,
        std::sync::atomic::Ordering::Relaxed,
    );
    loop {
        let taken = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = FIRST + taken.wrapping_sub(FIRST) % (PAST - FIRST);
        let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

/// One `redis-cli` command against `port`; its output, or a panic saying what went wrong.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): run scripts/test.sh"));
    assert!(output.status.success(), "redis-cli {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The port of a replica of the master on `port`, as that master's `CLUSTER NODES` lists it.
fn replica_port(port: u16) -> Option<u16> {
    let nodes = redis_cli(port, &["CLUSTER", "NODES"]);
    let master_id = nodes
        .lines()
        .find(|line| line.contains("myself"))?
        .split(' ')
        .next()?;
    nodes
        .lines()
        .map(|line| line.split(' ').collect::<Vec<_>>())
        .find(|fields| fields.len() > 3 && fields[2].contains("slave") && fields[3] == master_id)
        .and_then(|fields| {
            fields[1]
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
}

impl RedisCluster {
    /// Starts the six nodes, creates the cluster and waits until every slot is served.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let port = free_node_port();
            std::fs::create_dir(dir.path().join(port.to_string())).expect("node folder");
            nodes.push(Node { port, child: None });
        }
        let mut cluster = Self { nodes, _dir: dir };
        cluster.start_nodes().await;
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(created.status.success(), "cluster create: {created:?}");
        cluster.wait_ok().await;
        cluster
    }

    /// Starts every node that is not running, in its own folder (where its `nodes.conf` keeps
    /// its place in the cluster), and waits until each answers.
    async fn start_nodes(&mut self) {
        for node in self.nodes.iter_mut().filter(|n| n.child.is_none()) {
            let port = node.port;
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(self._dir.path().join(port.to_string()))
                .stdout(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run redis-server ({e}): run scripts/test.sh, or apt-get install redis-server")
                });
            node.child = Some(child);
        }
        for node in &self.nodes {
            let port = node.port;
            let up = eventually(Duration::from_secs(10), || async move {
                Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "PING"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
            });
            assert!(up.await, "redis-server on port {port} did not answer");
        }
    }

    /// SIGKILLs every node: the whole cluster is down, and every client's links break at once.
    pub fn stop(&mut self) {
        let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
        for port in ports {
            self.kill(port);
        }
    }

    /// Starts every stopped node again on its port, with the cluster configuration it saved,
    /// and waits until the cluster serves every slot.
    pub async fn restart(&mut self) {
        self.start_nodes().await;
        self.wait_ok().await;
    }

    /// `REDIS_URL` for `HANDOFF_REDIS_CLUSTER=on`: every node as a seed.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A node still running.
    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .map(|n| n.port)
            .expect("a live node")
    }

    /// Waits until every live node says `cluster_state:ok`.
    pub async fn wait_ok(&self) {
        let ports = self.live_ports();
        let ok = eventually(SETTLE, || {
            let ports = ports.clone();
            async move {
                ports
                    .iter()
                    .all(|&p| redis_cli(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            }
        });
        assert!(ok.await, "the cluster never reached cluster_state:ok");
    }

    /// The port of the master serving `channel`'s slot.
    pub fn master_of(&self, channel: &str) -> u16 {
        let slot: u16 = redis_cli(self.live_port(), &["CLUSTER", "KEYSLOT", channel])
            .trim()
            .parse()
            .expect("a slot number");
        let nodes = redis_cli(self.live_port(), &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            for range in &fields[8..] {
                let (from, to) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(from), Ok(to)) = (from.parse::<u16>(), to.parse::<u16>())
                    && (from..=to).contains(&slot)
                {
                    let address = fields[1].split('@').next().expect("an address");
                    return address
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .expect("a port");
                }
            }
        }
        panic!("no master serves slot {slot}: {nodes}");
    }

    /// SIGKILLs the node on `port`, as a crash would.
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster");
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `SPUBLISH` through the node serving the channel; how many subscribers got it.
    pub fn spublish(&self, channel: &str, message: &str) -> u64 {
        let answer = redis_cli(self.master_of(channel), &["SPUBLISH", channel, message]);
        answer
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SPUBLISH answered {answer:?}"))
    }

    /// `CLIENT KILL TYPE pubsub` on every live node: every subscribing link breaks (the node
    /// stays up); how many links were cut.
    pub fn kill_subscriber_links(&self) -> u64 {
        self.live_ports()
            .iter()
            .map(|&port| {
                let killed = redis_cli(port, &["CLIENT", "KILL", "TYPE", "pubsub"]);
                killed
                    .trim()
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("CLIENT KILL on {port} answered {killed:?}"))
            })
            .sum()
    }

    /// A planned failover, as an operator starts one for maintenance: `CLUSTER FAILOVER` on a
    /// replica of the master on `port`, which takes over its slots while the old master stays
    /// up as its replica (no link drops). Returns the new master's port once it is done: every
    /// node sees the new master, and the new master counts the old one as its replica (and so
    /// passes the shard's messages on to it again).
    pub async fn fail_over(&self, port: u16) -> u16 {
        let replica = self.replica_of(port).await;
        let answer = redis_cli(replica, &["CLUSTER", "FAILOVER"]);
        assert_eq!(answer.trim(), "OK", "CLUSTER FAILOVER on {replica}");
        let done = eventually(SETTLE, || async move {
            let promoted = self.live_ports().iter().all(|&p| {
                redis_cli(p, &["CLUSTER", "NODES"])
                    .lines()
                    .any(|l| l.contains(&format!(":{replica}@")) && l.contains("master"))
            });
            promoted && replica_port(replica) == Some(port)
        });
        assert!(
            done.await,
            "{replica} took over from {port}, which became its replica"
        );
        self.wait_ok().await;
        replica
    }

    /// The port of the replica of the master on `port`, once it has linked to its master (and
    /// so could take over: a failover needs a replica that has the data).
    pub async fn replica_of(&self, port: u16) -> u16 {
        let linked = eventually(SETTLE, || async move {
            replica_port(port).is_some_and(|replica| {
                redis_cli(replica, &["INFO", "replication"]).contains("master_link_status:up")
            })
        });
        assert!(linked.await, "the master on {port} has no linked replica");
        replica_port(port).expect("the replica found above")
    }

    fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.port)
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
