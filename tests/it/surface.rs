//! The admin and API surface under attack: token guessing, forged forwarding headers, security
//! headers on every answer, and what the log may never show; and the HTTP conventions a checker
//! relies on (`HEAD` on every `GET` route, `/healthz` and `/readyz`).

use std::time::Duration;

use crate::support::{Instance, TOKEN, TestApp, WAIT, behind_local_proxy, post_form};

async fn login_with(app: &TestApp, token: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/admin/login"))
        .form(&[("token", token)]);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn login_from(app: &TestApp, client: &str, token: &str) -> reqwest::Response {
    login_with(app, token, &[("X-Forwarded-For", client)]).await
}

#[tokio::test]
async fn repeated_wrong_logins_from_one_address_are_slowed_down_and_others_are_not() {
    let app = TestApp::spawn_with(behind_local_proxy).await;
    let guesser = "203.0.113.7";
    for _ in 0..5 {
        assert_eq!(login_from(&app, guesser, "guess").await.status(), 401);
    }
    let blocked = login_from(&app, guesser, TOKEN).await;
    assert_eq!(blocked.status(), 429, "even the right token waits its turn");
    assert_eq!(blocked.headers()["retry-after"], "1");
    assert!(
        blocked
            .text()
            .await
            .unwrap()
            .contains("Too many wrong tokens")
    );
    assert_eq!(
        login_from(&app, "203.0.113.8", TOKEN).await.status(),
        303,
        "another address logs in"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(login_from(&app, guesser, "guess again").await.status(), 401);
    let longer = login_from(&app, guesser, TOKEN).await;
    assert_eq!(longer.status(), 429);
    assert_eq!(longer.headers()["retry-after"], "2", "the wait doubles");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(login_from(&app, guesser, TOKEN).await.status(), 303);
    assert_eq!(
        login_from(&app, guesser, "one slip").await.status(),
        401,
        "a success clears the record"
    );
    assert_eq!(login_from(&app, guesser, TOKEN).await.status(), 303);
}

async fn create_from(app: &TestApp, client: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/api/jobs"))
        .header("X-Forwarded-For", client);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn wrong_bearer_tokens_from_one_address_are_slowed_down_apart_from_logins_and_others_are_not()
{
    let app = TestApp::spawn_with(behind_local_proxy).await;
    let guesser = "203.0.113.7";
    for _ in 0..10 {
        let status = create_from(&app, guesser, None).await.status();
        assert_eq!(status, 401, "no token at all guesses nothing");
    }
    for _ in 0..5 {
        let status = create_from(&app, guesser, Some("wrong-token-guess"))
            .await
            .status();
        assert_eq!(status, 401);
    }
    let blocked = create_from(&app, guesser, Some(TOKEN)).await;
    assert_eq!(blocked.status(), 429, "even the right token waits its turn");
    assert_eq!(blocked.headers()["retry-after"], "1");
    let body: serde_json::Value = blocked.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many wrong API tokens"),
        "{body}"
    );
    assert_eq!(
        create_from(&app, "203.0.113.8", Some(TOKEN)).await.status(),
        201,
        "the operator at another address is not slowed down"
    );
    assert_eq!(
        login_from(&app, guesser, TOKEN).await.status(),
        303,
        "the login form keeps a record of its own"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(create_from(&app, guesser, Some(TOKEN)).await.status(), 201);
    assert_eq!(
        create_from(&app, guesser, Some("one slip")).await.status(),
        401,
        "a right token cleared the record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_an_untrusted_peer_log_one_warning_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let mut instance = Instance::start(dir.path(), &[]);
    let warnings = |instance: &Instance| {
        instance
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("HANDOFF_TRUSTED_PROXIES"))
            .cloned()
            .collect::<Vec<_>>()
    };
    let create = |forwarded: bool| {
        let mut request = instance
            .client
            .post(instance.url("/api/jobs"))
            .bearer_auth(TOKEN);
        if forwarded {
            request = request.header("X-Forwarded-For", "203.0.113.7");
        }
        request.send()
    };
    assert_eq!(create(false).await.unwrap().status(), 201);
    assert_eq!(
        warnings(&instance),
        Vec::<String>::new(),
        "no forwarding, no warning"
    );
    for _ in 0..5 {
        assert_eq!(create(true).await.unwrap().status(), 201);
    }
    let id = instance.job_id().await;
    let stream = instance
        .client
        .get(instance.url(&format!("/sse/connect/{id}")))
        .header("X-Forwarded-For", "203.0.113.8")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    instance.kill();
    let warned = warnings(&instance);
    assert_eq!(
        warned.len(),
        1,
        "one warning, not one per request: {warned:?}"
    );
    assert!(
        warned[0].contains("127.0.0.1") && warned[0].contains(" WARN "),
        "{warned:?}"
    );
}

#[tokio::test]
async fn the_session_cookie_is_secure_only_when_a_trusted_proxy_says_https() {
    for (trusted, secure) in [(true, true), (false, false)] {
        let app = TestApp::spawn_with(|c| {
            if trusted {
                behind_local_proxy(c);
            }
        })
        .await;
        let login = login_with(&app, TOKEN, &[("X-Forwarded-Proto", "https")]).await;
        assert_eq!(login.status(), 303);
        let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert_eq!(
            cookie.contains("Secure"),
            secure,
            "trusted proxy: {trusted}; {cookie}"
        );
    }
}

#[tokio::test]
async fn with_an_https_public_url_the_session_cookie_is_secure_whatever_a_proxy_says() {
    let app = TestApp::spawn_with(|c| {
        behind_local_proxy(c);
        c.public_url = Some("https://handoff.example".parse().unwrap());
    })
    .await;
    for headers in [vec![], vec![("X-Forwarded-Proto", "http")]] {
        let login = login_with(&app, TOKEN, &headers).await;
        assert_eq!(login.status(), 303);
        let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(cookie.contains("Secure"), "{headers:?}: {cookie}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_health_checks_asks_the_database_at_most_once_a_second() {
    use futures_util::StreamExt as _;
    let app = TestApp::spawn().await;
    let checks = || app.metric("handoff_health_checks_total");
    let before = checks().await;
    let started = std::time::Instant::now();
    let answers: Vec<u16> = futures_util::stream::iter(0..300)
        .map(|_| async { app.get("/healthz").await.status().as_u16() })
        .buffer_unordered(30)
        .collect()
        .await;
    let took = started.elapsed();
    assert!(answers.iter().all(|status| *status == 200), "{answers:?}");
    let made = checks().await - before;
    let at_most = took.as_secs_f64().ceil() + 1.0;
    assert!(
        (1.0..=at_most).contains(&made),
        "{made} checks for 300 calls in {took:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(
        checks().await,
        before + made + 1.0,
        "a stale answer is renewed"
    );
}

/// Every `GET` route of `routes::configure`, with a path that reaches it, and the two streams.
fn get_routes(id: &str) -> Vec<String> {
    [
        "/",
        "/jobs/{id}",
        "/test.do?id={id}",
        "/static/handoff.js",
        "/sse/connect/{id}",
        "/sse/watch?ids={id}",
        "/api/openapi.json",
        "/api/jobs/{id}",
        "/admin",
        "/healthz",
        "/readyz",
        "/metrics",
        // Refusals too: a malformed id, an unknown job, a missing file.
        "/api/jobs/not-an-id",
        "/sse/connect/AAAAAAAAAAAAAAAAAAAAAA",
        "/static/nothing.js",
    ]
    .iter()
    .map(|path| path.replace("{id}", id))
    .collect()
}

#[tokio::test]
async fn head_on_every_get_route_answers_as_get_would_without_a_body() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    for path in get_routes(&id) {
        let get = app.client.get(app.url(&path)).send().await.unwrap();
        let head = app.client.head(app.url(&path)).send().await.unwrap();
        assert_eq!(head.status(), get.status(), "HEAD {path}");
        // The same headers, but those that change between two answers (the date, and the
        // length of /metrics, whose counts just moved).
        let names = |r: &reqwest::Response| {
            let mut names: Vec<String> = r
                .headers()
                .keys()
                .map(|n| n.as_str().to_owned())
                .filter(|n| n != "date" && n != "transfer-encoding")
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(&head), names(&get), "HEAD {path}");
        for same in [
            "content-type",
            "cache-control",
            "x-accel-buffering",
            "allow",
        ] {
            assert_eq!(
                head.headers().get(same),
                get.headers().get(same),
                "{same}: HEAD {path}"
            );
        }
        if path != "/metrics" {
            assert_eq!(
                head.headers().get("content-length"),
                get.headers().get("content-length"),
                "HEAD {path}"
            );
        }
        let status = get.status().as_u16();
        drop(get);
        // Over a raw socket: nothing after the head, and the answer ends at once even for a
        // stream (whose GET would run to its 60 s timeout).
        let started = std::time::Instant::now();
        let raw = crate::hostile_input::raw(&app, "HEAD", &path, &[], b"").await;
        assert_eq!(raw.status, status, "raw HEAD {path}");
        assert_eq!(raw.body, "", "HEAD {path} has no body");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "HEAD {path} ended at once"
        );
    }
    assert!(
        app.metric_reaches("handoff_open_streams", 0.0, WAIT).await,
        "a HEAD on a stream holds no stream open"
    );
}

#[tokio::test]
async fn healthz_says_alive_and_readyz_says_ready_for_streams_and_writes() {
    let app = TestApp::spawn().await;
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
    assert!(health.text().await.unwrap().starts_with("ok\n"));
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(ready.text().await.unwrap(), "ready\n");
}

#[tokio::test]
async fn every_answer_carries_the_security_headers() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let cases = [
        ("GET", "/".to_owned()),
        ("GET", format!("/jobs/{id}")),
        ("GET", format!("/test.do?id={id}")),
        ("GET", "/admin".to_owned()),
        ("GET", "/static/handoff.js".to_owned()),
        ("GET", format!("/api/jobs/{id}")),
        ("GET", "/healthz".to_owned()),
        ("GET", "/readyz".to_owned()),
        ("HEAD", "/".to_owned()),
        ("GET", "/metrics".to_owned()),
        ("GET", "/nothing/here".to_owned()),
        ("GET", "/jobs/not-an-id".to_owned()),
        ("DELETE", "/admin".to_owned()),
        ("POST", "/admin/jobs".to_owned()),
    ];
    for (method, path) in cases {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let response = app
            .client
            .request(method.clone(), app.url(&path))
            .send()
            .await
            .unwrap();
        let headers = response.headers();
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("frame-ancestors 'none'"),
            "{method} {path}: {csp}"
        );
        assert!(csp.contains("script-src 'self'"), "{method} {path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{method} {path}: {csp}");
        assert_eq!(
            headers["x-content-type-options"], "nosniff",
            "{method} {path}"
        );
        assert_eq!(headers["referrer-policy"], "same-origin", "{method} {path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{method} {path}");
    }
    let stream = app.stream(&id).await;
    assert_eq!(
        stream.headers["x-content-type-options"], "nosniff",
        "the stream too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_never_shows_the_token_or_a_move_urls_query() {
    let dir = tempfile::tempdir().unwrap();
    let mut instance = Instance::start(dir.path(), &[("RUST_LOG", "info,handoff=debug")]);
    let secret = "s3cr3t-reset-code";
    let reset_url = format!("/reset?code={secret}");
    let job = instance.create_job(Some(&reset_url)).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let mut stream = instance.stream(&id).await;
    let override_url = format!("/done?code={secret}");
    let completed = instance.complete_with(&id, &override_url).await;
    assert_eq!(completed.status(), 200);
    assert_eq!(stream.next_result(WAIT).await.unwrap()["status"], "connect");
    assert!(
        stream.next_result(WAIT).await.unwrap()["moveUrl"]
            .as_str()
            .unwrap()
            .contains(secret)
    );
    let login = instance.url("/admin/login");
    for token in ["wrong-token-attempt", TOKEN] {
        post_form(&instance.client, &login, &[("token", token)]).await;
    }
    instance
        .client
        .post(instance.url("/api/jobs"))
        .bearer_auth("wrong-bearer")
        .send()
        .await
        .unwrap();
    instance.get(&format!("/test.do?id={id}")).await;
    instance.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let log = instance.log_text();
    assert!(
        log.contains(&format!("job {id} completed")),
        "the log was captured:\n{log}"
    );
    for never in [TOKEN, secret, "wrong-token-attempt", "wrong-bearer"] {
        assert!(!log.contains(never), "{never:?} appears in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_names_the_api_token_of_each_call_and_never_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let ci = "ci-token-0123456789abcdef";
    let mut instance = Instance::start(dir.path(), &[("HANDOFF_API_TOKENS", &format!("ci:{ci}"))]);
    let create = instance
        .client
        .post(instance.url("/api/jobs"))
        .bearer_auth(ci);
    assert_eq!(create.send().await.unwrap().status(), 201);
    instance.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = instance.log_text();
    assert!(log.contains("POST /api/jobs by API token ci"), "{log}");
    assert!(log.contains("also serves as the admin password"), "{log}");
    assert!(!log.contains(ci), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_token_is_logged_once_at_start_up_and_never_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut instance = Instance::start(dir.path(), &[("HANDOFF_API_TOKEN", "")]);
    let first = instance.log_text();
    let token = first
        .split("generated one for this run: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the generated token is logged at start-up:\n{first}"))
        .to_owned();
    let created = instance
        .client
        .post(instance.url("/api/jobs"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "the logged token works");
    let login = post_form(
        &instance.client,
        instance.url("/admin/login"),
        &[("token", &token)],
    )
    .await;
    assert_eq!(login.status(), 303);
    instance.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = instance.log_text();
    assert_eq!(
        log.matches(token.as_str()).count(),
        1,
        "logged once, at start-up:\n{log}"
    );
}
