//! End to end in headless Chromium: page A → SSE → page B, directly and through the repository's
//! nginx.conf over HTTP/1.1 and HTTP/2 (TLS), stream rotation, restarts, the polling fallback,
//! unknown jobs, the admin page, a result address that would leave the site, and screenshots
//! under `target/screenshots/`.
//!
//! Needs `chromium`, `chromium-driver` and `nginx` (scripts/test.sh installs them); a test fails
//! saying what to install when one is missing.

use std::time::Duration;

use fantoccini::wd::WindowHandle;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::support::browser::{Browser, PATIENCE};
use crate::support::nginx::Nginx;
use crate::support::{TOKEN, TestApp, eventually};

/// The landing page's button for a job that waits to be completed by hand.
const MANUAL_JOB_BUTTON: &str = "form[action='/jobs']:has(input[value='manual']) button";

/// From the landing page at `origin`: start a job that waits, wait on page A, complete it through
/// the API, arrive on page B. Returns the job id.
async fn demo_flow(browser: &Browser, app: &TestApp, origin: &str) -> String {
    browser.goto(&format!("{origin}/")).await;
    browser.click(MANUAL_JOB_BUTTON).await;
    let id = browser.job_id().await;
    browser.wait_for_state("connected").await;
    assert_eq!(app.complete(&id).await.status(), 200);
    let url = browser.wait_for_url(&format!("/test.do?id={id}")).await;
    assert!(url.starts_with(origin), "page B stays on {origin}: {url}");
    let text = browser.text().await;
    assert!(text.contains("Job complete"), "page B says so: {text}");
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    id
}

