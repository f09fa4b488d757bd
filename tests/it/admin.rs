//! The admin surface: login, CSRF, completing a job from the form, and how a session ends.

use std::time::Duration;

use crate::support::{TOKEN, TestApp, WAIT, client, cookie_client, csrf_of, page_text, post_form};

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_logs_in_and_completes_a_job_that_an_open_stream_receives() {
    let app = TestApp::spawn().await;
    let admin = cookie_client();
    let id = app.job_id().await;
    let mut stream = app.connected_stream(&id).await;

    let wrong = post_form(&admin, app.url("/admin/login"), &[("token", "nope")]).await;
    assert_eq!(wrong.status(), 401);
    let login = post_form(&admin, app.url("/admin/login"), &[("token", TOKEN)]).await;
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );

    let page = page_text(&admin, app.url("/admin")).await;
    assert!(page.contains(&id), "the job is listed");
    let csrf = csrf_of(&page);
    let complete_url = app.url(&format!("/admin/jobs/{id}/complete"));

    let no_csrf = post_form(&admin, &complete_url, &[("x", "y")]).await;
    assert_eq!(no_csrf.status(), 403);
    let bad_csrf = post_form(&admin, &complete_url, &[("csrf", "forged")]).await;
    assert_eq!(bad_csrf.status(), 403);
    assert_eq!(
        app.job(&id).await["status"],
        "pending",
        "a refused form changes nothing"
    );

    let ok = post_form(&admin, &complete_url, &[("csrf", csrf.as_str())]).await;
    assert_eq!(ok.status(), 303);
    assert_eq!(ok.headers()["location"], "/admin");
    let result = stream.next_result(WAIT).await.unwrap();
    assert_eq!(result["moveUrl"], format!("/test.do?id={id}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_forms_without_a_session_are_forbidden() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let anon = post_form(
        &app.client,
        app.url(&format!("/admin/jobs/{id}/complete")),
        &[("csrf", "x")],
    )
    .await;
    assert_eq!(anon.status(), 403);
    let login_page = page_text(&app.client, app.url("/admin")).await;
    assert!(login_page.contains("action=\"/admin/login\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_page_lists_open_streams_and_creates_jobs() {
    let app = TestApp::spawn().await;
    let admin = app.admin_session().await;
    let id = app.job_id().await;
    let _a = app.connected_stream(&id).await;
    let _b = app.connected_stream(&id).await;
    let page = page_text(&admin, app.url("/admin")).await;
    let row = page.split(&format!("data-job=\"{id}\"")).nth(1).unwrap();
    assert!(
        row.split("</tr>")
            .next()
            .unwrap()
            .contains("<td class=\"num\">2</td>"),
        "two streams shown"
    );
    let csrf = csrf_of(&page);
    let created = post_form(
        &admin,
        app.url("/admin/jobs"),
        &[("csrf", csrf.as_str()), ("moveUrl", "/next")],
    )
    .await;
    assert_eq!(created.status(), 303);
    let evil = post_form(
        &admin,
        app.url("/admin/jobs"),
        &[("csrf", csrf.as_str()), ("moveUrl", "//evil")],
    )
    .await;
    assert_eq!(evil.status(), 400);
    let page = page_text(&admin, app.url("/admin")).await;
    assert!(page.contains("2 jobs"), "the new job is counted");
}

/// The admin session cookie a response sets, as `name=value`: what a browser (or a thief who
/// copied it) sends back.
fn session_cookie_of(response: &reqwest::Response) -> String {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("handoff_admin="))
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

/// `GET /admin` with `cookie`; the answer.
async fn admin_with(app: &TestApp, cookie: &str) -> reqwest::Response {
    client()
        .get(app.url("/admin"))
        .header("Cookie", cookie)
        .send()
        .await
        .unwrap()
}

/// Whether `cookie` gets the admin page (not the login form) from `app`.
async fn logged_in(app: &TestApp, cookie: &str) -> bool {
    let page = admin_with(app, cookie).await.text().await.unwrap();
    let admin = page.contains("name=\"csrf\"");
    assert_ne!(admin, page.contains("action=\"/admin/login\""), "{page}");
    admin
}

async fn log_in(app: &TestApp) -> String {
    let login = post_form(&client(), app.url("/admin/login"), &[("token", TOKEN)]).await;
    assert_eq!(login.status(), 303);
    session_cookie_of(&login)
}

#[tokio::test(flavor = "multi_thread")]
async fn logging_out_on_one_instance_ends_the_session_on_every_instance() {
    let one = TestApp::spawn().await;
    let two = TestApp::spawn_on(&one.database_url, |_| {}).await;
    let cookie = log_in(&one).await;
    assert!(logged_in(&one, &cookie).await);
    assert!(logged_in(&two, &cookie).await, "instances share sessions");
    let page = admin_with(&two, &cookie).await.text().await.unwrap();
    let csrf = csrf_of(&page);

    let logout = client()
        .post(two.url("/admin/logout"))
        .header("Cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 303);
    let removal = logout.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(removal.starts_with("handoff_admin=;"), "{removal}");

    for app in [&one, &two] {
        assert!(
            !logged_in(app, &cookie).await,
            "a replayed cookie gets the login page on {}",
            app.base
        );
        let form = client()
            .post(app.url("/admin/jobs"))
            .header("Cookie", &cookie)
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(form.status(), 403, "and its forms are refused");
    }
    let again = log_in(&one).await;
    assert!(logged_in(&two, &again).await, "logging in again works");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_session_unused_for_the_idle_time_is_over_and_each_admin_request_renews_it() {
    let app = TestApp::spawn_with(|c| c.admin_idle = Duration::from_secs(2)).await;
    let first = log_in(&app).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let page = admin_with(&app, &first).await;
    let renewed = session_cookie_of(&page);
    assert!(page.text().await.unwrap().contains("name=\"csrf\""));
    let max_age = admin_with(&app, &renewed).await.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        max_age.contains("Max-Age=2"),
        "the browser keeps it as long: {max_age}"
    );

    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        logged_in(&app, &renewed).await,
        "1.2 s after its renewal the session lives"
    );
    assert!(
        !logged_in(&app, &first).await,
        "2.4 s after login, the cookie of the login is over"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        !logged_in(&app, &renewed).await,
        "unused for 2 s, it is over"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_page_shows_state_progress_and_deadline_and_fails_a_job_with_a_message() {
    let app = TestApp::spawn().await;
    let admin = app.admin_session().await;
    let id = app.job_id().await;
    let mut stream = app.connected_stream(&id).await;
    let report = serde_json::json!({ "percent": 40, "message": "Rendering" });
    let answer = app
        .api_post(&format!("/api/jobs/{id}/progress"), Some(report))
        .await;
    assert_eq!(answer.status(), 200);
    // The page reads the stored report, stored within a quarter of a second.
    let shown = crate::support::eventually(WAIT, || async {
        page_text(&admin, app.url("/admin"))
            .await
            .contains("40 % · Rendering")
    });
    assert!(shown.await, "the progress is listed");
    let page = page_text(&admin, app.url("/admin")).await;
    let row = page.split(&format!("data-job=\"{id}\"")).nth(1).unwrap();
    let row = row.split("</tr>").next().unwrap();
    let deadline = app.job(&id).await["deadline"].as_str().unwrap().to_owned();
    assert!(row.contains("pending") && row.contains(&deadline), "{row}");
    assert!(
        row.contains(&format!("/admin/jobs/{id}/fail")),
        "a Fail button: {row}"
    );

    let failed = post_form(
        &admin,
        app.url(&format!("/admin/jobs/{id}/fail")),
        &[
            ("csrf", csrf_of(&page).as_str()),
            ("message", "Stopped by the operator"),
        ],
    )
    .await;
    assert_eq!(failed.status(), 303);
    let (_, data) = loop {
        let (event, data) = stream.next_event(WAIT).await.expect("the ending");
        if event == "result" {
            break (event, data);
        }
    };
    assert_eq!(data["status"], "failed");
    assert_eq!(data["message"], "Stopped by the operator");
    let page = page_text(&admin, app.url("/admin")).await;
    let row = page.split(&format!("data-job=\"{id}\"")).nth(1).unwrap();
    let row = row.split("</tr>").next().unwrap();
    assert!(
        row.contains("failed") && row.contains("Stopped by the operator"),
        "{row}"
    );
    assert!(
        !row.contains("/fail\""),
        "no Fail button on an ended job: {row}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn several_named_tokens_work_at_once_and_each_is_counted_by_its_name() {
    let ci = "ci-token-0123456789abcdef";
    let next = "next-ci-token-0123456789";
    let app = TestApp::spawn_with(|c| {
        c.api_tokens = Some(handoff::config::NamedTokens(vec![
            ("ci".into(), ci.into()),
            ("ci-next".into(), next.into()),
        ]));
    })
    .await;
    for token in [ci, next, next, TOKEN] {
        let created = app
            .client
            .post(app.url("/api/jobs"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
    }
    for (name, calls) in [("ci", 1.0), ("ci-next", 2.0), ("default", 1.0)] {
        let metric = format!("handoff_api_calls_total{{token=\"{name}\"}}");
        let counted = app.metric(&metric).await;
        assert_eq!(
            counted, calls,
            "{name} (HANDOFF_API_TOKEN is named default)"
        );
    }
}
