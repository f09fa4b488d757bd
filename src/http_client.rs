//! The one outgoing HTTP client, as the webhook sender (async) and the job commands (blocking)
//! build it: reqwest, HTTP/1.1, rustls on ring verifying with the system's CA store. It follows
//! no redirect (a webhook goes to `HANDOFF_WEBHOOK_URL` and nowhere else; a job command's POST
//! redirected would lose its token) and takes no proxy from the environment.

/// reqwest's builder with those settings, for a client that calls `url`'s origin only. For an
/// `http://` URL TLS is never used, so the system's CA store is not read: a machine without one
/// can still call it. `reqwest::blocking::ClientBuilder::from` makes it a blocking one.
pub fn builder(url: &url::Url) -> reqwest::ClientBuilder {
    // The first call makes ring the process's rustls provider; a later one finds it there.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = reqwest::Client::builder()
        .http1_only()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("Handoff/", env!("CARGO_PKG_VERSION")));
    if url.scheme() == "https" {
        builder
    } else {
        builder.tls_certs_only([])
    }
}

/// A failure as its whole chain says it (reqwest's top error alone says little: "error sending
/// request"), without the URL, whose path or query may hold a secret.
pub fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
