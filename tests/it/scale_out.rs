//! Several `handoff` processes sharing PostgreSQL and Redis: a completion through any instance
//! reaches the streams on every instance, a Redis outage delays results but loses none, and
//! instances starting together on one fresh database migrate it safely. Through the repository's
//! nginx.conf, a client whose instance dies reconnects to the other; in Chromium, page A on one
//! instance reaches page B when the job completes through the other; a completion, unlike a job
//! creation, is passed on when an instance dies after reading it. Messages on the channel that
//! no instance signed (published with `redis-cli`) move no browser.
//!
//! The scenarios that involve Redis (results crossing, cut links, an outage, a thousand streams,
//! the periodic resync, forged messages, progress and failure, expiry) run twice, as the tests
//! `single_redis` and `redis_cluster` of a module named after the scenario: on a `redis-server`
//! of their own and on a Redis Cluster of their own (sharded Pub/Sub), so killing, cutting or
//! restarting it disturbs nobody else. The others use the shared Redis at 127.0.0.1:6379 on a
//! channel of their own.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, stream};

use crate::support::backend::{Backend, Kind, dead_redis_url, instance_at};
use crate::support::browser::Browser;
use crate::support::instance::pair;
use crate::support::nginx::Nginx;
use crate::support::redis::{command as redis_command, fresh_channel, shared_redis};
use crate::support::{FreshDb, Instance, SseReader, WAIT, eventually};

/// Two tests of one scenario (an `async fn` taking the [`Kind`] of Redis), in a module named
/// after it: `single_redis` and `redis_cluster`, each on a Redis of its own.
macro_rules! on_both_backends {
    ($scenario:ident) => {
        mod $scenario {
            use crate::support::backend::Kind;

            #[tokio::test(flavor = "multi_thread")]
            #[ignore = "needs PostgreSQL and redis-server: run scripts/test.sh"]
            async fn single_redis() {
                super::$scenario(Kind::Single).await;
            }

            #[tokio::test(flavor = "multi_thread")]
            #[ignore = "needs PostgreSQL and redis-server (cluster mode): run scripts/test.sh"]
            async fn redis_cluster() {
                super::$scenario(Kind::Cluster).await;
            }
        }
    };
}

/// Jobs created through `one`, each with a connected stream, alternately on `one` and `two`.
async fn waiting_streams<'a>(
    count: usize,
    one: &'a Instance,
    two: &'a Instance,
) -> Vec<(String, &'a Instance, SseReader)> {
    let mut waiting = Vec::new();
    for i in 0..count {
        let id = one.job_id().await;
        let on = if i % 2 == 0 { one } else { two };
        let stream = on.connected_stream(&id).await;
        waiting.push((id, on, stream));
    }
    waiting
}

/// Reads each stream's result; panics naming the first that gets none within `within` overall.
async fn expect_results(waiting: &mut [(String, &Instance, SseReader)], within: Duration) {
    let all = async {
        for (id, on, stream) in waiting.iter_mut() {
            let result = stream.next_result(within).await.unwrap_or_else(|| {
                panic!("stream on {} for job {id} ended without a result", on.base)
            });
            assert_eq!(result["status"], "result");
            assert_eq!(result["moveUrl"], format!("/test.do?id={id}"));
        }
    };
    // Keep-alive comments would otherwise extend the wait stream by stream.
    if tokio::time::timeout(within, all).await.is_err() {
        panic!("not every result arrived within {within:?}");
    }
}

