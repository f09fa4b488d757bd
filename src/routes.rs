//! The HTTP interface, one module per area: it translates between HTTP and the use cases
//! ([`crate::jobs`]) and maps their errors to answers ([`error`]). `configure` is the whole route
//! table; [`AppState`] is what every handler shares.

pub mod admin;
pub mod api;
pub mod error;
pub mod openapi;
pub mod ops;
pub mod pages;
pub mod sse;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use actix_web::body::{self, EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::UrlencodedError;
use actix_web::http::{Method, StatusCode, header};
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers, Next, from_fn};
use actix_web::{FromRequest, Handler, HttpRequest, HttpResponse, Responder, Route, guard, web};

use crate::auth::{self, Secrets};
use crate::domain::JobId;
use crate::jobs::Jobs;
use crate::limits::{DemoJobLimit, GuessThrottle, LookupBudget, StreamLimits, TrustedProxies};
use crate::metrics::Metrics;
use crate::sessions::AdminSessions;
use error::{AppError, ErrorBody};
use sse::SseSettings;

/// What every handler shares; built once, outside the server closure, so all workers see one hub.
#[derive(Debug)]
pub struct AppState {
    pub jobs: Jobs,
    pub metrics: Metrics,
    pub secrets: Secrets,
    pub sessions: AdminSessions,
    /// `HANDOFF_PUBLIC_URL` is `https`: browsers only ever reach us over TLS.
    pub public_https: bool,
    /// `HANDOFF_PUBLIC_URL`'s origin (`https://example.com`): the only page a browser's form
    /// post is taken from, when it is set.
    pub public_origin: Option<String>,
    pub sse: SseSettings,
    /// Stream caps and counts; [`sse`] takes a permit per stream.
    pub limits: StreamLimits,
    /// Whose `X-Forwarded-For` names the client.
    pub proxies: TrustedProxies,
    /// Wrong bearer tokens per client address.
    pub token_guesses: GuessThrottle,
    /// Wrong passwords on the admin login form per client address: a record apart from the
    /// bearer tokens', so that a page that makes its visitors' browsers post wrong passwords
    /// cannot lock a job runner at the same address out of the API.
    pub login_guesses: GuessThrottle,
    /// Whether the warning about forwarding headers from an untrusted peer was logged: once per
    /// app, or a flood of such requests would flood the log.
    pub untrusted_forwarding_warned: AtomicBool,
    /// The demo jobs each client address may start; `None` when the demo is off.
    pub demo: Option<DemoJobLimit>,
    /// The unknown job ids each client address may ask about.
    pub lookups: LookupBudget,
    /// Set when the instance starts draining before it stops: `/readyz` answers `503` from
    /// then on, so a load balancer sends new streams and writes elsewhere.
    pub draining: AtomicBool,
}

