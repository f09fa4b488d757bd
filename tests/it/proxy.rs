//! The shipped nginx.conf as strangers meet it, run for real in front of the app: plain HTTP only
//! redirects, HTTPS sends HSTS, nginx's own answers carry the security headers, per-address
//! limits on streams and on the demo form, the client's `Forwarded` header dropped, and token
//! guessing that, behind nginx set up as the README says, slows down only the guesser.
//!
//! Test clients reach nginx from several loopback addresses (127.0.0.2, 127.0.0.3, …): to nginx,
//! as to Handoff behind it, they are different browsers.

use std::net::IpAddr;
use std::process::Command;

use futures_util::StreamExt as _;
use handoff::limits::TrustedProxies;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpSocket, TcpStream};

use crate::support::nginx::Nginx;
use crate::support::{TOKEN, TestApp, WAIT, client, client_builder, read_until};

const SECURITY_HEADERS: [&str; 4] = [
    "content-security-policy",
    "x-content-type-options",
    "referrer-policy",
    "x-frame-options",
];

/// A client whose connections come from `from`, a loopback address.
fn client_from(from: &str) -> reqwest::Client {
    client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
}

/// The app as the README says to run it behind nginx: nginx's address is a trusted proxy.
fn behind_nginx(c: &mut handoff::config::Config) {
    c.trusted_proxies = TrustedProxies::parse("127.0.0.1").unwrap();
}

/// Each security header once, as on Handoff's own answers; `what` names the answer.
fn assert_security_headers(headers: &reqwest::header::HeaderMap, what: &str) {
    for name in SECURITY_HEADERS {
        assert_eq!(
            headers.get_all(name).iter().count(),
            1,
            "{what}: {name} once: {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn plain_http_only_redirects_to_https_except_for_health_checks() {
    let app = TestApp::spawn().await;
    let nginx = Nginx::start(&[app.port]);
    let client = client();
    for (method, path) in [
        ("GET", "/admin?page=2"),
        ("POST", "/admin/login"),
        ("GET", "/"),
        ("POST", "/api/jobs"),
    ] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let answer = client
            .request(method.clone(), nginx.redirect_url(path))
            .header("Host", "handoff.example")
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 301, "{method} {path}");
        assert_eq!(
            answer.headers()["location"],
            format!("https://handoff.example{path}").as_str(),
            "{method} {path}"
        );
        assert_security_headers(answer.headers(), "a redirect");
        assert!(
            !answer.headers().contains_key("strict-transport-security"),
            "no HSTS over plain HTTP"
        );
    }
    assert_eq!(
        app.metric("handoff_jobs_created_total").await,
        0.0,
        "nothing reached the app"
    );
    let health = client
        .get(nginx.redirect_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        health.status(),
        200,
        "load balancers still check over plain HTTP"
    );
    assert!(health.text().await.unwrap().starts_with("ok\n"));
}