on_both_backends!(a_completion_through_either_instance_reaches_a_stream_on_the_other);
async fn a_completion_through_either_instance_reaches_a_stream_on_the_other(kind: Kind) {
    let redis = Backend::start(kind).await;
    let db = FreshDb::postgres().await;
    let (one, two) = redis.pair(&db, &[]).await;
    let (_, health) = one.health().await;
    assert!(health.starts_with("ok\n"), "{health}");
    assert!(
        health.contains("database: ok (postgres)") && health.contains("redis: ok"),
        "{health}"
    );

    for (waits, completes) in [(&one, &two), (&two, &one)] {
        let id = completes.job_id().await;
        let mut stream = waits.connected_stream(&id).await;
        assert_eq!(completes.complete(&id).await.status(), 200);
        let result = stream.next_result(WAIT).await.expect("a result event");
        assert_eq!(result["moveUrl"], format!("/test.do?id={id}"));
        assert_eq!(
            stream.next_block(WAIT).await,
            None,
            "the stream ends after the result"
        );
    }
    // The link never dropped, so both results came over Pub/Sub, not from a resync.
    for instance in [&one, &two] {
        assert_eq!(instance.metric("handoff_redis_reconnects_total").await, 0.0);
        assert_eq!(
            instance.metric("handoff_resync_deliveries_total").await,
            0.0
        );
        // And each was timed once, on the Redis path, from the other instance's commit.
        assert_eq!(
            instance
                .metric(r#"handoff_delivery_seconds_count{path="redis"}"#)
                .await,
            1.0
        );
        assert_eq!(
            instance
                .metric(r#"handoff_delivery_seconds_count{path="local"}"#)
                .await,
            0.0
        );
    }
}

on_both_backends!(killing_the_subscriber_links_loses_no_result);
async fn killing_the_subscriber_links_loses_no_result(kind: Kind) {
    let redis = Backend::start(kind).await;
    let db = FreshDb::postgres().await;
    let (one, two) = redis.pair(&db, &[]).await;
    let mut waiting = waiting_streams(20, &one, &two).await;

    let killed = redis.kill_subscriber_links().await;
    match kind {
        Kind::Single => assert_eq!(killed, 2, "one subscriber link per instance"),
        // A cluster connection subscribes through each node that serves a watched channel.
        Kind::Cluster => assert!(killed >= 2, "at least one link per instance, cut {killed}"),
    }
    for (id, _, _) in &waiting {
        assert_eq!(two.complete(id).await.status(), 200);
    }
    expect_results(&mut waiting, Duration::from_secs(15)).await;
    one.wait_resubscribed().await;
    two.wait_resubscribed().await;
}

on_both_backends!(completions_made_while_redis_is_down_arrive_after_it_restarts);
async fn completions_made_while_redis_is_down_arrive_after_it_restarts(kind: Kind) {
    let mut redis = Backend::start(kind).await;
    let db = FreshDb::postgres().await;
    let (one, two) = redis.pair(&db, &[]).await;
    let mut waiting = waiting_streams(20, &one, &two).await;

    redis.stop();
    let down = eventually(WAIT, || async {
        let (status, body) = one.health().await;
        status == 503 && body.starts_with("unavailable\n") && body.contains("redis: down")
    });
    assert!(
        down.await,
        "/healthz names Redis as down: {:?}",
        one.health().await
    );
    assert!(
        one.health().await.1.contains("database: ok"),
        "the database is still up"
    );

    let started = Instant::now();
    for (id, _, _) in &waiting {
        assert_eq!(
            two.complete(id).await.status(),
            200,
            "a completion succeeds while Redis is down"
        );
    }
    eprintln!(
        "20 completions with Redis down took {:?}",
        started.elapsed()
    );

    redis.restart().await;
    expect_results(&mut waiting, Duration::from_secs(20)).await;
    // Ten streams wait on `one`; Pub/Sub carried none of their results, the resync all of them.
    assert_eq!(one.metric("handoff_resync_deliveries_total").await, 10.0);
    one.wait_resubscribed().await;
    two.wait_resubscribed().await;
}

on_both_backends!(a_thousand_streams_over_two_instances_all_get_their_results);
async fn a_thousand_streams_over_two_instances_all_get_their_results(kind: Kind) {
    const STREAMS: usize = 1000;
    // This process holds 1,000 client sockets and each instance 500 more; the instances inherit
    // the raised limit.
    let limit = rlimit::increase_nofile_limit(8192).expect("getrlimit/setrlimit");
    assert!(
        limit >= 4096,
        "the open-file limit is {limit}; raise the hard limit (ulimit -Hn) to 4096 or more"
    );
    let redis = Backend::start(kind).await;
    let db = FreshDb::postgres().await;
    // Every stream comes from this one address: lift the per-client cap.
    let uncapped = [("HANDOFF_MAX_STREAMS_PER_CLIENT", "off")];
    let (one, two) = redis.pair(&db, &uncapped).await;

    let ids: Vec<String> = stream::iter(0..STREAMS)
        .map(|_| one.job_id())
        .buffer_unordered(50)
        .collect()
        .await;
    let opened = Instant::now();
    let streams: Vec<(String, SseReader)> = stream::iter(ids.into_iter().enumerate())
        .map(|(i, id)| {
            let on = if i % 2 == 0 { &one } else { &two };
            async move {
                let stream = on.connected_stream(&id).await;
                (id, stream)
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    eprintln!("{STREAMS} streams connected in {:?}", opened.elapsed());
    assert_eq!(
        one.metric("handoff_open_streams").await,
        (STREAMS / 2) as f64
    );
    assert_eq!(
        two.metric("handoff_open_streams").await,
        (STREAMS / 2) as f64
    );

    let ids: Vec<String> = streams.iter().map(|(id, _)| id.clone()).collect();
    let readers = crate::support::sse::default_results(streams);
    let completing = Instant::now();
    let statuses: Vec<u16> = stream::iter(&ids)
        .map(|id| async { two.complete(id).await.status().as_u16() })
        .buffer_unordered(50)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|&s| s == 200),
        "every completion answers 200"
    );
    let completed_after = completing.elapsed();
    let mut received = 0;
    for reader in readers {
        received += usize::from(reader.await.expect("reader task"));
    }
    eprintln!(
        "{STREAMS} completions through one instance took {completed_after:?}; \
         all results in after {:?}",
        completing.elapsed()
    );
    assert_eq!(
        received,
        STREAMS,
        "{} of {STREAMS} results lost",
        STREAMS - received
    );
    for instance in [&one, &two] {
        let drained = eventually(WAIT, || async {
            instance.metric("handoff_watched_jobs").await == 0.0
        });
        assert!(drained.await, "{} freed every job entry", instance.base);
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and Redis: run scripts/test.sh"]
async fn instances_starting_together_on_a_fresh_database_migrate_it_once() {
    let db = FreshDb::postgres().await;
    let channel = fresh_channel();
    let instances: Vec<Instance> = std::thread::scope(|scope| {
        let starting: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| Instance::in_fleet(&db, None, &channel, &[])))
            .collect();
        starting
            .into_iter()
            .map(|s| s.join().expect("an instance starts"))
            .collect()
    });
    for instance in &instances {
        let (status, body) = instance.health().await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("database: ok (postgres)"), "{body}");
    }
    let id = instances[0].job_id().await;
    assert_eq!(instances[3].complete(&id).await.status(), 200);
    let job = instances[1].job(&id).await;
    assert_eq!(job["status"], "complete");

    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("the migrations folder")
        .count() as i64;
    let pool = sqlx::PgPool::connect(db.url())
        .await
        .expect("the test database");
    let (applied,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .expect("the migrations table");
    assert_eq!(applied, migrations, "each migration applied exactly once");
    pool.close().await;
}

on_both_backends!(
    a_completion_whose_publish_failed_reaches_a_subscribed_instance_at_its_periodic_resync
);
async fn a_completion_whose_publish_failed_reaches_a_subscribed_instance_at_its_periodic_resync(
    kind: Kind,
) {
    let redis = Backend::start(kind).await;
    let db = FreshDb::postgres().await;
    let channel = fresh_channel();
    let one = redis.instance(&db, &channel, &[("HANDOFF_RESYNC_SECS", "1")]);
    // Nothing listens there: every publish from `two` fails (both tries), while `one` stays
    // subscribed to the live Redis and so has no re-subscribe that would resync.
    let two = instance_at(kind, &dead_redis_url(), &db, &channel, &[]);
    one.wait_healthy().await;

    let id = two.job_id().await;
    let mut stream = one.connected_stream(&id).await;
    assert_eq!(
        two.complete(&id).await.status(),
        200,
        "a failed publish does not fail the completion"
    );
    // Without the periodic resync this stream would hear only keep-alives until its 60 s
    // timeout; the bound is generous for a 1 s resync interval.
    let result = stream
        .next_result(Duration::from_secs(10))
        .await
        .expect("the result, on the same stream");
    assert_eq!(result["moveUrl"], format!("/test.do?id={id}"));
    assert_eq!(one.metric("handoff_resync_deliveries_total").await, 1.0);
    assert_eq!(
        one.metric("handoff_redis_reconnects_total").await,
        0.0,
        "the link never dropped: the periodic resync brought it"
    );
    assert_eq!(
        one.metric(r#"handoff_delivery_seconds_count{path="catchup"}"#)
            .await,
        1.0,
        "timed on the catch-up path"
    );
}

/// Publishes `message` on `channel` of the shared Redis with the `redis-cli` binary, as anyone
/// who reached that Redis could; returns how many subscribers received it.
fn publish_with_redis_cli(channel: &str, message: &str) -> u64 {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "PUBLISH", channel, message])
        .output()
        .unwrap_or_else(|e| panic!("cannot run redis-cli ({e}): run scripts/test.sh"));
    assert!(output.status.success(), "redis-cli: {output:?}");
    let answer = String::from_utf8_lossy(&output.stdout);
    answer
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("redis-cli answered {answer:?}"))
}

/// `payload` signed as Handoff signs its messages (`v1.<tag>.<payload>`), but with `key`.
fn signed_with(key: &[u8], channel: &str, payload: &str) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("any key length");
    mac.update(channel.as_bytes());
    mac.update(&[0]);
    mac.update(payload.as_bytes());
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("v1.{tag}.{payload}")
}