#[tokio::test(flavor = "multi_thread")]
async fn a_demo_job_started_on_the_landing_page_reaches_page_b_when_completed() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    demo_flow(&browser, &app, &app.base).await;
    assert_eq!(browser.protocol().await, "http/1.1");
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_passes_health_checks_on_but_not_metrics() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(&[app.port]);
    let get = |url: String| {
        let client = app.client.clone();
        async move { client.get(url).send().await.expect("an answer") }
    };
    let direct = get(app.url("/metrics")).await;
    assert_eq!(direct.status(), 200, "the instance itself serves /metrics");
    assert!(
        direct
            .text()
            .await
            .unwrap()
            .contains("handoff_open_streams")
    );
    let proxied = get(nginx.plain_url("/metrics")).await;
    assert_eq!(
        proxied.status(),
        404,
        "nginx keeps one instance's metrics to itself"
    );
    assert!(!proxied.text().await.unwrap().contains("handoff_"));
    let health = get(nginx.plain_url("/healthz")).await;
    assert_eq!(health.status(), 200);
    assert!(health.text().await.unwrap().starts_with("ok\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_flow_works_through_nginx_over_http1_and_over_http2_with_tls() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(&[app.port]);
    let browser = Browser::start().await;

    demo_flow(&browser, &app, &nginx.plain_url("")).await;
    assert_eq!(browser.protocol().await, "http/1.1");

    demo_flow(&browser, &app, &nginx.https_url("")).await;
    assert_eq!(
        browser.protocol().await,
        "h2",
        "nginx serves TLS with HTTP/2"
    );
    let log = nginx.error_log();
    assert!(!log.contains("[error]"), "nginx logged errors:\n{log}");
}

/// A tab and the job its page A waits for.
type Tab = (WindowHandle, String);

/// Creates a job and opens its page A at `origin`, in the current tab or a new one. With
/// [`Browser::start_without_waiting_for_loads`] it does not wait for the page (with HTTP/1.1 some
/// pages cannot load yet).
async fn open_page_a(browser: &Browser, app: &TestApp, origin: &str, new_tab: bool) -> Tab {
    open_prepared_page_a(browser, app, origin, new_tab, async |_| {}).await
}

/// [`open_page_a`], with `prepare` run in the tab before the page loads.
async fn open_prepared_page_a(
    browser: &Browser,
    app: &TestApp,
    origin: &str,
    new_tab: bool,
    prepare: impl AsyncFn(&Browser),
) -> Tab {
    let id = app.job_id().await;
    let tab = if new_tab {
        browser.new_tab().await
    } else {
        browser.client.window().await.expect("the current tab")
    };
    prepare(browser).await;
    browser.goto(&format!("{origin}/jobs/{id}")).await;
    (tab, id)
}

/// Page A in `count` tabs (the current one and new ones).
async fn open_tabs(browser: &Browser, app: &TestApp, origin: &str, count: usize) -> Vec<Tab> {
    open_prepared_tabs(browser, app, origin, count, async |_| {}).await
}

/// [`open_tabs`], with `prepare` run in each tab before its page loads.
async fn open_prepared_tabs(
    browser: &Browser,
    app: &TestApp,
    origin: &str,
    count: usize,
    prepare: impl AsyncFn(&Browser),
) -> Vec<Tab> {
    let mut tabs = Vec::new();
    for i in 0..count {
        tabs.push(open_prepared_page_a(browser, app, origin, i > 0, &prepare).await);
    }
    tabs
}

async fn complete_and_expect_page_b(browser: &Browser, app: &TestApp, tabs: &[Tab]) {
    for (_, id) in tabs {
        assert_eq!(app.complete(id).await.status(), 200);
    }
    for (tab, id) in tabs {
        browser.switch_to(tab).await;
        browser.wait_for_url(&format!("/test.do?id={id}")).await;
    }
}

/// Waits until every tab's page A is connected.
async fn all_connected(browser: &Browser, tabs: &[Tab]) {
    for (tab, _) in tabs {
        browser.switch_to(tab).await;
        browser.wait_for_state("connected").await;
    }
}

/// For `secs` seconds the app never has more than `max` streams open.
async fn streams_stay_at_most(app: &TestApp, max: f64, secs: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        let open = app.metric("handoff_open_streams").await;
        assert!(open <= max, "{open} streams open, expected at most {max}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tab whose page A leads, holding the shared stream.
async fn leader(browser: &Browser, tabs: &[Tab]) -> usize {
    let script =
        "return document.querySelector('[data-handoff-job]').getAttribute('data-handoff-leader');";
    let mut leaders = Vec::new();
    for (i, (tab, _)) in tabs.iter().enumerate() {
        browser.switch_to(tab).await;
        if browser.js_string(script).await.as_deref() == Some("yes") {
            leaders.push(i);
        }
    }
    assert_eq!(leaders.len(), 1, "one leader among the tabs: {leaders:?}");
    leaders[0]
}

/// Completes the tabs' jobs in a shuffled order; each tab must reach its page B.
async fn complete_in_random_order(browser: &Browser, app: &TestApp, tabs: &[Tab]) {
    let mut order: Vec<usize> = (0..tabs.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rand::random_range(0..=i));
    }
    for i in order {
        let (tab, id) = &tabs[i];
        assert_eq!(app.complete(id).await.status(), 200);
        browser.switch_to(tab).await;
        browser.wait_for_url(&format!("/test.do?id={id}")).await;
    }
}

/// Twelve tabs on twelve jobs at `origin`: all load, share one stream (two during a handover),
/// and each reaches page B as its job completes, in any order.
async fn twelve_tabs_share_one_stream(app: &TestApp, browser: &Browser, origin: &str) -> Vec<Tab> {
    let tabs = open_tabs(browser, app, origin, 12).await;
    all_connected(browser, &tabs).await;
    assert!(
        app.metric_reaches("handoff_watched_jobs", 12.0, PATIENCE)
            .await,
        "the shared stream watches every tab's job"
    );
    streams_stay_at_most(app, 2.0, 2).await;
    assert!(
        app.metric_reaches("handoff_open_streams", 1.0, PATIENCE)
            .await
    );
    complete_in_random_order(browser, app, &tabs).await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    tabs
}

/// Over HTTP/1.1 a browser opens at most six connections per host; with one stream per browser
/// the seventh tab and beyond load as the first did.
#[tokio::test(flavor = "multi_thread")]
async fn twelve_tabs_over_http1_all_load_share_one_stream_and_reach_page_b_in_any_order() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(&[app.port]);
    let browser = Browser::start_without_waiting_for_loads().await;
    twelve_tabs_share_one_stream(&app, &browser, &nginx.plain_url("")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twelve_tabs_over_http2_share_one_stream_and_reach_page_b_in_any_order() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(&[app.port]);
    let browser = Browser::start_without_waiting_for_loads().await;
    let tabs = open_tabs(&browser, &app, &nginx.https_url(""), 1).await;
    assert_eq!(browser.protocol().await, "h2");
    drop(tabs);
    twelve_tabs_share_one_stream(&app, &browser, &nginx.https_url("")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_completed_while_its_leader_tab_closes_still_reaches_its_tab() {
    let app = TestApp::spawn().await;
    let browser = Browser::start_without_waiting_for_loads().await;
    let tabs = open_tabs(&browser, &app, &app.base, 3).await;
    all_connected(&browser, &tabs).await;
    let lead = leader(&browser, &tabs).await;
    let others: Vec<Tab> = tabs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != lead)
        .map(|(_, tab)| tab.clone())
        .collect();
    browser.switch_to(&tabs[lead].0).await;
    browser
        .client
        .close_window()
        .await
        .expect("closing the leader's tab");
    // Between the close and the takeover: no stream is there to carry this completion.
    assert_eq!(app.complete(&others[0].1).await.status(), 200);
    browser.switch_to(&others[0].0).await;
    browser
        .wait_for_url(&format!("/test.do?id={}", others[0].1))
        .await;
    complete_in_random_order(&browser, &app, &others[1..]).await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tab_opened_while_others_wait_joins_the_shared_stream_and_reaches_page_b() {
    let app = TestApp::spawn().await;
    let browser = Browser::start_without_waiting_for_loads().await;
    let mut tabs = open_tabs(&browser, &app, &app.base, 2).await;
    all_connected(&browser, &tabs).await;
    tabs.push(open_page_a(&browser, &app, &app.base, true).await);
    browser.wait_for_state("connected").await;
    assert!(
        app.metric_reaches("handoff_watched_jobs", 3.0, PATIENCE)
            .await
    );
    assert!(
        app.metric_reaches("handoff_open_streams", 1.0, PATIENCE)
            .await
    );
    complete_in_random_order(&browser, &app, &tabs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tab_whose_job_vanished_says_so_while_the_others_keep_waiting() {
    let app = TestApp::spawn().await;
    let browser = Browser::start_without_waiting_for_loads().await;
    let mut tabs = open_tabs(&browser, &app, &app.base, 2).await;
    all_connected(&browser, &tabs).await;
    // The job is gone from the store (as after its retention); a new tab makes the leader
    // reopen its stream, which reads every job again.
    let gone = tabs[0].1.clone();
    let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&app.database_url)
        .await
        .expect("the test's SQLite file");
    sqlx::query("DELETE FROM jobs WHERE id = $1")
        .bind(&gone)
        .execute(&mut db)
        .await
        .expect("deleting the job");
    tabs.push(open_page_a(&browser, &app, &app.base, true).await);
    browser.switch_to(&tabs[0].0).await;
    browser.wait_for_state("unknown").await;
    for (tab, _) in &tabs[1..] {
        browser.switch_to(tab).await;
        browser.wait_for_state("connected").await;
    }
    complete_in_random_order(&browser, &app, &tabs[1..]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_sharing_apis_each_tab_has_its_own_stream_and_all_arrive() {
    let app = TestApp::spawn().await;
    let browser = Browser::start_without_waiting_for_loads().await;
    let without_sharing = async |browser: &Browser| browser.remove_sharing_from_new_pages().await;
    let tabs = open_prepared_tabs(&browser, &app, &app.base, 3, without_sharing).await;
    for (tab, _) in &tabs {
        browser.switch_to(tab).await;
        assert_eq!(
            browser.js("return typeof window.BroadcastChannel;").await,
            json!("undefined")
        );
    }
    all_connected(&browser, &tabs).await;
    assert!(
        app.metric_reaches("handoff_open_streams", 3.0, PATIENCE)
            .await,
        "one stream per tab"
    );
    complete_in_random_order(&browser, &app, &tabs).await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

/// `handoff.js` splits the shared stream by the limit page A states, not by a number of its own:
/// told two jobs a stream, the leader of three tabs holds two streams, and every tab arrives.
#[tokio::test(flavor = "multi_thread")]
async fn the_leader_splits_its_stream_by_the_limit_page_a_renders() {
    let app = TestApp::spawn().await;
    let browser = Browser::start_without_waiting_for_loads().await;
    let two_a_stream = async |browser: &Browser| browser.limit_watched_jobs_on_new_pages(2).await;
    let tabs = open_prepared_tabs(&browser, &app, &app.base, 3, two_a_stream).await;
    all_connected(&browser, &tabs).await;
    let limit = "return document.querySelector('[data-handoff-job]').dataset.handoffMaxWatched;";
    assert_eq!(browser.js(limit).await, json!("2"));
    assert!(
        app.metric_reaches("handoff_watched_jobs", 3.0, PATIENCE)
            .await
    );
    assert!(
        app.metric_reaches("handoff_open_streams", 2.0, PATIENCE)
            .await,
        "two jobs on one stream, the third on another"
    );
    streams_stay_at_most(&app, 2.0, 1).await;
    complete_in_random_order(&browser, &app, &tabs).await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

/// Web Locks exist only in secure contexts; on a plain-HTTP origin that is not localhost the tabs
/// elect their leader with heartbeats over the BroadcastChannel instead.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_plain_http_origin_without_web_locks_tabs_still_share_one_stream() {
    let app = TestApp::spawn().await;
    let browser = Browser::start_without_waiting_for_loads().await;
    let origin = format!("http://handoff.test:{}", app.port);
    let tabs = open_tabs(&browser, &app, &origin, 4).await;
    all_connected(&browser, &tabs).await;
    assert_eq!(
        browser.js("return window.isSecureContext;").await,
        json!(false)
    );
    assert_eq!(
        browser.js("return typeof navigator.locks;").await,
        json!("undefined")
    );
    assert!(
        app.metric_reaches("handoff_watched_jobs", 4.0, PATIENCE)
            .await
    );
    streams_stay_at_most(&app, 2.0, 2).await;
    assert!(
        app.metric_reaches("handoff_open_streams", 1.0, PATIENCE)
            .await
    );

    // The leader's tab goes; another takes over and a job completed meanwhile still arrives.
    let lead = leader(&browser, &tabs).await;
    browser.switch_to(&tabs[lead].0).await;
    browser
        .client
        .close_window()
        .await
        .expect("closing the leader's tab");
    let rest: Vec<Tab> = tabs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != lead)
        .map(|(_, tab)| tab.clone())
        .collect();
    complete_in_random_order(&browser, &app, &rest).await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

/// The protocol of each event stream the current page has finished, as the browser's Resource
/// Timing records them (Chromium adds an EventSource's entry when its stream ends).
async fn stream_protocols(browser: &Browser) -> Vec<String> {
    let script = "return performance.getEntriesByType('resource')\
                  .filter(e => e.name.includes('/sse/')).map(e => e.nextHopProtocol);";
    serde_json::from_value(browser.js(script).await).expect("a list of protocols")
}

async fn streams_ended(browser: &Browser) -> u64 {
    stream_protocols(browser).await.len() as u64
}

/// Waits on page A until `rotations` of its streams have ended (the app then sees the reconnect).
async fn wait_for_rotations(browser: &Browser, rotations: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ended = streams_ended(browser).await;
        if ended >= rotations {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {ended} of {rotations} streams ended within 30 s (state {:?})",
            browser.state().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A new job's page A, straight from the app, once its stream is connected. Returns the job id.
async fn connected_page_a(browser: &Browser, app: &TestApp) -> String {
    let id = app.job_id().await;
    browser.goto(&app.url(&format!("/jobs/{id}"))).await;
    browser.wait_for_state("connected").await;
    id
}

/// Where `app` listens, so a successor can take over its port.
fn addr_of(app: &TestApp) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], app.port))
}

fn short_streams(config: &mut handoff::config::Config) {
    config.sse_timeout = Duration::from_secs(3);
}

#[tokio::test(flavor = "multi_thread")]
async fn page_a_rotates_its_stream_three_times_without_a_console_error_then_reaches_page_b() {
    let app = TestApp::spawn_with(short_streams).await;
    let browser = Browser::start().await;
    let id = connected_page_a(&browser, &app).await;

    wait_for_rotations(&browser, 3).await;
    let reconnected = eventually(PATIENCE, || async {
        app.metric("handoff_events_sent_total").await >= 4.0
    })
    .await;
    assert!(
        reconnected,
        "a connect event for the first stream and each of three reconnects"
    );
    assert!(
        browser.url().await.ends_with(&format!("/jobs/{id}")),
        "still on page A"
    );
    assert_eq!(browser.console_errors().await, Vec::<String>::new());

    assert_eq!(app.complete(&id).await.status(), 200);
    browser.wait_for_url(&format!("/test.do?id={id}")).await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_through_nginx_is_silent_over_http1_and_http2() {
    let app = TestApp::spawn_with(short_streams).await;
    let nginx = Nginx::start(&[app.port]);
    let browser = Browser::start().await;
    let tabs = [
        open_page_a(&browser, &app, &nginx.plain_url(""), false).await,
        open_page_a(&browser, &app, &nginx.https_url(""), true).await,
    ];
    for ((tab, _), protocol) in tabs.iter().zip(["http/1.1", "h2"]) {
        browser.switch_to(tab).await;
        wait_for_rotations(&browser, 3).await;
        let protocols = stream_protocols(&browser).await;
        assert!(protocols.iter().all(|p| p == protocol), "{protocols:?}");
    }
    let reconnected = eventually(PATIENCE, || async {
        app.metric("handoff_events_sent_total").await >= 8.0
    })
    .await;
    assert!(reconnected, "each tab: a first stream and three reconnects");
    browser.wait_for_state("connected").await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
    complete_and_expect_page_b(&browser, &app, &tabs).await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_completed_while_the_tab_was_away_is_delivered_when_it_reconnects() {
    let mut app = TestApp::spawn().await;
    let browser = Browser::start().await;
    let id = connected_page_a(&browser, &app).await;

    // The app goes away; the tab notices and keeps trying.
    let addr = addr_of(&app);
    let _dir = app.stop().await;
    browser.wait_for_state("reconnecting").await;

    // Meanwhile the job completes (through another instance on the same database).
    let mut other = TestApp::spawn_on(&app.database_url, |_| {}).await;
    assert_eq!(other.complete(&id).await.status(), 200);
    other.stop().await;
    assert!(
        browser.url().await.contains("/jobs/"),
        "nothing reached the tab yet"
    );

    // The app comes back on its port; the tab reconnects and gets the result at once.
    let _back = TestApp::spawn_on(&app.database_url, |config| config.addr = addr).await;
    browser.wait_for_url(&format!("/test.do?id={id}")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_event_source_page_a_polls_the_api_and_still_reaches_page_b() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    browser.remove_event_source_from_new_pages().await;
    let id = app.job_id().await;
    browser.goto(&app.url(&format!("/jobs/{id}"))).await;
    assert_eq!(
        browser.js("return typeof window.EventSource;").await,
        json!("undefined")
    );
    browser.wait_for_state("polling").await;
    assert_eq!(
        app.metric("handoff_open_streams").await,
        0.0,
        "no stream was opened"
    );

    assert_eq!(app.complete(&id).await.status(), 200);
    browser.wait_for_url(&format!("/test.do?id={id}")).await;
    assert_eq!(app.metric("handoff_events_sent_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_job_shows_a_clear_message_and_no_spinner() {
    let mut app = TestApp::spawn().await;
    let browser = Browser::start().await;
    let spinners = "return document.querySelectorAll('.spinner').length;";

    // An id nobody made (well-formed, from another database), and one that is not an id at all.
    let stranger = TestApp::spawn().await.job_id().await;
    for path in [format!("/jobs/{stranger}"), "/jobs/not-a-job".to_owned()] {
        browser.goto(&app.url(&path)).await;
        let text = browser.text().await;
        assert!(text.contains("No such job"), "{path}: {text}");
        assert_eq!(browser.js(spinners).await, json!(0), "{path}: no spinner");
        let errors = browser.console_errors().await;
        assert!(
            errors
                .iter()
                .any(|e| e.contains("404") || e.contains("400")),
            "the console shows the failed load (and so the console capture works): {errors:?}"
        );
    }

    // A job that disappears while page A waits (the app came back with another database):
    // handoff.js says so and stops the spinner.
    connected_page_a(&browser, &app).await;
    let addr = addr_of(&app);
    let _dir = app.stop().await;
    let _fresh = TestApp::spawn_with(|config| config.addr = addr).await;
    browser.wait_for_state("unknown").await;
    let status = browser.status_text().await.unwrap_or_default();
    assert!(status.contains("does not exist"), "{status}");
    let animation = "return getComputedStyle(document.querySelector('.spinner')).animationName;";
    assert_eq!(
        browser.js(animation).await,
        json!("none"),
        "the spinner stops"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn completing_a_job_on_the_admin_page_moves_the_waiting_tab_to_page_b() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    let waiting = browser.client.window().await.expect("the first tab");
    let id = connected_page_a(&browser, &app).await;

    browser.new_tab().await;
    log_in(&browser, &app).await;
    let row = format!("tr[data-job='{id}']");
    let streams = browser
        .js(&format!(
            "return document.querySelector(\"{row} td.num\").innerText;"
        ))
        .await;
    assert_eq!(
        streams,
        json!("1"),
        "the admin page shows the waiting tab's stream"
    );
    browser.click(&format!("{row} button")).await;
    browser.wait_for_url("/admin").await;

    browser.switch_to(&waiting).await;
    browser.wait_for_url(&format!("/test.do?id={id}")).await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

/// A site of the test's own on 127.0.0.1 serving page A with a copy of the real handoff.js, whose
/// stream `/stream/{n}` sends one result with `move_urls[n]`: addresses Handoff itself refuses to
/// store, as a compromised or mistaken server could still send them. `/landed` is a page of its
/// own. Stops with the test's runtime.
async fn site_sending(move_urls: &[&str]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let origin = format!("http://{}", listener.local_addr().expect("its address"));
    let script = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/static/handoff.js"))
        .expect("static/handoff.js");
    let events: Vec<String> = move_urls
        .iter()
        .map(|url| json!({ "status": "result", "moveUrl": url }).to_string())
        .collect();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(answer_site_request(socket, script.clone(), events.clone()));
        }
    });
    origin
}

async fn answer_site_request(mut socket: TcpStream, script: String, events: Vec<String>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (content_type, body) = if let Some(n) = path.strip_prefix("/page/") {
        let page = format!(
            "<!doctype html><html><head><title>page A</title>\
             <script src=\"/handoff.js\" defer></script></head><body>\
             <main data-handoff-job=\"job\" data-handoff-stream=\"/stream/{n}\">\
             <p data-handoff-status></p></main></body></html>"
        );
        ("text/html", page)
    } else if path == "/handoff.js" {
        ("text/javascript", script)
    } else if let Some(event) = path
        .strip_prefix("/stream/")
        .and_then(|n| events.get(n.parse::<usize>().ok()?))
    {
        let stream = format!("retry: 60000\n\nevent: result\ndata: {event}\n\n");
        let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                    Cache-Control: no-cache\r\n\r\n";
        let _ = socket.write_all(format!("{head}{stream}").as_bytes()).await;
        // Held open, as a stream waiting for more would be: only the event ends the wait.
        tokio::time::sleep(Duration::from_secs(60)).await;
        return;
    } else if path.starts_with("/landed") {
        (
            "text/html",
            "<!doctype html><title>landed</title>landed".to_owned(),
        )
    } else {
        let _ = socket
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    };
    let answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = socket.write_all(answer.as_bytes()).await;
}

/// The browser reads a tab or a newline out of a URL and a backslash as a slash, so a check on
/// the raw text ("one leading slash, no backslash") let `/<tab>/evil.example` through to
/// `//evil.example`. handoff.js resolves the address as the browser will and compares origins.
#[tokio::test(flavor = "multi_thread")]
async fn page_a_refuses_a_result_address_that_would_leave_the_site() {
    let leaving = [
        "/\t/evil.example",
        "/\n/evil.example",
        "/\\evil.example",
        "/\t\\evil.example",
        "//evil.example",
        "https://evil.example/",
    ];
    let mut move_urls = leaving.to_vec();
    move_urls.push("/landed?after=all");
    let origin = site_sending(&move_urls).await;
    let browser = Browser::start().await;
    for (n, move_url) in leaving.iter().enumerate() {
        let page_a = format!("{origin}/page/{n}");
        browser.goto(&page_a).await;
        browser.wait_for_state("invalid").await;
        assert_eq!(browser.url().await, page_a, "{move_url:?} moved the tab");
        let status = browser.status_text().await.unwrap_or_default();
        assert!(status.contains("not valid"), "{move_url:?}: {status}");
    }
    // The same page and stream follow an address on the site.
    browser
        .goto(&format!("{origin}/page/{}", leaving.len()))
        .await;
    let url = browser.wait_for_url("/landed").await;
    assert_eq!(url, format!("{origin}/landed?after=all"));
}

async fn log_in(browser: &Browser, app: &TestApp) {
    browser.goto(&app.url("/admin")).await;
    browser
        .client
        .find(fantoccini::Locator::Css("#token"))
        .await
        .expect("the login form")
        .send_keys(TOKEN)
        .await
        .expect("typing the token");
    browser.click("form[action='/admin/login'] button").await;
    let ok = eventually(PATIENCE, || async {
        browser.text().await.contains("Log out")
    })
    .await;
    assert!(ok, "logged in: {}", browser.text().await);
}

/// Checks a page looks finished at the current size, then writes its screenshot.
async fn snapshot(browser: &Browser, name: &str) {
    let overflow = "return document.documentElement.scrollWidth - window.innerWidth;";
    let extra = browser.js(overflow).await.as_i64().unwrap_or_default();
    assert!(
        extra <= 0,
        "{name}: the page is {extra}px wider than the window"
    );
    let path = browser.screenshot(name).await;
    let size = std::fs::metadata(&path)
        .expect("the screenshot exists")
        .len();
    assert!(size > 10_000, "{name}: a {size}-byte screenshot is blank");
}

#[tokio::test(flavor = "multi_thread")]
async fn screenshots_show_finished_pages_on_a_desktop_and_on_a_phone() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    for job in ["/after/one", "/after/two"] {
        app.create_job(Some(job)).await;
    }
    for (phone, suffix) in [(false, ""), (true, "-phone")] {
        browser.phone(phone).await;
        browser.goto(&app.url("/")).await;
        snapshot(&browser, &format!("landing{suffix}")).await;

        browser.click(MANUAL_JOB_BUTTON).await;
        let id = browser.job_id().await;
        browser.wait_for_state("connected").await;
        let spinner = "return getComputedStyle(document.querySelector('.spinner')).animationName;";
        assert_eq!(
            browser.js(spinner).await,
            json!("spin"),
            "a spinner turns while waiting"
        );
        let status = browser.status_text().await.unwrap_or_default();
        assert!(
            status.starts_with("Connected"),
            "a readable status line: {status:?}"
        );
        snapshot(&browser, &format!("page-a{suffix}")).await;

        assert_eq!(app.complete(&id).await.status(), 200);
        browser.wait_for_url("/test.do").await;
        snapshot(&browser, &format!("page-b{suffix}")).await;

        if phone {
            browser.goto(&app.url("/admin")).await;
        } else {
            log_in(&browser, &app).await;
        }
        snapshot(&browser, &format!("admin{suffix}")).await;
    }
}

/// Page A's bar: its value (`None` while indeterminate) and the message under it.
async fn progress_bar(browser: &Browser) -> (Option<f64>, String) {
    let bar = browser
        .js(
            "const p = document.querySelector('progress[data-handoff-progress]'); \
             return p.hasAttribute('value') ? p.value : null;",
        )
        .await;
    let message = browser
        .js_string("return document.querySelector('[data-handoff-message]').textContent;")
        .await
        .unwrap_or_default();
    (bar.as_f64(), message)
}

#[tokio::test(flavor = "multi_thread")]
async fn page_a_shows_a_progress_bar_at_40_percent_with_its_message_then_moves_on_completion() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    for (phone, suffix) in [(false, ""), (true, "-phone")] {
        browser.phone(phone).await;
        let id = app.job_id().await;
        browser.goto(&app.url(&format!("/jobs/{id}"))).await;
        browser.wait_for_state("connected").await;
        assert_eq!(
            progress_bar(&browser).await,
            (None, String::new()),
            "indeterminate at first"
        );
        let report = json!({ "percent": 40, "message": "Rendering page 3 of 7" });
        let answer = app
            .api_post(&format!("/api/jobs/{id}/progress"), Some(report))
            .await;
        assert_eq!(answer.status(), 200);
        browser.wait_for_state("progress").await;
        assert_eq!(
            progress_bar(&browser).await,
            (Some(40.0), "Rendering page 3 of 7".to_owned())
        );
        let spoken = browser
            .js_string("return document.querySelector('progress').getAttribute('aria-valuetext');")
            .await
            .unwrap_or_default();
        assert_eq!(
            spoken, "40 %, Rendering page 3 of 7",
            "screen readers hear it"
        );
        let status = browser.status_text().await.unwrap_or_default();
        assert!(status.contains("40 %"), "{status}");
        snapshot(&browser, &format!("page-a-progress{suffix}")).await;

        assert_eq!(app.complete(&id).await.status(), 200);
        browser.wait_for_url(&format!("/test.do?id={id}")).await;
        assert!(browser.text().await.contains("Job complete"));
    }
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_job_from_the_landing_page_shows_its_progress_and_reaches_page_b_by_itself() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    browser.goto(&app.url("/")).await;
    browser.click("form[action='/jobs'] button").await;
    browser.wait_for_state("progress").await;
    let (percent, message) = progress_bar(&browser).await;
    assert!(percent.is_some_and(|p| p > 0.0 && p < 100.0), "{percent:?}");
    assert!(message.starts_with("Step "), "{message}");
    let id = browser.job_id().await;
    browser.wait_for_url(&format!("/test.do?id={id}")).await;
    assert!(browser.text().await.contains("Job complete"));
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_job_moves_the_tab_to_page_b_which_shows_the_message_as_text() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    let id = app.job_id().await;
    browser.goto(&app.url(&format!("/jobs/{id}"))).await;
    browser.wait_for_state("connected").await;
    let why = "Payment declined <b>by the bank</b> & retried";
    let answer = app
        .api_post(
            &format!("/api/jobs/{id}/fail"),
            Some(json!({ "message": why })),
        )
        .await;
    assert_eq!(answer.status(), 200);
    browser.wait_for_url(&format!("/test.do?id={id}")).await;
    let text = browser.text().await;
    assert!(text.contains("The job failed"), "{text}");
    assert!(
        text.contains(why),
        "the message, markup shown as text: {text}"
    );
    let bold = browser
        .js("return document.querySelectorAll('main b').length;")
        .await;
    assert_eq!(bold, json!(0), "no markup from the message");
    snapshot(&browser, "page-b-failed").await;
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_expires_moves_the_tab_to_page_b_which_says_so() {
    let app = TestApp::spawn().await;
    let browser = Browser::start().await;
    let id = app.job_with_deadline(2).await;
    browser.goto(&app.url(&format!("/jobs/{id}"))).await;
    browser.wait_for_url(&format!("/test.do?id={id}")).await;
    let text = browser.text().await;
    assert!(text.contains("The job expired"), "{text}");
    assert_eq!(browser.console_errors().await, Vec::<String>::new());
}
