//! The landing page's demo form against strangers: each address may start a few demo jobs, then
//! waits; another site's page cannot start them in a visitor's name; `HANDOFF_DEMO=off` turns
//! the form off.

use handoff::limits::{DEMO_BURST, DEMO_REFILL, TrustedProxies};

use crate::support::{TestApp, page_text};

/// `POST /jobs` as the landing page's second form sends it (a job that waits, so no demo runner
/// keeps working after the test), with extra headers.
async fn post_demo(app: &TestApp, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url("/jobs"))
        .form(&[("kind", "manual")]);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("POST /jobs")
}

#[tokio::test]
async fn an_address_starts_its_share_of_demo_jobs_then_gets_429_with_retry_after() {
    let app = TestApp::spawn_with(|c| {
        c.trusted_proxies = TrustedProxies::parse("127.0.0.1").unwrap();
    })
    .await;
    let from = |ip: &'static str| [("X-Forwarded-For", ip)];
    for n in 0..DEMO_BURST {
        let answer = post_demo(&app, &from("203.0.113.1")).await;
        assert_eq!(answer.status(), 303, "demo job {n}");
    }
    let refused = post_demo(&app, &from("203.0.113.1")).await;
    assert_eq!(refused.status(), 429);
    let wait: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=DEMO_REFILL.as_secs()).contains(&wait), "{wait}");
    let page = refused.text().await.unwrap();
    assert!(
        page.contains("Too many demo jobs") && page.contains(&format!("try again in {wait} s")),
        "{page}"
    );

    let other = post_demo(&app, &from("203.0.113.2")).await;
    assert_eq!(other.status(), 303, "another address has its own share");
    assert_eq!(
        app.metric("handoff_jobs_created_total").await,
        f64::from(DEMO_BURST + 1),
        "the refused post created nothing"
    );
}

#[tokio::test]
async fn a_form_post_from_another_site_is_refused_with_403_and_creates_nothing() {
    let app = TestApp::spawn().await;
    let own_origin = format!("http://127.0.0.1:{}", app.port);
    let own_origin = own_origin.as_str();
    for headers in [
        vec![("Sec-Fetch-Site", "cross-site")],
        vec![("Sec-Fetch-Site", "same-site")],
        vec![("Sec-Fetch-Site", "cross-site"), ("Origin", own_origin)],
        vec![("Origin", "https://evil.example")],
        vec![("Origin", "null")],
    ] {
        let answer = post_demo(&app, &headers).await;
        assert_eq!(answer.status(), 403, "{headers:?}");
        let page = answer.text().await.unwrap();
        assert!(
            page.contains("not from another site"),
            "{headers:?}: {page}"
        );
    }
    assert_eq!(app.metric("handoff_jobs_created_total").await, 0.0);

    // The landing page itself (what a browser says from it), a typed address, and a client that
    // is no browser.
    for headers in [
        vec![("Sec-Fetch-Site", "same-origin"), ("Origin", own_origin)],
        vec![("Sec-Fetch-Site", "none")],
        vec![("Origin", own_origin)],
        vec![],
    ] {
        let answer = post_demo(&app, &headers).await;
        assert_eq!(answer.status(), 303, "{headers:?}");
    }
}

#[tokio::test]
async fn with_the_demo_off_the_form_answers_404_and_the_landing_page_says_so() {
    let app = TestApp::spawn_with(|c| c.demo = false).await;
    let answer = post_demo(&app, &[]).await;
    assert_eq!(answer.status(), 404);
    assert!(answer.text().await.unwrap().contains("The demo is off"));
    assert_eq!(app.metric("handoff_jobs_created_total").await, 0.0);

    let landing = page_text(&app.client, app.url("/")).await;
    assert!(
        landing.contains("The demo is off on this server"),
        "{landing}"
    );
    assert!(
        !landing.contains("action=\"/jobs\""),
        "no demo form: {landing}"
    );
    // Page B, of a complete and of a failed job, offers no demo job either.
    let done = app.job_id().await;
    app.complete(&done).await;
    let failed = app.job_id().await;
    app.api_post(&format!("/api/jobs/{failed}/fail"), None)
        .await;
    for id in [done, failed] {
        let page = app.page_b(&id).await;
        assert!(!page.contains("action=\"/jobs\""), "no demo form: {page}");
    }
}
