//! A rolling restart behind the shipped nginx.conf loses nothing: two instances on PostgreSQL and
//! Redis, a thousand waiting browsers (each from an address of its own, as nginx and Handoff
//! count clients), jobs completed through nginx at a steady rate, and each instance in turn
//! stopped with SIGTERM (it drains, then ends its streams), started again on its port and
//! waited for until `/readyz` says it is ready.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{StreamExt as _, stream};

use crate::support::instance::Instance;
use crate::support::nginx::Nginx;
use crate::support::redis::{fresh_channel, shared_redis};
use crate::support::{FreshDb, Handoff, Sse, TOKEN, WAIT, client_builder, eventually, result_of};

const CLIENTS: usize = 1000;
/// Completions a second, through nginx, from before the first restart to after the last.
const COMPLETIONS_PER_SEC: u64 = 40;
const DRAIN_SECS: &str = "2";
/// nginx.conf's `fail_timeout`: after a refused connection nginx leaves an instance alone this
/// long. The next instance may stop only once nginx sends to the restarted one again, or both
/// would count as failed at once and nginx would answer `502` ("no live upstreams").
const NGINX_FAIL_TIMEOUT: Duration = Duration::from_secs(5);

/// What one browser saw.
#[derive(Default)]
struct Seen {
    /// Streams answered `200`.
    opened: usize,
    /// Streams that ended cleanly (the end of a chunked body), so that it reconnected.
    ended: usize,
    /// Anything a browser would show as an error: a status other than `200`, a body cut
    /// mid-stream, an event stream it cannot parse, a request nginx could not pass on.
    errors: Vec<String>,
    /// When its result arrived.
    result_at: Option<Instant>,
}

