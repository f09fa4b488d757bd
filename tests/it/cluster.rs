//! Routed fan-out on a real Redis Cluster (sharded Pub/Sub): results cross instances, an
//! instance watching nothing hears nothing, a master's failover (a crash, or a planned one) loses
//! nothing, and afterwards results come over Pub/Sub again at once. (The scale-out
//! scenarios of `tests/it/scale_out.rs`, forged messages on a job's channel among them, run on a
//! cluster too.)

use std::time::Duration;

use futures_util::{StreamExt, stream};

use crate::support::redis_cluster::RedisCluster;
use crate::support::{FreshDb, Instance, SseReader, WAIT, eventually};

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
/// says whether its result is the job's, in the order of `ids`.
async fn watch_all<'a>(
    ids: &[String],
    on: impl Fn(usize) -> &'a Instance,
) -> Vec<tokio::task::JoinHandle<bool>> {
    let streams: Vec<(String, SseReader)> = stream::iter(ids.iter().cloned().enumerate())
        .map(|(i, id)| {
            let instance = on(i);
            async move { (id.clone(), instance.connected_stream(&id).await) }
        })
        .buffered(50)
        .collect()
        .await;
    crate::support::sse::default_results(streams)
}

/// `count` jobs created through `instance`, one after another.
async fn jobs_through(instance: &Instance, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(instance.job_id().await);
    }
    ids
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
    let ids = jobs_through(&one, 30).await;
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

/// The watching instance's channel of a job, on the cluster.
fn channel_of(id: &str) -> String {
    format!("handoff:completions:{{{id}}}")
}

/// No periodic resync within a test: a result that arrives came by message, or by the re-read
/// after a re-subscribe (counted in handoff_resync_deliveries_total).
const NO_PERIODIC_RESYNC: [(&str, &str); 1] = [("HANDOFF_RESYNC_SECS", "3600")];

/// After a failover: waits until `two` has subscribed again and re-read (its
/// handoff_redis_reconnects_total counts it), then completes `ids` through `one` and requires
/// every one of `readers` (theirs, in order) to get its result over Pub/Sub within [`WAIT`]:
/// counted as received, none by a re-read, and the periodic resync an hour away.
async fn results_come_over_pub_sub_again(
    one: &Instance,
    two: &Instance,
    ids: &[String],
    readers: Vec<tokio::task::JoinHandle<bool>>,
) {
    let resubscribed = eventually(Duration::from_secs(15), || async {
        two.metric("handoff_redis_reconnects_total").await >= 1.0
    });
    assert!(
        resubscribed.await,
        "the watching instance never subscribed again; it logged:\n{}",
        two.log_text()
    );
    two.wait_healthy().await;
    let received = two.metric("handoff_fanout_messages_received_total").await;
    let resynced = two.metric("handoff_resync_deliveries_total").await;
    complete_all(one, ids).await;
    let arrived = tokio::time::timeout(WAIT, all_arrived(readers)).await;
    assert_eq!(
        arrived,
        Ok(ids.len()),
        "every result within {WAIT:?} of its completion; the watching instance logged:\n{}",
        two.log_text()
    );
    assert_eq!(
        two.metric("handoff_resync_deliveries_total").await,
        resynced,
        "none of them by a re-read; the watching instance logged:\n{}",
        two.log_text()
    );
    // A channel may briefly be held on both the slot's old node and its new one: at least once.
    let heard = two.metric("handoff_fanout_messages_received_total").await - received;
    assert!(
        heard >= ids.len() as f64,
        "{heard} messages for {} results",
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and redis-server (cluster mode): run by scripts/test.sh"]
async fn a_master_killed_and_its_replica_promoted_while_jobs_complete_loses_nothing_and_pub_sub_resumes()
 {
    let mut cluster = RedisCluster::start().await;
    let db = FreshDb::postgres().await;
    let one = start(&db, &cluster, &NO_PERIODIC_RESYNC).await;
    let two = start(&db, &cluster, &NO_PERIODIC_RESYNC).await;
    let ids = jobs_through(&one, 60).await;
    let mut readers = watch_all(&ids, |_| &two).await;
    let after_failover = readers.split_off(40);
    complete_all(&one, &ids[..20]).await;
    // Kill the master of a channel watched here whose job completes after the failover, and
    // complete 20 jobs while the cluster fails over: messages on its slots are lost meanwhile,
    // and the re-read after subscribing again must find them.
    let master = cluster.master_of(&channel_of(&ids[50]));
    cluster.replica_of(master).await;
    cluster.kill(master);
    complete_all(&one, &ids[20..40]).await;
    cluster.wait_ok().await;
    let arrived = tokio::time::timeout(WAIT * 3, all_arrived(readers)).await;
    assert_eq!(
        arrived,
        Ok(40),
        "every result arrives, by message or by the re-read after subscribing again; the \
         watching instance logged:\n{}",
        two.log_text()
    );
    results_come_over_pub_sub_again(&one, &two, &ids[40..], after_failover).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and redis-server (cluster mode): run by scripts/test.sh"]
async fn after_a_planned_failover_results_on_the_moved_slots_still_come_over_pub_sub() {
    let cluster = RedisCluster::start().await;
    let db = FreshDb::postgres().await;
    let one = start(&db, &cluster, &NO_PERIODIC_RESYNC).await;
    let two = start(&db, &cluster, &NO_PERIODIC_RESYNC).await;
    let ids = jobs_through(&one, 30).await;
    let readers = watch_all(&ids, |_| &two).await;
    // The old master stays up as a replica and drops its subscribers' channels of the slots it
    // gave up (a `sunsubscribe` each), without a link dropping.
    let master = cluster.master_of(&channel_of(&ids[0]));
    let promoted = cluster.fail_over(master).await;
    assert_eq!(cluster.master_of(&channel_of(&ids[0])), promoted);
    results_come_over_pub_sub_again(&one, &two, &ids, readers).await;
}