impl AppState {
    /// The address `req` comes from, believing `X-Forwarded-For` from trusted proxies only.
    fn client_addr(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr().map(|a| a.ip());
        self.warn_of_untrusted_forwarding(req, peer);
        let forwarded_for = req
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok());
        self.proxies.client_addr(peer, forwarded_for)
    }

    /// Logs once when a peer that is not a trusted proxy sends forwarding headers: most likely
    /// a proxy the operator forgot to name in `HANDOFF_TRUSTED_PROXIES`, behind which every
    /// client counts as one address (one stream cap, one token-guess record for all of them).
    fn warn_of_untrusted_forwarding(&self, req: &HttpRequest, peer: Option<IpAddr>) {
        let forwarding = ["x-forwarded-for", "x-forwarded-proto"]
            .iter()
            .any(|name| req.headers().contains_key(*name));
        if !forwarding
            || self.proxies.trusts(peer)
            || self
                .untrusted_forwarding_warned
                .swap(true, Ordering::Relaxed)
        {
            return;
        }
        let peer = peer.map_or_else(|| "an unknown peer".to_owned(), |ip| ip.to_string());
        log::warn!(
            "requests from {peer} carry X-Forwarded-For/-Proto, but {peer} is not in \
             HANDOFF_TRUSTED_PROXIES, so those headers are ignored and every client behind it \
             counts as one address (one stream cap and one token-guess throttle for all); if \
             {peer} is your proxy, set HANDOFF_TRUSTED_PROXIES={peer} (logged once)"
        );
    }

    /// Lets a lookup of jobs by `req`'s client in while its budget for unknown ids lasts
    /// (`429` past it); the answer names the client, for [`LookupBudget::missed`].
    fn lookup(&self, req: &HttpRequest) -> Result<Option<IpAddr>, AppError> {
        let client = self.client_addr(req);
        self.lookups
            .check(client)
            .map_err(AppError::TooManyLookups)?;
        Ok(client)
    }

    /// Looks up one job for `req`'s client, under its lookup budget.
    async fn look_up(&self, req: &HttpRequest, id: &JobId) -> Result<crate::domain::Job, AppError> {
        let client = self.lookup(req)?;
        self.jobs.get(id).await.map_err(|err| {
            if matches!(err, crate::jobs::JobsError::NotFound) {
                self.lookups.missed(client, 1);
            }
            AppError::from(err)
        })
    }

    /// Whether the browser reached us over TLS: a trusted proxy's `X-Forwarded-Proto` or
    /// `Forwarded` says so, or this listener itself is TLS. Anyone else's claim is ignored.
    fn is_tls(&self, req: &HttpRequest) -> bool {
        let peer = req.peer_addr().map(|a| a.ip());
        self.warn_of_untrusted_forwarding(req, peer);
        if self.proxies.trusts(peer) {
            req.connection_info().scheme() == "https"
        } else {
            req.app_config().secure()
        }
    }

    /// Checks `req`'s `Authorization: Bearer <token>` against the named API tokens; a right one
    /// is logged and counted by its name (never the token). A wrong token counts as a guess from
    /// the client's address; while the address must wait, no token is even checked (`429`). A
    /// request with no bearer token at all guesses nothing and is simply refused.
    fn authorize_bearer(&self, req: &HttpRequest) -> Result<(), AppError> {
        let Some(token) = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(auth::bearer_token)
        else {
            return Err(AppError::Unauthorized);
        };
        let client = self.client_addr(req);
        self.token_guesses
            .check(client)
            .map_err(AppError::TooManyGuesses)?;
        if let Some(name) = self.secrets.token_name(token) {
            self.token_guesses.succeeded(client);
            self.metrics
                .api_calls
                .get_or_create(&[("token", name.to_owned())])
                .inc();
            log::info!("{} {} by API token {name}", req.method(), req.path());
            Ok(())
        } else {
            self.token_guesses.failed(client);
            Err(AppError::Unauthorized)
        }
    }

    /// Whether cookies must be `Secure`: the public URL is `https`, or this request came over
    /// TLS (as a trusted proxy reports it).
    fn cookie_secure(&self, req: &HttpRequest) -> bool {
        self.public_https || self.is_tls(req)
    }
}

