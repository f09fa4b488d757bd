//! The admin page: recent jobs with their state, progress, deadline and open streams, Complete and
//! Fail buttons per pending job, and a form to create one. Logging in takes the admin password
//! (or, while none is set, an API token); every admin form comes from this site's own page and
//! carries the session's CSRF token. Every answer to a logged-in admin renews the
//! session cookie (the idle timeout counts from the last admin request); logging out ends the
//! session on every instance.

use actix_web::cookie::Cookie;
use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use serde::Deserialize;

use super::error::{AppError, whole_secs};
use super::pages::{PageError, html, see_other};
use super::{AppState, job_id};
use crate::auth::{AdminSession, SESSION_COOKIE, logout_cookie};
use std::time::Duration;

use crate::domain::{MoveUrl, now_millis, rfc3339};
use crate::jobs::Listed;

const PAGE_SIZE: i64 = 20;

/// A session a request proved, and the renewed cookie its answer should carry.
struct Checked {
    session: AdminSession,
    cookie: Cookie<'static>,
}

/// The live admin session `req`'s cookie proves, if any, with the cookie renewed.
async fn admin_session(state: &AppState, req: &HttpRequest) -> Result<Option<Checked>, AppError> {
    let cookie = req.cookie(SESSION_COOKIE);
    let idle = state.sessions.idle();
    let Some(session) = state.secrets.session(cookie, now_millis(), idle) else {
        return Ok(None);
    };
    let Some(session) = state.sessions.check(session).await? else {
        return Ok(None);
    };
    let cookie = session_cookie(state, req, &session);
    Ok(Some(Checked { session, cookie }))
}

/// The cookie that stands for `session` in the browser that sent `req`.
fn session_cookie(state: &AppState, req: &HttpRequest, session: &AdminSession) -> Cookie<'static> {
    let secure = state.cookie_secure(req);
    state
        .secrets
        .session_cookie(session, secure, state.sessions.idle())
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    problem: Option<String>,
    /// The admin has a password of its own: the form asks for it rather than an API token.
    password: bool,
}

impl LoginPage {
    fn new(state: &AppState, problem: Option<String>) -> Self {
        Self {
            problem,
            password: state.secrets.has_admin_password(),
        }
    }
}

struct Row {
    id: String,
    status: &'static str,
    pending: bool,
    /// "40 % · Rendering page 3", the failure's message, or empty.
    detail: String,
    deadline: String,
    /// The custom target, if the job has one.
    move_url: Option<String>,
    created_at: String,
    ended_at: String,
    streams: usize,
}

/// What the admin sees of a job's progress or failure.
fn detail(job: &crate::domain::Job) -> String {
    if let Some(message) = &job.message {
        return message.to_string();
    }
    let Some(progress) = &job.progress else {
        return String::new();
    };
    let percent = progress.percent.map(|p| format!("{} %", p.get()));
    let message = progress.message.as_ref().map(ToString::to_string);
    [percent, message]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" · ")
}

#[derive(Template)]
#[template(path = "admin.html")]
struct AdminPage {
    csrf: String,
    rows: Vec<Row>,
    total: i64,
    watched: usize,
    page: i64,
    pages: i64,
    prev_page: Option<i64>,
    next_page: Option<i64>,
}

#[derive(Deserialize)]
pub struct PageQuery {
    page: Option<u32>,
}

pub async fn page(
    req: HttpRequest,
    query: web::Query<PageQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let Some(Checked { session, cookie }) = admin_session(&state, &req).await? else {
        return Ok(html(StatusCode::OK, &LoginPage::new(&state, None)));
    };
    let total = state.jobs.count().await.map_err(AppError::from)?;
    let pages = ((total + PAGE_SIZE - 1) / PAGE_SIZE).max(1);
    let page = i64::from(query.page.unwrap_or(1).max(1)).min(pages);
    let listed = state
        .jobs
        .recent(PAGE_SIZE, (page - 1) * PAGE_SIZE)
        .await
        .map_err(AppError::from)?;
    let rows = listed
        .into_iter()
        .map(|Listed { job, streams }| Row {
            id: job.id.to_string(),
            status: job.status.as_str(),
            pending: !job.status.is_end(),
            detail: detail(&job),
            deadline: rfc3339(job.deadline),
            move_url: job.move_url.as_ref().map(ToString::to_string),
            created_at: rfc3339(job.created_at),
            ended_at: job.ended_at.map(rfc3339).unwrap_or_else(|| "—".into()),
            streams,
        })
        .collect();
    let page_view = AdminPage {
        csrf: session.csrf,
        rows,
        total,
        watched: state.jobs.watched_jobs(),
        page,
        pages,
        prev_page: (page > 1).then_some(page - 1),
        next_page: (page < pages).then_some(page + 1),
    };
    let mut response = html(StatusCode::OK, &page_view);
    response.headers_mut().insert(
        actix_web::http::header::CACHE_CONTROL,
        actix_web::http::header::HeaderValue::from_static("no-store"),
    );
    Ok(with_cookie(response, &cookie))
}

/// `response` with `cookie` set.
fn with_cookie(mut response: HttpResponse, cookie: &Cookie<'_>) -> HttpResponse {
    // A cookie we built ourselves always encodes into a header.
    let _ = response.add_cookie(cookie);
    response
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
}

