//! What a hostile page can make its visitors' browsers do: post forged admin forms, guess
//! passwords from the visitors' addresses, or reach Handoff under a host name of its own (DNS
//! rebinding). None of it may change a job, cost a guess, or slow down a job runner.

use crate::support::{
    TOKEN, TestApp, behind_local_proxy, cookie_client, csrf_of, page_text, post_form,
};

/// A page on another site, as a current browser names it on a form post.
const CROSS_SITE: &[(&str, &str)] = &[
    ("Sec-Fetch-Site", "cross-site"),
    ("Origin", "https://evil.example"),
];
/// The same from an older browser, which sends no `Sec-Fetch-Site`.
const FOREIGN_ORIGIN: &[(&str, &str)] = &[("Origin", "https://evil.example")];
/// A page served under a host name that resolves to Handoff: same-origin to the browser.
const REBOUND: &[(&str, &str)] = &[
    ("Host", "evil.example"),
    ("Origin", "http://evil.example"),
    ("Sec-Fetch-Site", "same-origin"),
];

async fn post(
    client: &reqwest::Client,
    url: String,
    form: &[(&str, &str)],
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = client.post(url).form(form);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("form POST")
}

async fn create_from(app: &TestApp, client: &str, token: &str) -> reqwest::StatusCode {
    app.client
        .post(app.url("/api/jobs"))
        .header("X-Forwarded-For", client)
        .bearer_auth(token)
        .send()
        .await
        .expect("API request")
        .status()
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_posts_to_every_admin_form_are_refused_and_change_nothing() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let admin = app.admin_session().await;
    let csrf = csrf_of(&page_text(&admin, app.url("/admin")).await);
    let forms = [
        ("/admin/login".to_owned(), vec![("token", TOKEN)]),
        ("/admin/logout".to_owned(), vec![("csrf", csrf.as_str())]),
        ("/admin/jobs".to_owned(), vec![("csrf", csrf.as_str())]),
        (
            format!("/admin/jobs/{id}/complete"),
            vec![("csrf", csrf.as_str())],
        ),
        (
            format!("/admin/jobs/{id}/fail"),
            vec![("csrf", csrf.as_str())],
        ),
    ];
    for headers in [CROSS_SITE, FOREIGN_ORIGIN] {
        for (path, form) in &forms {
            let answer = post(&admin, app.url(path), form, headers).await;
            assert_eq!(answer.status(), 403, "{path} from {headers:?}");
            let page = answer.text().await.unwrap();
            assert!(page.contains("own admin page"), "{page}");
        }
    }
    assert_eq!(app.job(&id).await["status"], "pending");
    let still = page_text(&admin, app.url("/admin")).await;
    assert_eq!(csrf_of(&still), csrf, "the session was not logged out");
    assert!(
        still.contains(&id) && still.matches("/complete").count() == 1,
        "no job was created: {still}"
    );
}

#[tokio::test]
async fn wrong_logins_never_lock_the_right_bearer_token_out_from_the_same_address() {
    let app = TestApp::spawn_with(behind_local_proxy).await;
    let office = "203.0.113.9";
    let from_office = [("X-Forwarded-For", office)];
    let browser = cookie_client();
    let login = app.url("/admin/login");
    let forged: Vec<_> = from_office.iter().chain(CROSS_SITE).copied().collect();
    for _ in 0..8 {
        let answer = post(&browser, login.clone(), &[("token", "wrong")], &forged).await;
        assert_eq!(answer.status(), 403, "a forged login is refused");
    }
    let right = post(&browser, login.clone(), &[("token", TOKEN)], &from_office).await;
    assert_eq!(right.status(), 303, "forged logins counted no guess");

    for _ in 0..8 {
        let answer = post(&browser, login.clone(), &[("token", "wrong")], &from_office).await;
        assert!(
            [401, 429].contains(&answer.status().as_u16()),
            "{}",
            answer.status()
        );
    }
    let throttled = post(&browser, login.clone(), &[("token", TOKEN)], &from_office).await;
    assert_eq!(throttled.status(), 429, "the login form waits");
    assert_eq!(
        create_from(&app, office, TOKEN).await,
        201,
        "the job runner at the same address does not"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_a_public_url_browser_posts_from_any_other_origin_are_refused() {
    let app = TestApp::spawn_with(|c| {
        c.public_url = Some("http://handoff.test".parse().unwrap());
    })
    .await;
    let browser = cookie_client();
    let ours = [
        ("Origin", "http://handoff.test"),
        ("Sec-Fetch-Site", "same-origin"),
    ];
    let referer_only = [("Referer", "http://evil.example/page")];
    let other_port = [
        ("Host", "handoff.test"),
        ("Origin", "http://handoff.test:8080"),
    ];
    for headers in [REBOUND, &referer_only, &other_port, CROSS_SITE] {
        for (path, form) in [
            ("/jobs", ("kind", "manual")),
            ("/admin/login", ("token", TOKEN)),
        ] {
            let answer = post(&browser, app.url(path), &[form], headers).await;
            assert_eq!(answer.status(), 403, "{path} from {headers:?}");
        }
    }

    let demo = post(&browser, app.url("/jobs"), &[("kind", "manual")], &ours).await;
    assert_eq!(
        demo.status(),
        303,
        "the public origin's own page starts a demo job"
    );
    let login = post(
        &browser,
        app.url("/admin/login"),
        &[("token", TOKEN)],
        &ours,
    )
    .await;
    assert_eq!(login.status(), 303, "and logs in");
    let csrf = csrf_of(&page_text(&browser, app.url("/admin")).await);
    let create = post(&browser, app.url("/admin/jobs"), &[("csrf", &csrf)], &ours).await;
    assert_eq!(create.status(), 303, "and sends admin forms");
    let script = post_form(&app.client, app.url("/admin/login"), &[("token", TOKEN)]).await;
    assert_eq!(
        script.status(),
        303,
        "a script that names no page is no browser"
    );
    for path in ["/healthz", "/metrics", "/"] {
        assert_eq!(
            app.get(path).await.status(),
            200,
            "{path} at the instance's own address"
        );
    }
}
