//! Routed fan-out on a real Redis Cluster (sharded Pub/Sub): results cross instances, an
//! instance watching nothing hears nothing, a master's failover loses nothing. (The scale-out
//! scenarios of `tests/it/scale_out.rs`, forged messages on a job's channel among them, run on a
//! cluster too.)

use futures_util::{StreamExt, stream};

use crate::support::redis_cluster::RedisCluster;
use crate::support::{FreshDb, Instance, SseReader};

const KEY: &str = "a-fanout-key-of-at-least-32-characters-for-the-cluster";

/// One `handoff` process on the cluster, once healthy; killed when dropped.
async fn start(db: &FreshDb, cluster: &RedisCluster, more: &[(&str, &str)]) -> Instance {
    let seeds = cluster.seeds();
    let mut envs = vec![
        ("DATABASE_URL", db.url()),
        ("REDIS_URL", seeds.as_str()),
        ("HANDOFF_REDIS_CLUSTER", "on"),
        ("HANDOFF_FANOUT_LEGACY_CHANNEL", "off"),
        ("HANDOFF_FANOUT_KEY", KEY),
        ("HANDOFF_MAX_STREAMS_PER_CLIENT", "off"),
    ];
    envs.extend_from_slice(more);
    let instance = Instance::start(&std::env::temp_dir(), &envs);
    instance.wait_healthy().await;
    instance
}

/// Opens a stream for each of `ids` on the instance `on(i)` names, and a task per stream that
/// says whether its result is the job's.
async fn watch_all<'a>(
    ids: &[String],
    on: impl Fn(usize) -> &'a Instance,
) -> Vec<tokio::task::JoinHandle<bool>> {
    let streams: Vec<(String, SseReader)> = stream::iter(ids.iter().cloned().enumerate())
        .map(|(i, id)| {
            let instance = on(i);
            async move { (id.clone(), instance.connected_stream(&id).await) }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    crate::support::sse::default_results(streams)
}

async fn all_arrived(readers: Vec<tokio::task::JoinHandle<bool>>) -> usize {
    let mut arrived = 0;
    for reader in readers {
        arrived += usize::from(reader.await.expect("reader task"));
    }
    arrived
}

async fn complete_all(on: &Instance, ids: &[String]) {
    let statuses: Vec<u16> = stream::iter(ids)
        .map(|id| async move { on.complete(id).await.status().as_u16() })
        .buffer_unordered(20)
        .collect()
        .await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and redis-server (cluster mode): run by scripts/test.sh"]
async fn streams_on_one_instance_get_results_completed_on_another_through_the_cluster() {
    let cluster = RedisCluster::start().await;
    let db = FreshDb::postgres().await;
    let one = start(&db, &cluster, &[]).await;
    let two = start(&db, &cluster, &[]).await;
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(one.job_id().await);
    }
    let readers = watch_all(&ids, |_| &two).await;
    complete_all(&one, &ids).await;
    assert_eq!(all_arrived(readers).await, ids.len());
    assert_eq!(
        two.metric("handoff_resync_deliveries_total").await,
        0.0,
        "every result came over the job's sharded channel"
    );
    assert_eq!(
        two.metric("handoff_fanout_messages_received_total").await,
        30.0
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and redis-server (cluster mode): run by scripts/test.sh"]
async fn six_hundred_streams_over_three_instances_arrive_and_the_instance_watching_none_hears_nothing()
 {
    const STREAMS: usize = 600;
    let limit = rlimit::increase_nofile_limit(8192).expect("getrlimit/setrlimit");
    assert!(limit >= 2048, "the open-file limit is {limit}");
    let cluster = RedisCluster::start().await;
    let db = FreshDb::postgres().await;
    let a = start(&db, &cluster, &[]).await;
    let b = start(&db, &cluster, &[]).await;
    let idle = start(&db, &cluster, &[]).await;
    let ids: Vec<String> = stream::iter(0..STREAMS)
        .map(|_| idle.job_id())
        .buffer_unordered(50)
        .collect()
        .await;
    let readers = watch_all(&ids, |i| if i % 2 == 0 { &a } else { &b }).await;
    // The instance that watches nothing completes every job: the news goes to the two others.
    complete_all(&idle, &ids).await;
    assert_eq!(all_arrived(readers).await, STREAMS, "every result arrives");
    for instance in [&a, &b] {
        assert_eq!(
            instance
                .metric("handoff_fanout_messages_received_total")
                .await,
            (STREAMS / 2) as f64,
            "{} hears the news of its own jobs only",
            instance.base
        );
    }
    assert_eq!(
        idle.metric("handoff_fanout_messages_received_total").await,
        0.0,
        "an instance watching nothing receives no message"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and redis-server (cluster mode): run by scripts/test.sh"]
async fn a_master_killed_and_its_replica_promoted_while_jobs_complete_loses_nothing() {
    let mut cluster = RedisCluster::start().await;
    let db = FreshDb::postgres().await;
    let resync = [("HANDOFF_RESYNC_SECS", "2")];
    let one = start(&db, &cluster, &resync).await;
    let two = start(&db, &cluster, &resync).await;
    let mut ids = Vec::new();
    for _ in 0..60 {
        ids.push(one.job_id().await);
    }
    let readers = watch_all(&ids, |_| &two).await;
    complete_all(&one, &ids[..20]).await;
    // Kill the master of a watched job's channel, and complete the rest while it fails over.
    let channel = format!("handoff:completions:{{{}}}", ids[30]);
    cluster.kill(cluster.master_of(&channel));
    complete_all(&one, &ids[20..40]).await;
    cluster.wait_ok().await;
    complete_all(&one, &ids[40..]).await;
    let arrived = all_arrived(readers).await;
    assert_eq!(
        arrived,
        ids.len(),
        "every result arrives, by message or by the resync; the watching instance logged:\n{}",
        two.log_text()
    );
}