pub async fn login(
    req: HttpRequest,
    form: web::Form<LoginForm>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    from_this_site(&state, &req)?;
    let client = state.client_addr(&req);
    // While an address must wait, its attempts are not even checked: guessing gains nothing.
    if let Err(wait) = state.login_guesses.check(client) {
        return Ok(too_many_logins(&state, wait));
    }
    if !state.secrets.admin_login_matches(&form.token).await {
        log::info!("admin login refused from {client:?}");
        let what = if state.secrets.has_admin_password() {
            "password"
        } else {
            "token"
        };
        let problem = match state.login_guesses.failed(client) {
            Some(wait) => format!(
                "That {what} is not right. Too many wrong tries from your address: \
                 wait {} s before the next try.",
                wait.as_secs().max(1)
            ),
            None => format!("That {what} is not right."),
        };
        return Ok(html(
            StatusCode::UNAUTHORIZED,
            &LoginPage::new(&state, Some(problem)),
        ));
    }
    state.login_guesses.succeeded(client);
    let session = state.sessions.start().await.map_err(AppError::from)?;
    let cookie = session_cookie(&state, &req, &session);
    Ok(with_cookie(see_other("/admin"), &cookie))
}

/// `429` with `Retry-After`: this address guessed wrong too often.
fn too_many_logins(state: &AppState, wait: std::time::Duration) -> HttpResponse {
    let secs = whole_secs(wait);
    let mut response = html(
        StatusCode::TOO_MANY_REQUESTS,
        &LoginPage::new(
            state,
            Some(format!(
                "Too many wrong tokens from your address: try again in {secs} s."
            )),
        ),
    );
    response.headers_mut().insert(
        actix_web::http::header::RETRY_AFTER,
        actix_web::http::header::HeaderValue::from(secs),
    );
    response
}

/// Any admin form: the session's CSRF token, plus what the form adds.
#[derive(Deserialize)]
pub struct AdminForm {
    #[serde(default)]
    csrf: String,
    #[serde(default, rename = "moveUrl")]
    move_url: String,
    #[serde(default, rename = "deadlineSecs")]
    deadline_secs: String,
    #[serde(default)]
    message: String,
}

/// A form field that may be left empty.
fn filled(raw: &str) -> Option<&str> {
    Some(raw.trim()).filter(|s| !s.is_empty())
}

/// `403` for a form post from a page that is not this site's own ([`AppState::foreign_post`]):
/// checked first, so that a forged post neither counts as a guess nor touches a session.
fn from_this_site(state: &AppState, req: &HttpRequest) -> Result<(), PageError> {
    if state.foreign_post(req) {
        return Err(AppError::Forbidden(
            "admin forms can only be sent from this site's own admin page, not from another site",
        )
        .into());
    }
    Ok(())
}

/// The admin session, if the form comes from this site's page, the request has a live session
/// and its form echoes the session's CSRF token.
async fn checked_session(
    req: &HttpRequest,
    state: &AppState,
    form: &AdminForm,
) -> Result<Checked, PageError> {
    from_this_site(state, req)?;
    let checked = admin_session(state, req)
        .await?
        .ok_or(AppError::Forbidden("not logged in: log in on /admin first"))?;
    if checked.session.csrf_matches(&form.csrf) {
        Ok(checked)
    } else {
        Err(AppError::Forbidden(
            "the form's CSRF token is missing or wrong: reload /admin and try again",
        )
        .into())
    }
}

pub async fn logout(
    req: HttpRequest,
    form: web::Form<AdminForm>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let Checked { session, .. } = checked_session(&req, &state, &form).await?;
    state.sessions.end(&session).await.map_err(AppError::from)?;
    let removal = logout_cookie(state.cookie_secure(&req));
    Ok(with_cookie(see_other("/admin"), &removal))
}

pub async fn create(
    req: HttpRequest,
    form: web::Form<AdminForm>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let Checked { cookie, .. } = checked_session(&req, &state, &form).await?;
    let move_url = filled(&form.move_url)
        .map(MoveUrl::parse)
        .transpose()
        .map_err(AppError::from)?;
    let deadline = filled(&form.deadline_secs)
        .map(|raw| {
            raw.parse().map(Duration::from_secs).map_err(|_| {
                AppError::BadRequest("the deadline must be a whole number of seconds".into())
            })
        })
        .transpose()?;
    state
        .jobs
        .create(move_url, deadline)
        .await
        .map_err(AppError::from)?;
    Ok(with_cookie(see_other("/admin"), &cookie))
}

pub async fn complete(
    req: HttpRequest,
    path: web::Path<String>,
    form: web::Form<AdminForm>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let Checked { cookie, .. } = checked_session(&req, &state, &form).await?;
    let id = job_id(&path)?;
    state
        .jobs
        .complete(&id, None)
        .await
        .map_err(AppError::from)?;
    Ok(with_cookie(see_other("/admin"), &cookie))
}

pub async fn fail(
    req: HttpRequest,
    path: web::Path<String>,
    form: web::Form<AdminForm>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let Checked { cookie, .. } = checked_session(&req, &state, &form).await?;
    let id = job_id(&path)?;
    let message = super::api::message(filled(&form.message))?;
    state
        .jobs
        .fail(&id, message, None)
        .await
        .map_err(AppError::from)?;
    Ok(with_cookie(see_other("/admin"), &cookie))
}