/// The response head of `GET url` over TLS, through curl (reqwest here has no TLS).
fn tls_head(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sk", "-D", "-", "-o", "/dev/null", url])
        .output()
        .expect("curl (scripts/test.sh installs it)");
    assert!(out.status.success(), "curl {url}: {out:?}");
    String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn https_sends_hsts_and_nginxs_own_answers_carry_handoffs_security_headers() {
    let mut app = TestApp::spawn().await;
    let nginx = Nginx::start(&[app.port]);
    for path in ["/", "/metrics"] {
        let head = tls_head(&nginx.https_url(path));
        assert!(
            head.contains("strict-transport-security: max-age=31536000"),
            "{path}: {head}"
        );
        assert_eq!(
            head.matches("content-security-policy:").count(),
            1,
            "{head}"
        );
    }

    let direct = app.get("/").await;
    let proxied = client().get(nginx.plain_url("/")).send().await.unwrap();
    assert_security_headers(proxied.headers(), "a proxied page");
    let metrics = client()
        .get(nginx.plain_url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 404);
    assert_security_headers(metrics.headers(), "nginx's 404");
    for name in SECURITY_HEADERS {
        assert_eq!(
            metrics.headers()[name],
            direct.headers()[name],
            "nginx.conf and src/startup.rs say the same {name}"
        );
    }

    app.stop().await;
    let down = client().get(nginx.plain_url("/")).send().await.unwrap();
    assert_eq!(down.status(), 502);
    assert_security_headers(down.headers(), "nginx's 502");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn nginx_drops_the_clients_forwarded_header() {
    let app = TestApp::spawn_with(behind_nginx).await;
    let nginx = Nginx::start(&[app.port]);
    // Over plain HTTP a client claims, in `Forwarded`, to have come over HTTPS. Were it passed
    // on, Handoff (trusting nginx) would believe it and mark the cookie Secure.
    let login = client()
        .post(nginx.plain_url("/admin/login"))
        .header("Forwarded", "for=192.0.2.1;proto=https")
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"].to_str().unwrap();
    assert!(!cookie.contains("Secure"), "{cookie}");
}

/// A stream request from `from` through nginx on a raw socket; returns the socket once the
/// answer's head has arrived, and the head.
async fn stream_from(from: &str, nginx: &Nginx, id: &str) -> (TcpStream, String) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let addr = format!("127.0.0.1:{}", nginx.plain_port).parse().unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET /sse/connect/{id} HTTP/1.1\r\nHost: handoff.test\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let head = read_until(&mut stream, "\r\n\r\n").await;
    (stream, head)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn through_nginx_one_address_holds_at_most_64_streams() {
    // Handoff's own cap is lifted, so what refuses the 65th is nginx's limit_conn.
    let app = TestApp::spawn_with(|c| {
        behind_nginx(c);
        c.max_streams_per_client = None;
    })
    .await;
    let nginx = Nginx::start(&[app.port]);
    let id = app.job_id().await;
    let mut open = Vec::new();
    for _ in 0..64 {
        let (stream, head) = stream_from("127.0.0.2", &nginx, &id).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        open.push(stream);
    }
    let (_, refused) = stream_from("127.0.0.2", &nginx, &id).await;
    assert!(refused.starts_with("HTTP/1.1 429"), "the 65th: {refused}");
    assert!(refused.contains("Retry-After: 1"), "{refused}");
    let (_other, head) = stream_from("127.0.0.3", &nginx, &id).await;
    assert!(head.starts_with("HTTP/1.1 200"), "another address: {head}");
    assert!(
        app.metric_reaches("handoff_open_streams", 65.0, WAIT).await,
        "the refused one never reached Handoff"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn through_nginx_a_burst_of_stream_opens_from_one_address_is_cut_short() {
    let app = TestApp::spawn_with(behind_nginx).await;
    let nginx = Nginx::start(&[app.port]);
    let url = nginx.plain_url("/sse/connect/AAAAAAAAAAAAAAAAAAAAAA");
    let client = client_from("127.0.0.2");
    let started = std::time::Instant::now();
    let statuses: Vec<(u16, Option<String>)> = futures_util::stream::iter(0..200)
        .map(|_| async {
            let answer = client.get(&url).send().await.unwrap();
            let retry_after = answer
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (answer.status().as_u16(), retry_after)
        })
        .buffer_unordered(20)
        .collect()
        .await;
    let took = started.elapsed();
    let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    let passed = statuses.iter().filter(|(s, _)| *s == 404).count();
    // A burst of 100, then 10 a second.
    let allowed = 101 + (took.as_secs_f64() * 10.0).ceil() as usize;
    assert!(
        (100..=allowed).contains(&passed),
        "{passed} of 200 passed in {took:?}"
    );
    assert_eq!(passed + refused.len(), 200, "{statuses:?}");
    assert!(refused.iter().all(|(_, r)| r.as_deref() == Some("1")));
    let other = client_from("127.0.0.3").get(&url).send().await.unwrap();
    assert_eq!(other.status(), 404, "another address opens as usual");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn through_nginx_the_demo_form_takes_a_burst_of_ten_then_30_a_minute_per_address() {
    let app = TestApp::spawn_with(behind_nginx).await;
    let nginx = Nginx::start(&[app.port]);
    let client = client_from("127.0.0.2");
    let started = std::time::Instant::now();
    let mut refused_by_nginx_count = 0;
    for _ in 0..30 {
        let answer = client
            .post(nginx.plain_url("/jobs"))
            .form(&[("start", "1")])
            .send()
            .await
            .unwrap();
        if refused_by_nginx(answer).await {
            refused_by_nginx_count += 1;
        }
    }
    let took = started.elapsed();
    let passed = 30 - refused_by_nginx_count;
    let allowed = 11 + (took.as_secs_f64() / 2.0).ceil() as usize;
    assert!(
        (11..=allowed).contains(&passed),
        "{passed} of 30 demo jobs passed nginx in {took:?}"
    );
    let other = client_from("127.0.0.3")
        .post(nginx.plain_url("/jobs"))
        .form(&[("start", "1")])
        .send()
        .await
        .unwrap();
    assert_ne!(other.status(), 429, "another address starts its demo");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn behind_nginx_a_token_guesser_is_slowed_down_and_the_operator_is_not() {
    let app = TestApp::spawn_with(behind_nginx).await;
    let nginx = Nginx::start(&[app.port]);
    let guesser = client_from("127.0.0.2");
    let operator = client_from("127.0.0.3");
    let create = |client: &reqwest::Client, token: &str| {
        client
            .post(nginx.plain_url("/api/jobs"))
            .bearer_auth(token)
            // A guesser may name anyone in X-Forwarded-For; nginx appends the real address.
            .header("X-Forwarded-For", "127.0.0.3")
            .send()
    };
    for _ in 0..5 {
        let status = create(&guesser, "wrong-token-guess")
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401);
    }
    let blocked = create(&guesser, "wrong-token-guess").await.unwrap();
    assert_eq!(blocked.status(), 429);
    assert!(blocked.headers().contains_key("retry-after"));
    assert_eq!(
        create(&operator, TOKEN).await.unwrap().status(),
        201,
        "the operator's jobs go through"
    );
    let login = operator
        .post(nginx.plain_url("/admin/login"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303, "and so does the operator's login");
}

/// The `map $remote_addr $client { … }` block of the shipped nginx.conf, with the address taken
/// from the query (`?ip=`) instead of the connection, and the default (an address nginx keys
/// whole) written out as `whole:` and the address.
fn client_map_from_query() -> String {
    let conf = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/nginx.conf")).unwrap();
    let start = conf
        .find("    map $remote_addr $client {")
        .expect("nginx.conf maps $remote_addr to $client");
    let end = start + conf[start..].find("\n    }\n").unwrap() + "\n    }\n".len();
    let block = &conf[start..end];
    assert!(block.contains("default $binary_remote_addr;"), "{block}");
    block
        .replace("default $binary_remote_addr;", "default \"whole:$arg_ip\";")
        .replace("map $remote_addr", "map $arg_ip")
}

/// An address whose groups are each zero or not at random, so that every place the `::` of its
/// written form can stand in comes up.
fn random_ipv6() -> std::net::Ipv6Addr {
    let mut groups = [0u16; 8];
    for group in &mut groups {
        if rand::random_bool(0.5) {
            *group = rand::random_range(1..=u16::MAX);
        }
    }
    groups.into()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn nginx_counts_an_ipv6_client_by_its_64_as_handoff_does() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::support::free_port();
    let conf = format!(
        "master_process off;\n\
         events {{}}\n\
         http {{\n access_log off;\n{map}\n \
         server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"$client\"; }} }}\n}}\n",
        map = client_map_from_query(),
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let binary = crate::support::nginx::nginx_binary();
    let mut nginx = crate::support::nginx::nginx_command(&binary, dir.path())
        .spawn()
        .unwrap();
    let client = client();
    let key_of = |ip: String| {
        let client = client.clone();
        async move {
            for _ in 0..50 {
                if let Ok(answer) = client
                    .get(format!("http://127.0.0.1:{port}/?ip={ip}"))
                    .send()
                    .await
                {
                    return answer.text().await.unwrap();
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("nginx did not answer on port {port}");
        }
    };
    let mut addresses: Vec<std::net::Ipv6Addr> = ["::", "::1", "1::", "2001:db8::", "1:2:3:4::"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    addresses.extend((0..3000).map(|_| random_ipv6()));
    for ip in addresses {
        let written = ip.to_string();
        if written.contains('.') {
            // IPv4-mapped: Handoff counts the IPv4 address, nginx the whole address.
            continue;
        }
        let IpAddr::V6(network) = handoff::limits::client_key(IpAddr::V6(ip)) else {
            unreachable!("an address that is not IPv4-mapped stays IPv6")
        };
        let s = network.segments();
        let wanted = format!("{:x}:{:x}:{:x}:{:x}", s[0], s[1], s[2], s[3]);
        assert_eq!(key_of(written.clone()).await, wanted, "{written}");
    }
    for ip in ["127.0.0.2", "192.0.2.1"] {
        assert_eq!(key_of(ip.into()).await, format!("whole:{ip}"));
    }
    let _ = nginx.kill();
    let _ = nginx.wait();
}

/// Whether `answer` is a refusal by nginx's own limits (not one by Handoff).
async fn refused_by_nginx(answer: reqwest::Response) -> bool {
    if answer.status() != 429 {
        return false;
    }
    let retry_after = answer.headers().get("retry-after").cloned();
    let by_nginx = answer
        .text()
        .await
        .unwrap()
        .contains("<center>nginx</center>");
    if by_nginx {
        assert_eq!(retry_after.unwrap(), "1");
    }
    by_nginx
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn through_nginx_admin_logins_take_a_burst_of_ten_then_ten_a_minute_per_client() {
    let app = TestApp::spawn_with(behind_nginx).await;
    let nginx = Nginx::start(&[app.port]);
    let login = |from: &str| {
        client_from(from)
            .post(nginx.plain_url("/admin/login"))
            .form(&[("token", "not-the-password")])
            .send()
    };
    let started = std::time::Instant::now();
    let mut refused = 0;
    for _ in 0..25 {
        if refused_by_nginx(login("127.0.0.2").await.unwrap()).await {
            refused += 1;
        }
    }
    let passed = 25 - refused;
    let allowed = 11 + (started.elapsed().as_secs_f64() / 6.0).ceil() as usize;
    assert!(
        (11..=allowed).contains(&passed),
        "{passed} of 25 logins passed nginx in {:?}",
        started.elapsed()
    );
    let other = login("127.0.0.3").await.unwrap();
    assert!(!refused_by_nginx(other).await, "another client logs in");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn through_nginx_lookups_take_a_burst_of_500_then_50_a_second_per_client() {
    let app = TestApp::spawn_with(behind_nginx).await;
    let nginx = Nginx::start(&[app.port]);
    let client = client_from("127.0.0.2");
    let paths = [
        "/api/jobs/AAAAAAAAAAAAAAAAAAAAAA",
        "/jobs/AAAAAAAAAAAAAAAAAAAAAA",
        "/test.do?id=AAAAAAAAAAAAAAAAAAAAAA",
    ];
    let started = std::time::Instant::now();
    let refusals: Vec<bool> = futures_util::stream::iter(0..800)
        .map(|i| {
            let url = nginx.plain_url(paths[i % paths.len()]);
            let client = client.clone();
            async move { refused_by_nginx(client.get(url).send().await.unwrap()).await }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let took = started.elapsed();
    let passed = refusals.iter().filter(|r| !**r).count();
    let allowed = 501 + (took.as_secs_f64() * 50.0).ceil() as usize;
    assert!(
        (500..=allowed).contains(&passed),
        "{passed} of 800 lookups passed nginx in {took:?}"
    );
    let other = client_from("127.0.0.3")
        .get(nginx.plain_url(paths[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 404, "another client looks up as usual");
    let created = client
        .post(nginx.plain_url("/api/jobs"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "other calls are not lookups");
}

/// A request from `from` to nginx's plain port whose head is `head` (sent as is), on a raw socket.
async fn raw_from(from: &str, nginx: &Nginx, head: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let addr = format!("127.0.0.1:{}", nginx.plain_port).parse().unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

/// A POST whose body never comes: nginx holds it as a request in progress while it waits.
const STALLED_POST: &str =
    "POST /api/jobs HTTP/1.1\r\nHost: handoff.test\r\nContent-Length: 10\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn through_nginx_one_client_has_at_most_128_requests_in_progress() {
    let app = TestApp::spawn_with(behind_nginx).await;
    let nginx = Nginx::start(&[app.port]);
    let mut held = Vec::new();
    for _ in 0..128 {
        held.push(raw_from("127.0.0.2", &nginx, STALLED_POST).await);
    }
    // nginx reads each head on its own time; let it take all 128 in.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let health = |from: &str| client_from(from).get(nginx.plain_url("/healthz")).send();
    let refused = health("127.0.0.2").await.unwrap();
    assert!(refused_by_nginx(refused).await, "the 129th request");
    assert_eq!(health("127.0.0.3").await.unwrap().status(), 200);
    drop(held);
    let mut served = false;
    for _ in 0..50 {
        if health("127.0.0.2").await.unwrap().status() == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(served, "the client is served again once its requests end");
}

/// How long until nginx answers or closes `stream`, and what it sent.
async fn until_closed(mut stream: TcpStream) -> (std::time::Duration, String) {
    use tokio::io::AsyncReadExt as _;
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        stream.read_to_end(&mut got),
    )
    .await;
    assert!(read.is_ok(), "nginx still holds the connection after 30 s");
    (
        started.elapsed(),
        String::from_utf8_lossy(&got).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx: run scripts/test.sh"]
async fn through_nginx_a_stalled_request_head_or_body_is_cut_after_ten_seconds() {
    let app = TestApp::spawn_with(behind_nginx).await;
    let nginx = Nginx::start(&[app.port]);
    let head = raw_from(
        "127.0.0.2",
        &nginx,
        "GET / HTTP/1.1\r\nHost: handoff.test\r\n",
    )
    .await;
    let body = raw_from("127.0.0.3", &nginx, &format!("{STALLED_POST}ab")).await;
    let ((head_took, _), (body_took, body_answer)) =
        tokio::join!(until_closed(head), until_closed(body));
    let window = std::time::Duration::from_secs(9)..std::time::Duration::from_secs(15);
    assert!(window.contains(&head_took), "a stalled head: {head_took:?}");
    assert!(window.contains(&body_took), "a stalled body: {body_took:?}");
    // nginx logs a 408 and closes without writing it.
    assert!(
        body_answer.is_empty() || body_answer.starts_with("HTTP/1.1 408"),
        "{body_answer}"
    );
    assert_eq!(
        app.metric("handoff_jobs_created_total").await,
        0.0,
        "the stalled POST never reached Handoff"
    );
}
