//! The admin surface: login, CSRF, and completing a job from the form.

mod support;

use std::time::Duration;

use support::{TOKEN, TestApp};

const WAIT: Duration = Duration::from_secs(5);

fn cookie_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .cookie_store(true)
        .build()
        .unwrap()
}

/// Pulls the CSRF token out of the admin page.
fn csrf_of(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a CSRF field") + marker.len();
    html[start..].split('"').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_logs_in_and_completes_a_job_that_an_open_stream_receives() {
    let app = TestApp::spawn().await;
    let admin = cookie_client();
    let id = app.job_id().await;
    let mut stream = app.stream(&id).await;
    assert_eq!(stream.next_result(WAIT).await.unwrap()["status"], "connect");

    let wrong = admin.post(app.url("/admin/login")).form(&[("token", "nope")]).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    let login = admin.post(app.url("/admin/login")).form(&[("token", TOKEN)]).send().await.unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");

    let page = admin.get(app.url("/admin")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains(&id), "the job is listed");
    let csrf = csrf_of(&page);
    let complete_url = app.url(&format!("/admin/jobs/{id}/complete"));

    let no_csrf = admin.post(&complete_url).form(&[("x", "y")]).send().await.unwrap();
    assert_eq!(no_csrf.status(), 403);
    let bad_csrf = admin.post(&complete_url).form(&[("csrf", "forged")]).send().await.unwrap();
    assert_eq!(bad_csrf.status(), 403);
    let job: serde_json::Value = app.get_job(&id).await.json().await.unwrap();
    assert_eq!(job["status"], "pending", "a refused form changes nothing");

    let ok = admin.post(&complete_url).form(&[("csrf", csrf.as_str())]).send().await.unwrap();
    assert_eq!(ok.status(), 303);
    assert_eq!(ok.headers()["location"], "/admin");
    let result = stream.next_result(WAIT).await.unwrap();
    assert_eq!(result["moveUrl"], format!("/test.do?id={id}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_forms_without_a_session_are_forbidden() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let anon = app.client.post(app.url(&format!("/admin/jobs/{id}/complete"))).form(&[("csrf", "x")]).send().await.unwrap();
    assert_eq!(anon.status(), 403);
    let login_page = app.client.get(app.url("/admin")).send().await.unwrap().text().await.unwrap();
    assert!(login_page.contains("action=\"/admin/login\""));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_page_lists_open_streams_and_creates_jobs() {
    let app = TestApp::spawn().await;
    let admin = cookie_client();
    admin.post(app.url("/admin/login")).form(&[("token", TOKEN)]).send().await.unwrap();
    let id = app.job_id().await;
    let mut a = app.stream(&id).await;
    let mut b = app.stream(&id).await;
    a.next_result(WAIT).await;
    b.next_result(WAIT).await;
    let page = admin.get(app.url("/admin")).send().await.unwrap().text().await.unwrap();
    let row = page.split(&format!("data-job=\"{id}\"")).nth(1).unwrap();
    assert!(row.split("</tr>").next().unwrap().contains("<td class=\"num\">2</td>"), "two streams shown");
    let csrf = csrf_of(&page);
    let created = admin.post(app.url("/admin/jobs")).form(&[("csrf", csrf.as_str()), ("moveUrl", "/next")]).send().await.unwrap();
    assert_eq!(created.status(), 303);
    let evil = admin.post(app.url("/admin/jobs")).form(&[("csrf", csrf.as_str()), ("moveUrl", "//evil")]).send().await.unwrap();
    assert_eq!(evil.status(), 400);
    let page = admin.get(app.url("/admin")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("2 jobs"), "the new job is counted");
}