impl AppState {
    /// Whether a browser sent the form post `req` from a page that is not this site's own: a
    /// forged post from another site, or a page served under another host name that resolves
    /// to us (DNS rebinding). Every form post (the demo form and every admin form, the login
    /// included) is refused when it is.
    ///
    /// `Sec-Fetch-Site` (sent by every current browser) must say `same-origin`, or `none` (typed,
    /// bookmarked); that is enough unless `HANDOFF_PUBLIC_URL` is set. The page's origin is
    /// `Origin`, or the `Referer`'s when there is no `Origin` (older browsers); `Origin: null` (a
    /// sandboxed or privacy-hidden page) is no origin of ours. With `HANDOFF_PUBLIC_URL` set,
    /// that origin must be the public URL's: a rebound host name is same-origin to the browser,
    /// so only the configured origin tells it apart. Without it, the origin's host must be the
    /// host the request was sent to (checked for browsers without `Sec-Fetch-Site`); the
    /// ports are not compared, because a proxy may pass on `Host` without its port (the shipped
    /// nginx.conf does). A request that names no page at all is not a browser's cross-site
    /// request (browsers send `Origin` on every cross-site POST): it is a script's own, from its
    /// own address, which per-address limits count.
    fn foreign_post(&self, req: &HttpRequest) -> bool {
        let headers = req.headers();
        if let Some(site) = headers.get("sec-fetch-site") {
            if !matches!(site.as_bytes(), b"same-origin" | b"none") {
                return true;
            }
            if self.public_origin.is_none() {
                return false;
            }
        }
        let page = headers
            .get(header::ORIGIN)
            .or_else(|| headers.get(header::REFERER))
            .map(|value| value.to_str().ok().and_then(|v| url::Url::parse(v).ok()));
        let Some(page) = page else {
            return false;
        };
        let Some(page) = page.filter(|url| url.has_host()) else {
            return true;
        };
        if let Some(public) = &self.public_origin {
            return page.origin().ascii_serialization() != *public;
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<actix_web::http::uri::Authority>().ok())
            .map(|authority| authority.host().to_owned())
            .or_else(|| req.uri().host().map(str::to_owned));
        match (page.host_str(), host) {
            (Some(page), Some(host)) => !page.eq_ignore_ascii_case(&host),
            _ => true,
        }
    }
}

/// Largest request body we read: a job request is a few hundred bytes.
pub const BODY_LIMIT: usize = 16 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(BODY_LIMIT))
        .app_data(
            web::FormConfig::default()
                .limit(BODY_LIMIT)
                .error_handler(|err, _| match err {
                    UrlencodedError::Overflow { .. } => AppError::PayloadTooLarge.into(),
                    err => AppError::BadRequest(format!("form data is invalid: {err}")).into(),
                }),
        )
        .app_data(web::QueryConfig::default().error_handler(|err, _| {
            AppError::BadRequest(format!("query string is invalid: {err}")).into()
        }))
        .app_data(web::PathConfig::default().error_handler(|_, _| {
            AppError::BadRequest("the path is not valid UTF-8".into()).into()
        }))
        .service(web::resource("/").route(read(pages::index)))
        .service(web::resource("/jobs").post(pages::create_demo_job))
        .service(web::resource("/jobs/{id}").route(read(pages::wait)))
        .service(web::resource("/test.do").route(read(pages::result)))
        .service(web::resource("/static/{file}").route(read(pages::static_file)))
        .service(
            web::resource("/sse/connect/{id}")
                .route(read(sse::connect))
                .wrap(from_fn(head_without_stream)),
        )
        .service(
            web::resource("/sse/watch")
                .route(read(sse::watch))
                .wrap(from_fn(head_without_stream)),
        )
        .service(web::resource("/api/openapi.json").route(read(openapi::document)))
        .service(web::resource("/api/jobs").post(api::create))
        .service(web::resource("/api/jobs/batch").post(api::batch))
        .service(web::resource("/api/jobs/{id}").route(read(api::show)))
        .service(web::resource("/api/jobs/{id}/complete").post(api::complete))
        .service(web::resource("/api/jobs/{id}/progress").post(api::progress))
        .service(web::resource("/api/jobs/{id}/fail").post(api::fail))
        .service(web::resource("/admin").route(read(admin::page)))
        .service(web::resource("/admin/login").post(admin::login))
        .service(web::resource("/admin/logout").post(admin::logout))
        .service(web::resource("/admin/jobs").post(admin::create))
        .service(web::resource("/admin/jobs/{id}/complete").post(admin::complete))
        .service(web::resource("/admin/jobs/{id}/fail").post(admin::fail))
        .service(web::resource("/healthz").route(read(ops::healthz)))
        .service(web::resource("/readyz").route(read(ops::readyz)))
        .service(web::resource("/metrics").route(read(ops::metrics)))
        .default_service(web::to(not_found));
}