on_both_backends!(forged_messages_on_a_jobs_channel_move_no_browser_and_are_counted);
async fn forged_messages_on_a_jobs_channel_move_no_browser_and_are_counted(kind: Kind) {
    let redis = Backend::start(kind).await;
    let db = FreshDb::postgres().await;
    let channel = fresh_channel();
    let one = redis.instance(&db, &channel, &[]);
    let two = redis.instance(&db, &channel, &[]);
    one.wait_healthy().await;
    two.wait_healthy().await;
    let id = one.job_id().await;
    // A stream on each instance: both subscribe to the job's channel.
    let mut waiting = one.connected_stream(&id).await;
    let mut waiting_on_two = two.connected_stream(&id).await;
    let job_channel = format!("{channel}:{{{id}}}");

    let elsewhere = format!(r#"{{"id":"{id}","moveUrl":"/jobs/elsewhere"}}"#);
    let forged =
        format!(r#"{{"id":"{id}","kind":"complete","moveUrl":"/jobs/elsewhere","from":"forger"}}"#);
    for message in [
        elsewhere,
        signed_with(b"a key of another deployment", &job_channel, &forged),
    ] {
        assert_eq!(
            redis.publish(&job_channel, &message).await,
            2,
            "both instances are subscribed and got {message}"
        );
    }
    // Each subscriber handles messages in order: once both are counted, both are behind it.
    // (Asserted at the end, so that a build that acts on them fails on what a browser sees.)
    for instance in [&one, &two] {
        instance
            .metric_reaches("handoff_fanout_rejected_total", 2.0, WAIT)
            .await;
        let job = instance.job(&id).await;
        assert_eq!(job["status"], "pending", "{job}");
    }
    // A stream opened now is not answered from the hub: nothing there holds the forged ending.
    let mut joining = one.connected_stream(&id).await;

    assert_eq!(two.complete(&id).await.status(), 200);
    for stream in [&mut waiting, &mut waiting_on_two, &mut joining] {
        let result = stream.next_result(WAIT).await.expect("a result");
        assert_eq!(
            result["moveUrl"],
            format!("/test.do?id={id}"),
            "the first result is the real one: {result}"
        );
    }
    for instance in [&one, &two] {
        let rejected = instance.metric("handoff_fanout_rejected_total").await;
        assert_eq!(rejected, 2.0, "{} counts both forgeries", instance.base);
    }
    assert_eq!(
        one.metric("handoff_resync_deliveries_total").await,
        0.0,
        "the real completion came over Redis, signed"
    );
}

/// A fresh database and a channel of its own on the shared Redis, for instances that sign with a
/// fan-out key the test knows (so that it can sign as they do).
struct KeyedFleet {
    redis_url: &'static str,
    db: FreshDb,
    channel: String,
    key: &'static str,
}

impl KeyedFleet {
    async fn new(key: &'static str) -> Self {
        Self {
            redis_url: shared_redis().await,
            db: FreshDb::postgres().await,
            channel: fresh_channel(),
            key,
        }
    }

    /// A healthy instance of the fleet, with `more` settings.
    async fn instance(&self, more: &[(&str, &str)]) -> Instance {
        let mut settings = vec![("HANDOFF_FANOUT_KEY", self.key)];
        settings.extend_from_slice(more);
        let instance = Instance::in_fleet(&self.db, Some(self.redis_url), &self.channel, &settings);
        instance.wait_healthy().await;
        instance
    }
}

/// A message really published by an instance, captured on the job's channel and published again
/// later, does not turn a stream's progress back; a message signed with the fleet's key but sent
/// more than five minutes ago (a replay of a captured ending, say) moves no browser and is counted.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and Redis: run scripts/test.sh"]
async fn replayed_and_stale_signed_messages_neither_turn_progress_back_nor_move_a_browser() {
    let fleet = KeyedFleet::new("a-fanout-key-of-at-least-32-characters-for-replays").await;
    let (channel, key) = (&fleet.channel, fleet.key);
    let one = fleet.instance(&[]).await;
    let two = fleet.instance(&[]).await;
    let id = one.job_id().await;
    let mut waiting = two.connected_stream(&id).await;
    let job_channel = format!("{channel}:{{{id}}}");
    let client = redis::Client::open(fleet.redis_url).expect("a Redis URL");
    let mut eavesdropper = client.get_async_pubsub().await.expect("a subscriber");
    eavesdropper
        .subscribe(&job_channel)
        .await
        .expect("SUBSCRIBE");

    let mut report = async |percent: u32| {
        let body = serde_json::json!({ "percent": percent });
        let path = format!("/api/jobs/{id}/progress");
        assert_eq!(one.api_post(&path, Some(body)).await.status(), 200);
        let (event, data) = waiting.next_event(WAIT).await.expect("the report");
        assert_eq!(
            (event.as_str(), &data["percent"]),
            ("progress", &serde_json::json!(f64::from(percent)))
        );
    };
    report(40).await;
    let captured = first_message_on(&mut eavesdropper, WAIT)
        .await
        .expect("instance one's report on the job's channel");
    assert!(captured.contains(r#""percent":40"#), "{captured}");
    // A later millisecond for the newer report.
    tokio::time::sleep(Duration::from_millis(5)).await;
    report(60).await;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis();
    let six_minutes_ago = now - 6 * 60 * 1000;
    let stale = format!(
        r#"{{"id":"{id}","kind":"complete","moveUrl":"/jobs/stale","from":"replayer","routed":true,"sentAt":{six_minutes_ago}}}"#
    );
    for message in [captured, signed_with(key.as_bytes(), &job_channel, &stale)] {
        assert_eq!(
            publish_with_redis_cli(&job_channel, &message),
            2,
            "instance two and the eavesdropper got {message}"
        );
    }
    // Instance two's subscriber handles messages in order: once the stale one is counted, the
    // replay is behind it too. (Asserted at the end, so that a build that acts on the stale
    // message fails on what a browser sees.)
    let counted = two
        .metric_reaches("handoff_fanout_stale_total", 1.0, WAIT)
        .await;
    assert_eq!(
        two.metric("handoff_fanout_rejected_total").await,
        0.0,
        "both were signed"
    );
    let mut joining = two.connected_stream(&id).await;
    let (event, data) = joining.next_event(WAIT).await.expect("the latest report");
    assert_eq!(
        (event.as_str(), &data["percent"]),
        ("progress", &serde_json::json!(60.0)),
        "the hub kept the newer report: {data}"
    );

    assert_eq!(one.complete(&id).await.status(), 200);
    for stream in [&mut waiting, &mut joining] {
        let (event, data) = stream.next_event(WAIT).await.expect("the result");
        assert_eq!(event, "result", "no report after 60 %: {data}");
        assert_eq!(
            data["moveUrl"],
            format!("/test.do?id={id}"),
            "the real result, not the stale one: {data}"
        );
    }
    assert!(counted, "the stale message is counted");
    assert_eq!(two.metric("handoff_fanout_stale_total").await, 1.0);
}

/// Polls both instances' `/metrics` until exactly one holds the one open stream; returns its index.
async fn instance_holding_the_stream(instances: &[Instance; 2]) -> usize {
    let deadline = Instant::now() + WAIT;
    loop {
        let open = [
            instances[0].metric("handoff_open_streams").await,
            instances[1].metric("handoff_open_streams").await,
        ];
        if open == [1.0, 0.0] || open == [0.0, 1.0] {
            return usize::from(open[1] == 1.0);
        }
        assert!(
            Instant::now() < deadline,
            "the stream never opened on an instance: open streams {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL, Redis and nginx: run scripts/test.sh"]
async fn a_client_whose_instance_is_killed_reconnects_through_nginx_to_the_other_and_gets_the_result()
 {
    let redis_url = shared_redis().await;
    let db = FreshDb::postgres().await;
    let channel = fresh_channel();
    // A retry of 2 s leaves no doubt that the completion lands while the client waits.
    let retry = [("HANDOFF_SSE_RETRY_MS", "2000")];
    let mut instances = [
        Instance::in_fleet(&db, Some(redis_url), &channel, &retry),
        Instance::in_fleet(&db, Some(redis_url), &channel, &retry),
    ];
    for instance in &instances {
        instance.wait_healthy().await;
    }
    let nginx = Nginx::start(&[instances[0].port(), instances[1].port()]);
    let through_nginx = nginx.handoff();
    let id = through_nginx.job_id().await;

    let source = through_nginx.event_source(&id);
    let opened = source.opened();
    let waiting = tokio::spawn(source.result(Duration::from_secs(30)));
    let holder = instance_holding_the_stream(&instances).await;
    let survivor = 1 - holder;

    instances[holder].kill();
    let completion = through_nginx.complete(&id).await;
    assert_eq!(
        completion.status(),
        200,
        "nginx passes the completion to the live instance:\n{}",
        nginx.error_log()
    );
    let completed = Instant::now();
    let result = waiting
        .await
        .unwrap_or_else(|e| panic!("the client: {e}\nnginx:\n{}", nginx.error_log()));
    assert_eq!(result["moveUrl"], format!("/test.do?id={id}"));

    let opened = opened.lock().expect("opened log").clone();
    assert_eq!(opened.len(), 2, "one stream before the kill, one after");
    assert!(
        opened[1] > completed,
        "the job was completed while the client waited to reconnect"
    );
    let survivor = &instances[survivor];
    assert_eq!(
        survivor.metric("handoff_jobs_completed_total").await,
        1.0,
        "the completion went to the live instance"
    );
    let drained = eventually(WAIT, || async {
        survivor.metric("handoff_open_streams").await == 0.0
    });
    assert!(drained.await, "the second stream ended after its result");

    // Whether the reconnect and the completion tried the dead instance first is up to each nginx
    // worker's round robin: ask until nginx has met it, and every answer must still be a 200.
    let met_the_dead_one = eventually(WAIT, || async {
        let status = through_nginx.get("/healthz").await.status();
        assert_eq!(status, 200, "nginx hides the dead instance");
        nginx.error_log().contains("Connection refused")
    });
    assert!(
        met_the_dead_one.await,
        "nginx never tried the dead instance:\n{}",
        nginx.error_log()
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL, Redis and Chromium: run scripts/test.sh"]
async fn page_a_served_by_one_instance_reaches_page_b_when_the_job_completes_through_the_other() {
    let redis_url = shared_redis().await;
    let db = FreshDb::postgres().await;
    let (one, two) = pair(&db, redis_url, &[]).await;
    let browser = Browser::start().await;

    let id = one.job_id().await;
    browser.goto(&one.url(&format!("/jobs/{id}"))).await;
    browser.wait_for_state("connected").await;
    assert_eq!(one.metric("handoff_open_streams").await, 1.0);
    assert_eq!(two.complete(&id).await.status(), 200);

    let url = browser.wait_for_url(&format!("/test.do?id={id}")).await;
    assert!(url.starts_with(&one.base), "page B on instance 1: {url}");
    let text = browser.text().await;
    assert!(text.contains("Job complete"), "page B says so: {text}");
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    assert_eq!(
        one.metric("handoff_jobs_completed_total").await,
        0.0,
        "instance 1 only served the pages and the stream"
    );
}

/// The path the cross-instance latency is measured on (`handoff-bench --mode one-by-one`, see
/// BENCHMARKS.md), checked: for each of 200 jobs in turn, a stream waits on instance 1 and the
/// job is completed through instance 2.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and Redis: run scripts/test.sh"]
async fn each_of_200_jobs_completed_through_one_instance_reaches_its_stream_on_the_other_over_pub_sub()
 {
    const JOBS: usize = 200;
    let redis_url = shared_redis().await;
    let db = FreshDb::postgres().await;
    // No periodic resync during the run: on a slow machine one could deliver a result a moment
    // before its message does, and this checks the Pub/Sub path.
    let no_periodic_resync = [("HANDOFF_RESYNC_SECS", "3600")];
    let (one, two) = pair(&db, redis_url, &no_periodic_resync).await;
    for _ in 0..JOBS {
        let id = one.job_id().await;
        let mut stream = one.connected_stream(&id).await;
        let (completed, result) = tokio::join!(two.complete(&id), stream.next_result(WAIT));
        assert_eq!(completed.status(), 200);
        let result = result.expect("a result event");
        assert_eq!(result["moveUrl"], format!("/test.do?id={id}"));
    }
    assert_eq!(
        one.metric("handoff_resync_deliveries_total").await,
        0.0,
        "every result came over Pub/Sub"
    );
}

/// Stands in for an instance that crashes after it has read a request and before it answers,
/// a moment a real process cannot be killed at on cue: it accepts connections, reads the request
/// head, and closes without a word. Returns its port; it lives until the test process ends.
fn upstream_that_dies_after_reading_a_request() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("its address").port();
    std::thread::spawn(move || {
        for connection in listener.incoming() {
            let Ok(mut connection) = connection else {
                continue;
            };
            let mut head = Vec::new();
            let mut buf = [0; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match std::io::Read::read(&mut connection, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and nginx: run scripts/test.sh"]
async fn nginx_retries_a_completion_but_not_a_job_creation_that_an_instance_took_down_with_it() {
    let db = FreshDb::postgres().await;
    let live = Instance::in_fleet(&db, None, &fresh_channel(), &[]);
    let dying = upstream_that_dies_after_reading_a_request();
    let answered_after_dying = |nginx: &Nginx| {
        let log = nginx.error_log();
        log.contains("prematurely closed") || log.contains("reset by peer")
    };

    // Listed first, so each nginx worker's round robin tries it first.
    let nginx = Nginx::start(&[dying, live.port()]);
    let mut creations = Vec::new();
    for _ in 0..10 {
        let created = nginx.handoff().post_job(None).await;
        creations.push(created.status().as_u16());
    }
    assert!(
        creations.contains(&502) && answered_after_dying(&nginx),
        "a creation the dying instance read is not sent again (it could make a second job): \
         {creations:?}\n{}",
        nginx.error_log()
    );
    drop(nginx);

    let nginx = Nginx::start(&[dying, live.port()]);
    for _ in 0..10 {
        let id = live.job_id().await;
        let completed = nginx.handoff().complete(&id).await;
        assert_eq!(
            completed.status(),
            200,
            "a completion the dying instance read goes on to the live one:\n{}",
            nginx.error_log()
        );
    }
    assert!(
        answered_after_dying(&nginx),
        "the dying instance read a completion:\n{}",
        nginx.error_log()
    );
    assert_eq!(live.metric("handoff_jobs_completed_total").await, 10.0);
}

on_both_backends!(
    a_job_past_its_deadline_expires_once_across_two_instances_and_both_tell_their_tabs
);
async fn a_job_past_its_deadline_expires_once_across_two_instances_and_both_tell_their_tabs(
    kind: Kind,
) {
    let redis = Backend::start(kind).await;
    let db = FreshDb::postgres().await;
    let channel = fresh_channel();
    let one = redis.instance(&db, &channel, &[]);
    let two = redis.instance(&db, &channel, &[]);
    one.wait_healthy().await;
    two.wait_healthy().await;

    let id = one.job_with_deadline(2).await;
    let mut published = redis.listen(&format!("{channel}:{{{id}}}")).await;
    let mut on_one = one.connected_stream(&id).await;
    let mut on_two = two.connected_stream(&id).await;
    for stream in [&mut on_one, &mut on_two] {
        let result = stream.next_result(Duration::from_secs(6)).await.unwrap();
        assert_eq!(result["status"], "expired", "{result}");
    }

    // Both instances sweep; the conditional update gives the job to one, which publishes once.
    let mut expiries = 0;
    let quiet_for = Duration::from_secs(2);
    while let Some(payload) = published.next(quiet_for).await {
        if payload.contains(&id) && payload.contains("expired") {
            expiries += 1;
        }
    }
    assert_eq!(expiries, 1, "one expiry published");
    let stored: f64 = one.metric("handoff_jobs_expired_total").await
        + two.metric("handoff_jobs_expired_total").await;
    assert_eq!(stored, 1.0, "one instance expired it");
}

on_both_backends!(progress_and_a_failure_through_one_instance_reach_a_stream_on_the_other);
async fn progress_and_a_failure_through_one_instance_reach_a_stream_on_the_other(kind: Kind) {
    let redis = Backend::start(kind).await;
    let db = FreshDb::postgres().await;
    let (one, two) = redis.pair(&db, &[]).await;
    let id = one.job_id().await;
    let mut stream = two.connected_stream(&id).await;
    let api = |path: String, body: serde_json::Value| {
        let one = &one;
        async move { one.api_post(&path, Some(body)).await.status() }
    };
    let report = serde_json::json!({ "percent": 40, "message": "Rendering" });
    assert_eq!(api(format!("/api/jobs/{id}/progress"), report).await, 200);
    let (event, data) = stream.next_event(WAIT).await.unwrap();
    assert_eq!(
        (event.as_str(), &data["percent"]),
        ("progress", &serde_json::json!(40.0))
    );
    let why = serde_json::json!({ "message": "Out of paper" });
    assert_eq!(api(format!("/api/jobs/{id}/fail"), why).await, 200);
    let (event, data) = stream.next_event(WAIT).await.unwrap();
    assert_eq!(event, "result");
    assert_eq!(
        (data["status"].as_str(), data["message"].as_str()),
        (Some("failed"), Some("Out of paper"))
    );
    assert_eq!(
        two.metric("handoff_resync_deliveries_total").await,
        0.0,
        "it came over Redis"
    );
}

/// How many clients of the Redis at `url` are subscribed to `channel` (plain Pub/Sub).
async fn subscribers_of(url: &str, channel: &str) -> u64 {
    let counts: Vec<(String, u64)> = redis_command(url, &["PUBSUB", "NUMSUB", channel]).await;
    counts.first().map_or(0, |(_, count)| *count)
}

/// The first message on `channel` of the shared Redis within `within`, as a plain (RESP2)
/// subscriber such as an instance of a release before routing sees it; `None` if none came.
async fn first_message_on(pubsub: &mut redis::aio::PubSub, within: Duration) -> Option<String> {
    let mut messages = pubsub.on_message();
    let message = tokio::time::timeout(within, messages.next()).await.ok()??;
    Some(String::from_utf8_lossy(message.get_payload_bytes()).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and Redis: run by scripts/test.sh"]
async fn a_mixed_fleet_during_the_upgrade_to_routing_loses_nothing_either_way() {
    let fleet = KeyedFleet::new("a-fanout-key-of-at-least-32-characters-for-upgrades").await;
    let (redis_url, channel, key) = (fleet.redis_url, fleet.channel.clone(), fleet.key);
    // A routed instance with the default, `publish`: it also publishes on the single channel.
    let routed = fleet.instance(&[]).await;
    // An instance of the releases before routing listens on the single channel only.
    let client = redis::Client::open(redis_url).expect("a Redis URL");
    let mut old = client.get_async_pubsub().await.expect("a subscriber");
    old.subscribe(&channel).await.expect("SUBSCRIBE");

    // New to old: a completion here reaches the single channel, signed for it, in the format
    // the old release reads (its fields, plus `routed`, which it ignores).
    let id = routed.job_id().await;
    assert_eq!(routed.complete(&id).await.status(), 200);
    let heard = first_message_on(&mut old, WAIT)
        .await
        .expect("a message on the single channel");
    let payload = heard.splitn(3, '.').nth(2).expect("v1.<tag>.<payload>");
    assert_eq!(heard, signed_with(key.as_bytes(), &channel, payload));
    let message: serde_json::Value = serde_json::from_str(payload).expect("JSON");
    assert_eq!(message["id"], id.as_str());
    assert_eq!(message["kind"], "complete");
    assert_eq!(message["moveUrl"], format!("/test.do?id={id}"));

    // The default does not listen there: a stream-less new instance hears nothing of the old
    // ones, whose results reach its streams at the next resync. During the rolling upgrade,
    // `on` listens there too.
    assert_eq!(
        subscribers_of(redis_url, &channel).await,
        1,
        "only the old instance"
    );
    let listening = fleet
        .instance(&[("HANDOFF_FANOUT_LEGACY_CHANNEL", "on")])
        .await;
    assert_eq!(subscribers_of(redis_url, &channel).await, 2, "old and `on`");

    // Old to new: an old instance publishes only on the single channel; a stream on an instance
    // with `on` gets it at once (not at a resync).
    let id = listening.job_id().await;
    let mut stream = listening.connected_stream(&id).await;
    let old_format =
        format!(r#"{{"id":"{id}","kind":"complete","moveUrl":"/jobs/old","from":"old-instance"}}"#);
    publish_with_redis_cli(
        &channel,
        &signed_with(key.as_bytes(), &channel, &old_format),
    );
    let result = stream
        .next_result(WAIT)
        .await
        .expect("the old instance's result");
    assert_eq!(result["moveUrl"], "/jobs/old");
    assert_eq!(
        listening.metric("handoff_resync_deliveries_total").await,
        0.0
    );

    // Once the fleet is upgraded and the single channel is off, nothing goes there any more.
    let upgraded = fleet
        .instance(&[("HANDOFF_FANOUT_LEGACY_CHANNEL", "off")])
        .await;
    let id = upgraded.job_id().await;
    assert_eq!(upgraded.complete(&id).await.status(), 200);
    // (The old-format message published above is still queued for this subscriber.)
    while let Some(message) = first_message_on(&mut old, Duration::from_millis(500)).await {
        assert!(
            !message.contains(&id),
            "with HANDOFF_FANOUT_LEGACY_CHANNEL=off the single channel is quiet: {message}"
        );
    }
}

/// "Subscribe, then check" across instances, with routed channels: instance B's link to Redis
/// is slow (150 ms each way), so each job channel's subscription is confirmed some 300 ms after
/// B's stream asks for it. Completions through A land at every moment of that window. B's
/// streams read the store only once their channel's subscription is confirmed (or catch up on
/// the job when it is), so every result arrives; the resync, set to an hour, brings none.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs PostgreSQL and redis-server: run scripts/test.sh"]
async fn streams_behind_a_slow_redis_link_get_the_results_completed_elsewhere_while_they_subscribe()
{
    use crate::support::slow_link::SlowLink;

    let redis = shared_redis().await;
    let db = FreshDb::postgres().await;
    let channel = fresh_channel();
    let settings = [
        ("HANDOFF_RESYNC_SECS", "3600"),
        ("HANDOFF_FANOUT_LEGACY_CHANNEL", "off"),
    ];
    let a = Instance::in_fleet(&db, Some(redis), &channel, &settings);
    let upstream = redis
        .trim_start_matches("redis://")
        .parse()
        .expect("the shared Redis's address");
    let link = SlowLink::to(upstream, Duration::from_millis(150)).await;
    let slow_url = format!("redis://127.0.0.1:{}", link.port);
    let b = Instance::in_fleet(&db, Some(&slow_url), &channel, &settings);
    a.wait_healthy().await;
    b.wait_healthy().await;

    let rounds = 60;
    let mut ids = Vec::new();
    for _ in 0..rounds {
        ids.push(a.job_id().await);
    }
    let (a, b) = (&a, &b);
    let outcomes = stream::iter(ids.iter().enumerate())
        .map(|(i, id)| async move {
            // The completion goes 0 to 500 ms after the stream is asked for: before, during and
            // after its subscription.
            let complete = async {
                tokio::time::sleep(Duration::from_millis(50 * (i % 11) as u64)).await;
                a.complete(id).await.status()
            };
            let watch = async {
                let mut stream = b.stream(id).await;
                // The connect event says pending or, if the completion came first, the result.
                let result = async {
                    while let Some(event) = stream.next_result(Duration::from_secs(30)).await {
                        if event["status"] == "result" {
                            return event["moveUrl"] == format!("/test.do?id={id}");
                        }
                    }
                    false
                };
                // Well before the hour-long resync: counted as lost, not a panic.
                tokio::time::timeout(Duration::from_secs(15), result)
                    .await
                    .unwrap_or(false)
            };
            let (status, got) = tokio::join!(complete, watch);
            assert_eq!(status, 200);
            got
        })
        .buffer_unordered(rounds)
        .collect::<Vec<bool>>()
        .await;
    let lost = outcomes.iter().filter(|got| !**got).count();
    assert_eq!(lost, 0, "{lost} of {rounds} streams on B got no result");
}