/// An `EventSource` on `url` from the loopback address `from`: it honours `retry:`, reconnects
/// whenever its stream ends, and stops at the result (a `200` other than an event stream, or
/// any other status, is recorded and ends it, as a browser gives up then).
async fn browser(
    client: reqwest::Client,
    url: String,
    seen: Arc<Mutex<Seen>>,
    connected: Arc<AtomicUsize>,
) {
    let mut retry = Duration::from_secs(3);
    let mut first = true;
    loop {
        let response = match client
            .get(&url)
            .header("Accept", "text/event-stream")
            .send()
            .await
        {
            Ok(response) => response,
            Err(err) => {
                seen.lock()
                    .unwrap()
                    .errors
                    .push(format!("request: {err:?}"));
                return;
            }
        };
        if response.status() != 200 {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            seen.lock()
                .unwrap()
                .errors
                .push(format!("answered {status}: {body}"));
            return;
        }
        seen.lock().unwrap().opened += 1;
        let mut events = sse_stream::SseStream::from_bytes_stream(response.bytes_stream());
        loop {
            match events.next().await {
                Some(Ok(Sse {
                    retry: Some(ms), ..
                })) => retry = Duration::from_millis(ms),
                Some(Ok(event)) => {
                    let Some(data) = result_of(&event) else {
                        continue;
                    };
                    if data["status"] == "connect" && first {
                        first = false;
                        connected.fetch_add(1, Ordering::Relaxed);
                    } else if data["status"] == "result" {
                        seen.lock().unwrap().result_at = Some(Instant::now());
                        return;
                    }
                }
                None => {
                    seen.lock().unwrap().ended += 1;
                    break;
                }
                Some(Err(err)) => {
                    seen.lock().unwrap().errors.push(format!("stream: {err}"));
                    return;
                }
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// Client number `i`'s own loopback address: 127.0.1.1, 127.0.1.2, …, 127.0.4.250.
fn address(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 1 + (i / 250) as u8, 1 + (i % 250) as u8])
}

/// One instance of the fleet on `port` (0: any), drained for [`DRAIN_SECS`] on SIGTERM, behind
/// nginx as the README says.
fn start(db: &FreshDb, redis_url: &str, channel: &str, port: u16) -> Instance {
    let addr = format!("127.0.0.1:{port}");
    Instance::in_fleet(
        db,
        Some(redis_url),
        channel,
        &[
            ("HANDOFF_ADDR", &addr),
            ("HANDOFF_TRUSTED_PROXIES", "127.0.0.1"),
            ("HANDOFF_DRAIN_SECS", DRAIN_SECS),
            ("HANDOFF_WORKERS", "1"),
        ],
    )
}

async fn ready(instance: &Handoff) -> u16 {
    match instance.client.get(instance.url("/readyz")).send().await {
        Ok(answer) => answer.status().as_u16(),
        Err(_) => 0,
    }
}

/// SIGTERM, the drain (checked: not ready, still serving), the exit, a start on the same port,
/// and the wait until it is ready; returns the new instance.
async fn roll(
    old: &mut Instance,
    db: &FreshDb,
    redis_url: &str,
    channel: &str,
    name: &str,
) -> Instance {
    let port = old.port();
    let streams_before = old.metric("handoff_open_streams").await;
    let signalled = old.sigterm();
    let not_ready = eventually(Duration::from_millis(500), || async {
        ready(old).await == 503
    });
    assert!(
        not_ready.await,
        "{name}'s /readyz answers 503 once it drains"
    );
    // Draining: it still serves what it had and what comes.
    let (status, _) = old.health().await;
    assert_eq!(status, 200, "{name} still serves while it drains");
    let streams_draining = old.metric("handoff_open_streams").await;
    assert!(
        streams_draining > 0.0,
        "{name}'s streams stay open while it drains ({streams_before} before)"
    );
    let exit = old.exit_within(signalled, Duration::from_secs(15)).await;
    assert!(exit.success(), "{name} exits cleanly: {exit}");
    eprintln!(
        "{name}: {streams_draining} streams kept through the drain; exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    let new = start(db, redis_url, channel, port);
    let back = eventually(Duration::from_secs(15), || async {
        ready(&new).await == 200
    });
    assert!(back.await, "{name} is ready again after its restart");
    eprintln!(
        "{name}: ready again {:?} after SIGTERM",
        signalled.elapsed()
    );
    new
}

/// `to - from` in milliseconds, negative when `to` came first.
fn signed_ms(from: Instant, to: Instant) -> f64 {
    match to.checked_duration_since(from) {
        Some(after) => after.as_secs_f64() * 1e3,
        None => -(from.duration_since(to).as_secs_f64() * 1e3),
    }
}

/// "p50 A (B), p99 A (B), max A (B)" of two samples.
fn quantiles(a: &mut [f64], b: &mut [f64]) -> String {
    let mut parts = Vec::new();
    for v in [&mut *a, &mut *b] {
        v.sort_by(f64::total_cmp);
    }
    for (name, q) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        let at = |v: &[f64]| v[((v.len() - 1) as f64 * q) as usize];
        parts.push(format!("{name} {:.1} ({:.1})", at(a), at(b)));
    }
    parts.join(", ")
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx, PostgreSQL and Redis: run by scripts/test.sh"]
async fn a_rolling_restart_behind_nginx_loses_no_result_no_completion_and_shows_no_error() {
    // This process holds a socket per browser; nginx (which inherits the limit) two per browser.
    let limit = rlimit::increase_nofile_limit(8192).expect("getrlimit/setrlimit");
    assert!(
        limit >= 4096,
        "the open-file limit is {limit}; raise the hard limit (ulimit -Hn) to 4096 or more"
    );
    let test_started = Instant::now();
    let redis_url = shared_redis().await;
    let db = FreshDb::postgres().await;
    let channel = fresh_channel();
    let mut a = start(&db, redis_url, &channel, 0);
    let mut b = start(&db, redis_url, &channel, 0);
    a.wait_healthy().await;
    b.wait_healthy().await;
    let nginx = Nginx::start(&[a.port(), b.port()]);
    let site = nginx.handoff();

    let ids: Vec<String> = stream::iter(0..CLIENTS)
        .map(|_| site.job_id())
        .buffer_unordered(32)
        .collect()
        .await;
    // Built before the browsers start: a thousand builds (each sets up TLS) inside the browsers'
    // tasks kept the runtime from writing the requests on a loaded machine, and nginx closed the
    // silent connections (its client_header_timeout is 10 s) before any stream opened.
    let clients: Vec<reqwest::Client> = (0..CLIENTS)
        .map(|i| {
            client_builder()
                .local_address(address(i))
                .build()
                .expect("a client")
        })
        .collect();
    let connected = Arc::new(AtomicUsize::new(0));
    let seen: Vec<Arc<Mutex<Seen>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let browsers: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            tokio::spawn(browser(
                clients[i].clone(),
                nginx.plain_url(&format!("/sse/connect/{id}")),
                Arc::clone(&seen[i]),
                Arc::clone(&connected),
            ))
        })
        .collect();
    let all_connected = eventually(Duration::from_secs(20), || async {
        connected.load(Ordering::Relaxed) == CLIENTS
    });
    if !all_connected.await {
        let errors: Vec<String> = seen
            .iter()
            .flat_map(|seen| seen.lock().unwrap().errors.clone())
            .take(3)
            .collect();
        panic!(
            "{} of {CLIENTS} browsers connected ({} opened); first errors: {errors:?}; nginx's log: {}",
            connected.load(Ordering::Relaxed),
            seen.iter()
                .map(|seen| seen.lock().unwrap().opened)
                .sum::<usize>(),
            nginx
                .error_log()
                .lines()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let (on_a, on_b) = (
        a.metric("handoff_open_streams").await,
        b.metric("handoff_open_streams").await,
    );
    eprintln!("{CLIENTS} browsers waiting: {on_a} on A, {on_b} on B");

    // The job runner: one completion every 1/COMPLETIONS_PER_SEC s through nginx, each answer
    // and when it came recorded.
    let completer = {
        let site = nginx.handoff();
        let ids = ids.clone();
        tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval(Duration::from_millis(1000 / COMPLETIONS_PER_SEC));
            let mut calls = Vec::new();
            for id in ids {
                ticks.tick().await;
                let site = site.clone();
                calls.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let answer = site
                        .client
                        .post(site.url(&format!("/api/jobs/{id}/complete")))
                        .bearer_auth(TOKEN)
                        .send()
                        .await;
                    let answered = Instant::now();
                    match answer {
                        Ok(answer) if answer.status() == 200 => Ok((sent, answered)),
                        Ok(answer) => {
                            let status = answer.status();
                            Err(format!(
                                "{status}: {}",
                                answer.text().await.unwrap_or_default()
                            ))
                        }
                        Err(err) => Err(err.to_string()),
                    }
                }));
            }
            let mut answers = Vec::new();
            for call in calls {
                answers.push(call.await.expect("the completion task"));
            }
            answers
        })
    };

    tokio::time::sleep(Duration::from_secs(1)).await;
    let rolled = Instant::now();
    a = roll(&mut a, &db, redis_url, &channel, "A").await;
    // nginx marked A failed while it was down; B may go only when nginx sends to A again.
    tokio::time::sleep(NGINX_FAIL_TIMEOUT + Duration::from_secs(1)).await;
    b = roll(&mut b, &db, redis_url, &channel, "B").await;
    let roll_took = rolled.elapsed();

    let answers = completer.await.expect("the completer");
    let failed: Vec<&String> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "completions failed through nginx: {failed:?}"
    );
    for browser in browsers {
        tokio::time::timeout(Duration::from_secs(15), browser)
            .await
            .expect("every browser gets its result within 15 s of the last completion")
            .expect("the browser task");
    }
    // Milliseconds from the completion's answer (and from its request) to the result event;
    // the instance publishes before it answers, so an event may beat the answer (below 0).
    let (mut from_answer, mut from_request) = (Vec::new(), Vec::new());
    let (mut from_answer_in_roll, mut from_request_in_roll) = (Vec::new(), Vec::new());
    let (mut reconnects, mut errors) = (0, Vec::new());
    for (i, seen) in seen.iter().enumerate() {
        let seen = seen.lock().unwrap();
        errors.extend(seen.errors.iter().map(|e| format!("browser {i}: {e}")));
        reconnects += seen.opened - 1;
        let (sent, answered) = *answers[i].as_ref().expect("checked above");
        let arrived = seen
            .result_at
            .unwrap_or_else(|| panic!("browser {i} got no result ({} streams)", seen.opened));
        assert_eq!(
            seen.ended,
            seen.opened - 1,
            "browser {i}: every stream but the last ended"
        );
        let after_answer = signed_ms(answered, arrived);
        let after_request = signed_ms(sent, arrived);
        from_answer.push(after_answer);
        from_request.push(after_request);
        if answered >= rolled && answered <= rolled + roll_took {
            from_answer_in_roll.push(after_answer);
            from_request_in_roll.push(after_request);
        }
    }
    assert!(errors.is_empty(), "browsers saw errors: {errors:?}");
    assert!(
        reconnects >= CLIENTS / 2,
        "the roll moved the browsers: {reconnects} reconnects"
    );
    eprintln!(
        "rolling restart of 2 instances behind nginx in {roll_took:?}: {CLIENTS} browsers, \
         {reconnects} reconnects, {} completions at {COMPLETIONS_PER_SEC}/s all 200, no \
         browser error; result event after the completion's answer (after its request), in ms: \
         all {}; the {} answered during the roll {}; test took {:?}",
        answers.len(),
        quantiles(&mut from_answer, &mut from_request),
        from_answer_in_roll.len(),
        quantiles(&mut from_answer_in_roll, &mut from_request_in_roll),
        test_started.elapsed()
    );
    drop((a, b));
}