/// A `GET` route that answers `HEAD` too, as `GET` would: the same status and headers, and (as
/// actix-http writes every answer to a `HEAD`) no body.
fn read<F, Args>(handler: F) -> Route
where
    F: Handler<Args>,
    Args: FromRequest + 'static,
    F::Output: Responder + 'static,
{
    web::route()
        .guard(guard::Any(guard::Get()).or(guard::Head()))
        .to(handler)
}

/// An event stream asked for with `HEAD` gets the stream's status and headers, and ends there
/// (a refusal, whose body has a length, is left to actix-http).
/// actix-http leaves out a `HEAD` answer's body but still runs it to its end, which for a stream
/// is its timeout: the connection, the stream's place and its hub entry would be held that long.
async fn head_without_stream(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody, body::None>>, actix_web::Error> {
    let head = req.method() == Method::HEAD;
    let answer = next.call(req).await?;
    let streamed = matches!(answer.response().body().size(), body::BodySize::Stream);
    Ok(if head && streamed {
        answer.map_body(|_, _| EitherBody::right(body::None::new()))
    } else {
        answer.map_into_left_body()
    })
}

/// Times every request for `handoff_http_request_duration_seconds`, under its route's template
/// (never the path itself, which holds job ids): until its answer's head is ready, which for an
/// event stream is when the stream starts.
pub async fn timed(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let answer = next.call(req).await;
    if let Some(state) = state {
        // Read once routed, when actix knows the resource and need not match the path again.
        let (route, status) = match &answer {
            Ok(answer) => (answer.request().match_pattern(), answer.status()),
            // Handlers' and extractors' errors arrive as answers; this is what is left.
            Err(err) => (None, err.as_response_error().status_code()),
        };
        let took = started.elapsed();
        state.metrics.request_answered(route, status.as_u16(), took);
    }
    answer
}

/// Unknown paths: JSON under `/api/` and `/sse/`, whose clients read JSON errors; a page elsewhere.
async fn not_found(req: HttpRequest) -> HttpResponse {
    if req.path().starts_with("/api/") || req.path().starts_with("/sse/") {
        HttpResponse::NotFound().json(ErrorBody::new("there is nothing at this address"))
    } else {
        pages::not_found().await
    }
}

/// Parses a job id from the path or query.
fn job_id(raw: &str) -> Result<JobId, AppError> {
    Ok(JobId::parse(raw)?)
}

/// Gives actix's own bare answers a JSON body that says what was wrong: `405` (it keeps its
/// `Allow` header) and `413` (from the body extractors, whose text names no limit).
pub fn explain_errors<B: 'static>() -> ErrorHandlers<B> {
    ErrorHandlers::new()
        .handler(StatusCode::METHOD_NOT_ALLOWED, |res| {
            let allow = res
                .response()
                .headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            with_message(res, format!("method not allowed here; allowed: {allow}"))
        })
        .handler(StatusCode::PAYLOAD_TOO_LARGE, |res| {
            // A handler's own 413 (a batch over its limits) says why already.
            if res.response().headers().get(header::CONTENT_TYPE)
                == Some(&header::HeaderValue::from_static("application/json"))
            {
                return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
            }
            with_message(res, AppError::PayloadTooLarge.to_string())
        })
}

/// The same response (status, headers, connection handling) with `{"error": message}` as body.
fn with_message<B>(
    res: ServiceResponse<B>,
    message: String,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let (req, old) = res.into_parts();
    let mut new = HttpResponse::build(old.status());
    for (name, value) in old.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            new.append_header((name.clone(), value.clone()));
        }
    }
    let mut new = new.json(ErrorBody::new(message));
    // A 413 leaves the body unread: keep actix's decision to close the connection.
    new.head_mut()
        .set_connection_type(old.head().connection_type());
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, new).map_into_right_body(),
    ))
}
