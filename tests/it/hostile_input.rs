//! Hostile input on every route, sent byte for byte over a raw socket (an HTTP client library
//! would normalise `../` or refuse CRLF): every answer is a clear 4xx, the server stays up, and
//! nothing stored changes.

use std::time::{Duration, Instant};

use handoff::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{TOKEN, TestApp, WAIT, read_until, read_until_closed};

/// A response as read off the wire.
#[derive(Debug)]
pub(crate) struct Raw {
    pub(crate) status: u16,
    head: String,
    pub(crate) body: String,
}

impl Raw {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends one request exactly as given (`Connection: close`) and reads the whole answer.
pub(crate) async fn raw(
    app: &TestApp,
    method: &str,
    target: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Raw {
    let mut request =
        format!("{method} {target} HTTP/1.1\r\nHost: handoff.test\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut socket = TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    socket
        .write_all(request.as_bytes())
        .await
        .expect("send head");
    // The server may answer (413) and close before it has read a large body: that is fine.
    let _ = socket.write_all(body).await;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 8192];
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no complete answer to {method} {target:.80} within 10 s"));
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line for {method} {target:.80}: {text:.200}"));
    Raw {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// Every job as stored, to prove hostile requests changed nothing.
async fn snapshot(app: &TestApp) -> Vec<handoff::domain::Job> {
    let store = Store::connect(&app.database_url, handoff::config::DEFAULT_WRITE_QUEUE)
        .await
        .expect("open the test database");
    store.recent_jobs(1000, 0).await.expect("list jobs")
}

/// Extra request headers.
type Headers = Vec<(&'static str, String)>;
/// One hostile request: method, target, headers, body.
type Case = (&'static str, String, Headers, Vec<u8>);

/// Whether `target` is made only of characters a request line may carry (RFC 9112, RFC 3986).
fn is_valid_target(target: &str) -> bool {
    target
        .bytes()
        .all(|b| b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b))
}

fn hostile_ids() -> Vec<String> {
    vec![
        String::new(),
        "a".repeat(5000),
        "..".into(),
        "../".into(),
        "../../etc/passwd".into(),
        "%2e%2e".into(),
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd".into(),
        "%00".into(),
        "AAAAAAAAAAAAAAAAAAAAA%00".into(),
        "%0d%0aX-Injected:%201".into(),
        "'\"".into(),
        "%22%27%60".into(),
        "<script>alert(1)</script>".into(),
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E".into(),
        "%C3%A9".repeat(2000),
        "%ff%fe".into(),
        "AAAAAAAAAAAAAAAAAAAA%2F%2F".into(),
    ]
}

fn auth() -> Headers {
    vec![("Authorization", format!("Bearer {TOKEN}"))]
}

#[tokio::test]
async fn hostile_ids_query_strings_and_bodies_get_a_clear_4xx_and_change_nothing() {
    let app = TestApp::spawn().await;
    let pending = app.job_id().await;
    let done = app.job_id().await;
    assert_eq!(app.complete(&done).await.status(), 200);
    let before = snapshot(&app).await;

    let mut cases: Vec<Case> = Vec::new();
    for id in hostile_ids() {
        cases.push(("GET", format!("/jobs/{id}"), vec![], vec![]));
        cases.push(("GET", format!("/sse/connect/{id}"), vec![], vec![]));
        cases.push(("GET", format!("/api/jobs/{id}"), vec![], vec![]));
        cases.push(("POST", format!("/api/jobs/{id}/complete"), auth(), vec![]));
        cases.push((
            "POST",
            format!("/admin/jobs/{id}/complete"),
            vec![],
            b"csrf=x".to_vec(),
        ));
        cases.push(("GET", format!("/test.do?id={id}"), vec![], vec![]));
    }
    for query in [
        "",
        "?",
        "?id=",
        "?id=%00",
        "?id=a&id=b",
        "?%%%",
        "?id[]=1",
        "?id=%ff",
    ] {
        cases.push(("GET", format!("/test.do{query}"), vec![], vec![]));
    }
    for query in ["?page=-1", "?page=abc", "?page=99999999999999", "?page=%00"] {
        cases.push(("GET", format!("/admin{query}"), vec![], vec![]));
    }
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes();
    let bodies: Vec<Vec<u8>> = vec![
        b"{".to_vec(),
        b"not json".to_vec(),
        b"[]".to_vec(),
        b"\"/a\"".to_vec(),
        b"{\"moveUrl\":5}".to_vec(),
        b"{\"moveUrl\":[\"/a\"]}".to_vec(),
        b"{\"moveUrl\":{\"$ne\":1}}".to_vec(),
        b"{\"moveUrl\":\"//evil.example\"}".to_vec(),
        b"{\"moveUrl\":\"https://evil.example\"}".to_vec(),
        b"{\"moveUrl\":\"/\\u0000\"}".to_vec(),
        b"{\"moveUrl\":\"/\\\\evil.example\"}".to_vec(),
        format!("{{\"moveUrl\":\"/{}\"}}", "a".repeat(3000)).into_bytes(),
        b"\xff\xfe{}".to_vec(),
        deep(5000),
        format!("{{\"moveUrl\":{}}}", String::from_utf8(deep(3000)).unwrap()).into_bytes(),
        vec![b' '; 20_000],
        vec![b'a'; 10 * 1024 * 1024],
    ];
    for body in &bodies {
        let json = vec![("Content-Type", "application/json".to_owned())];
        let with_token = [auth(), json.clone()].concat();
        cases.push(("POST", "/api/jobs".into(), with_token.clone(), body.clone()));
        cases.push((
            "POST",
            format!("/api/jobs/{pending}/complete"),
            with_token,
            body.clone(),
        ));
        cases.push((
            "POST",
            format!("/api/jobs/{pending}/complete"),
            json,
            body.clone(),
        ));
    }
    let form = || {
        vec![(
            "Content-Type",
            "application/x-www-form-urlencoded".to_owned(),
        )]
    };
    cases.push(("POST", "/admin/login".into(), form(), vec![b'a'; 100_000]));
    cases.push((
        "POST",
        "/admin/login".into(),
        form(),
        b"token=%ff%fe".to_vec(),
    ));
    cases.push((
        "POST",
        "/admin/jobs".into(),
        form(),
        b"csrf=x&moveUrl=/a".to_vec(),
    ));
    let huge_cookie = || vec![("Cookie", format!("handoff_admin={}", "A".repeat(100_000)))];
    cases.push((
        "POST",
        "/admin/jobs".into(),
        [huge_cookie(), form()].concat(),
        b"csrf=x".to_vec(),
    ));
    cases.push((
        "GET",
        "/admin".into(),
        vec![("Cookie", "x".repeat(200_000))],
        vec![],
    ));
    let bearer = |v: String| vec![("Authorization", v)];
    for value in [
        "Bearer".to_owned(),
        "Bearer ".into(),
        format!("Bearer {}", "x".repeat(10_000)),
        "Basic Zm9vOmJhcg==".into(),
    ] {
        cases.push(("POST", "/api/jobs".into(), bearer(value.clone()), vec![]));
        cases.push((
            "POST",
            format!("/api/jobs/{pending}/complete"),
            bearer(value),
            vec![],
        ));
    }
    let unknown = "AAAAAAAAAAAAAAAAAAAAAA";
    for garbage in [
        "\tx;DROP TABLE jobs".to_owned(),
        "x".repeat(10_000),
        "-1".into(),
        "%00".into(),
    ] {
        let header = vec![("Last-Event-ID", garbage)];
        cases.push(("GET", format!("/sse/connect/{unknown}"), header, vec![]));
    }

    let started = Instant::now();
    for (method, target, headers, body) in &cases {
        let answer = raw(&app, method, target, headers, body).await;
        let what = format!(
            "{method} {target:.80} -> {} {:.200}",
            answer.status, answer.body
        );
        assert!((400..500).contains(&answer.status), "not a 4xx: {what}");
        // The HTTP parser itself answers a bare 400 (request line not HTTP) or 431 (head over
        // 128 KiB) before any of our code runs; the status alone says what was wrong there.
        if answer.status != 431 && is_valid_target(target) {
            assert!(
                !answer.body.trim().is_empty(),
                "a 4xx says what was wrong: {what}"
            );
            if target.starts_with("/api/") || target.starts_with("/sse/") {
                assert!(
                    answer.body.contains("\"error\""),
                    "the API answers JSON errors: {what}"
                );
            }
        }
        assert!(
            !answer.body.contains("<script>alert"),
            "echoed unescaped: {what}"
        );
        assert!(
            answer.header("X-Injected").is_none(),
            "header injection: {what}"
        );
    }
    eprintln!(
        "{} hostile requests in {:?}",
        cases.len(),
        started.elapsed()
    );

    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200, "the server stays up");
    assert_eq!(snapshot(&app).await, before, "nothing stored changed");
}

#[tokio::test]
async fn wrong_methods_get_405_with_allow_and_a_json_reason() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    let cases = [
        ("PUT", "/api/jobs".to_owned(), "POST"),
        ("DELETE", format!("/api/jobs/{id}"), "GET, HEAD"),
        ("GET", format!("/api/jobs/{id}/complete"), "POST"),
        ("POST", format!("/sse/connect/{id}"), "GET, HEAD"),
        ("PATCH", format!("/jobs/{id}"), "GET, HEAD"),
        ("GET", "/jobs".to_owned(), "POST"),
        ("POST", "/".to_owned(), "GET, HEAD"),
        ("GET", "/admin/login".to_owned(), "POST"),
        ("DELETE", "/admin".to_owned(), "GET, HEAD"),
        ("POST", "/healthz".to_owned(), "GET, HEAD"),
        ("POST", "/readyz".to_owned(), "GET, HEAD"),
        ("PUT", "/metrics".to_owned(), "GET, HEAD"),
    ];
    for (method, target, allowed) in cases {
        let answer = raw(&app, method, &target, &[], b"").await;
        assert_eq!(answer.status, 405, "{method} {target}: {answer:?}");
        assert_eq!(answer.header("Allow"), Some(allowed), "{method} {target}");
        let body: serde_json::Value = serde_json::from_str(&answer.body).expect("a JSON body");
        assert!(body["error"].as_str().unwrap().contains(allowed), "{body}");
    }
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_naming_the_limit() {
    let app = TestApp::spawn().await;
    let over = handoff::routes::BODY_LIMIT + 1;
    let token = format!("token={}", "a".repeat(over));
    let requests = [
        app.client
            .post(app.url("/api/jobs"))
            .bearer_auth(TOKEN)
            .body(vec![b' '; over]),
        app.client
            .post(app.url("/admin/login"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(token),
    ];
    for request in requests {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 413, "{}", response.url());
        let body: serde_json::Value = response.json().await.unwrap();
        let want = format!("{} bytes", handoff::routes::BODY_LIMIT);
        assert!(body["error"].as_str().unwrap().contains(&want), "{body}");
    }
}

#[tokio::test]
async fn a_slow_loris_sending_headers_byte_by_byte_is_cut_off() {
    let app = TestApp::spawn().await;
    let mut socket = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    // A header line every 200 ms, never the blank line that ends the head.
    let cut_off = loop {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "still connected after 15 s"
        );
        if socket.write_all(b"X-Slow: a\r\n").await.is_err() {
            break true;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    };
    assert!(cut_off);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    eprintln!("slow loris cut off after {:?}", started.elapsed());
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
}

/// A keep-alive connection that has had one complete request answered.
async fn used_connection(app: &TestApp) -> TcpStream {
    let mut socket = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: handoff.test\r\n\r\n")
        .await
        .unwrap();
    // The last line of the health answer.
    read_until(&mut socket, "redis: ").await;
    socket
}

#[tokio::test]
async fn a_second_request_whose_head_stalls_gets_408_and_the_connection_closes() {
    let app = TestApp::spawn().await;
    let mut socket = used_connection(&app).await;
    socket.write_all(b"G").await.unwrap();
    let (took, answer) = read_until_closed(&mut socket, Duration::from_secs(15)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within 5 s"), "{answer}");
    assert!(
        answer.contains("X-Frame-Options: DENY"),
        "the security headers: {answer}"
    );
    assert!(took >= Duration::from_secs(4), "cut after {took:?}");
    eprintln!("a stalled second head was cut after {took:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_closes_after_the_keep_alive_timeout() {
    let app = TestApp::spawn().await;
    let mut socket = used_connection(&app).await;
    let (took, answer) = read_until_closed(&mut socket, Duration::from_secs(15)).await;
    assert_eq!(answer, "", "an idle connection is closed without a word");
    assert!(took >= Duration::from_secs(4), "closed after {took:?}");
    eprintln!("an idle keep-alive connection closed after {took:?}");
}

#[tokio::test]
async fn a_stalled_request_body_gets_408_and_the_connection_closes() {
    let app = TestApp::spawn().await;
    let mut socket = used_connection(&app).await;
    let head = format!(
        "POST /api/jobs HTTP/1.1\r\nHost: handoff.test\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{{\"moveUrl\""
    );
    let before = snapshot(&app).await;
    socket.write_all(head.as_bytes()).await.unwrap();
    let (took, answer) = read_until_closed(&mut socket, Duration::from_secs(20)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("the request body did not arrive within 10 s"),
        "{answer}"
    );
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-frame-options: deny"),
        "{answer}"
    );
    assert!(took >= Duration::from_secs(9), "cut after {took:?}");
    assert_eq!(snapshot(&app).await, before, "no job was created");
}

#[tokio::test]
async fn an_event_stream_on_a_reused_connection_is_not_cut_while_its_client_is_silent() {
    // No keep-alive comment for a minute: the client receives nothing, and sends nothing.
    let app = TestApp::spawn_with(|c| c.keep_alive = Duration::from_secs(60)).await;
    let id = app.job_id().await;
    let mut socket = used_connection(&app).await;
    let request = format!(
        "GET /sse/connect/{id} HTTP/1.1\r\nHost: handoff.test\r\nAccept: text/event-stream\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(WAIT, socket.read(&mut buf))
        .await
        .expect("the stream answers")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Longer than the head, body and keep-alive timeouts together.
    let quiet = tokio::time::timeout(Duration::from_secs(16), socket.read(&mut buf)).await;
    if let Ok(read) = quiet {
        let read = read.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
        assert!(
            matches!(&read, Ok(text) if !text.is_empty() && !text.contains("408")),
            "the stream was cut: {read:?}"
        );
    }
    assert_eq!(app.complete(&id).await.status(), 200);
    read_until(&mut socket, r#""status":"result""#).await;
}

#[tokio::test]
async fn invisible_format_characters_in_progress_and_failure_messages_get_400_saying_why() {
    let app = TestApp::spawn().await;
    let id = app.job_id().await;
    // U+202E turns "cod.exe" around on screen; U+200B and U+2066 hide text or reorder it.
    for (what, message) in [
        ("progress", "Rendering \u{202E}exe.doc"),
        ("progress", "Done\u{200B}"),
        ("fail", "Failed: \u{2066}see admin\u{2069}"),
        ("fail", "\u{FEFF}ok"),
    ] {
        let answer = app
            .api_post(
                &format!("/api/jobs/{id}/{what}"),
                Some(serde_json::json!({ "message": message })),
            )
            .await;
        assert_eq!(answer.status(), 400, "{what} {message:?}");
        let body = answer.text().await.unwrap();
        assert!(body.contains("invisible format characters"), "{body}");
    }
    let job = app.job(&id).await;
    assert_eq!(job["status"], "pending", "nothing was stored: {job}");
    assert!(job["progress"].is_null(), "{job}");
    let plain = app
        .api_post(
            &format!("/api/jobs/{id}/progress"),
            Some(serde_json::json!({ "message": "Étape 3 — vérification ✓" })),
        )
        .await;
    assert_eq!(plain.status(), 200, "visible non-ASCII text still passes");
}