#[tokio::test]
async fn a_draining_instance_is_not_ready_serves_new_streams_and_completions_and_a_second_signal_stops_it()
 {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/handoff.db", dir.path().display());
    let mut instance = Instance::start(
        dir.path(),
        &[("DATABASE_URL", &db), ("HANDOFF_DRAIN_SECS", "60")],
    );
    assert_eq!(ready(&instance).await, 200);
    let waiting = instance.job_id().await;
    let mut open = instance.connected_stream(&waiting).await;
    let signalled = instance.sigterm();
    let not_ready = eventually(Duration::from_secs(2), || async {
        ready(&instance).await == 503
    });
    assert!(
        not_ready.await,
        "/readyz answers 503 once the instance drains"
    );
    let body = instance.get("/readyz").await.text().await.unwrap();
    assert!(body.contains("draining"), "{body}");
    // Everything else goes on: a new job, a new stream, completions reaching both streams.
    let fresh = instance.job_id().await;
    let mut new = instance.connected_stream(&fresh).await;
    for (id, stream) in [(&waiting, &mut open), (&fresh, &mut new)] {
        assert_eq!(instance.complete(id).await.status(), 200);
        assert_eq!(stream.next_result(WAIT).await.unwrap()["status"], "result");
    }
    assert!(
        instance.child.try_wait().unwrap().is_none(),
        "still running, 60 s drain"
    );
    // A second signal ends the drain at once.
    instance.sigterm();
    let exit = instance
        .exit_within(signalled, Duration::from_secs(10))
        .await;
    assert!(exit.success(), "{exit}");
    assert!(
        instance
            .log_text()
            .contains("draining: /readyz answers 503"),
        "{}",
        instance.log_text()
    );
}
