//! The HTML pages: the landing page, page A (waiting), page B (result), and the static files.

use std::time::Duration;

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use askama::Template;
use askama_web::WebTemplate;
use serde::Deserialize;

use super::error::AppError;
use super::sse::MAX_WATCHED;
use super::{AppState, job_id};
use crate::domain::{JobId, JobStatus, rfc3339};

/// An [`AppError`] answered as an HTML page rather than JSON.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PageError(#[from] pub AppError);

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: String,
}

impl ResponseError for PageError {
    fn status_code(&self) -> StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        self.0.log();
        let status = self.status_code();
        let (title, message) = match &self.0 {
            AppError::JobNotFound | AppError::MalformedId(_) => (
                "No such job",
                "There is no job at this address. The link may be mistyped, or the job has expired.".to_owned(),
            ),
            AppError::Unavailable(_) => (
                "Temporarily unavailable",
                "Handoff cannot reach its database right now. Please try again in a moment.".to_owned(),
            ),
            AppError::Busy(_) => (
                "Too busy",
                "Handoff has too many jobs to store right now. Please try again in a moment.".to_owned(),
            ),
            AppError::DemoOff => (
                "The demo is off",
                "This server does not start demo jobs. Jobs are created through its API.".to_owned(),
            ),
            AppError::TooManyDemoJobs(_) => ("Too many demo jobs", format!("{}.", self.0)),
            AppError::Internal(_) => ("Something went wrong", "Please try again.".to_owned()),
            AppError::Conflict(why) => ("The job has ended", format!("{why}: nothing changed.")),
            other if status == StatusCode::FORBIDDEN => ("Not allowed", other.to_string()),
            other => ("Bad request", other.to_string()),
        };
        let mut response = html(status, &ErrorPage { title, message });
        if let Some(secs) = self.0.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        response
    }
}

/// Renders a template with a status; a template that fails to render is a bug, logged, answered 500.
pub fn html(status: StatusCode, page: &impl Template) -> HttpResponse {
    match page.render() {
        Ok(body) => HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .body(body),
        Err(err) => {
            log::error!("template failed to render: {err}");
            HttpResponse::InternalServerError().finish()
        }
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "index.html")]
pub struct IndexPage {
    /// Whether the demo form is on (`HANDOFF_DEMO`).
    demo: bool,
}

pub async fn index(state: web::Data<AppState>) -> IndexPage {
    IndexPage {
        demo: state.demo.is_some(),
    }
}

/// The landing page's form: `kind=manual` waits for a Complete or Fail on the admin page or the
/// API; anything else is a job that runs by itself, reporting progress, as a real one would.
#[derive(Deserialize)]
pub struct DemoForm {
    #[serde(default)]
    kind: String,
}

/// The demo form's `POST /jobs`: `404` when the demo is off, `403` from another site's page,
/// `429` past the address's allowance; otherwise a new job and `303` to its page A.
pub async fn create_demo_job(
    req: HttpRequest,
    form: Option<web::Form<DemoForm>>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let limit = state.demo.as_ref().ok_or(AppError::DemoOff)?;
    // Before the allowance: a forged post must not use up the visitor's.
    if state.foreign_post(&req) {
        return Err(AppError::Forbidden(
            "a demo job can only be started from this site's own page, not from another site",
        )
        .into());
    }
    limit
        .take(state.client_addr(&req))
        .map_err(AppError::TooManyDemoJobs)?;
    let job = state
        .jobs
        .create(None, None)
        .await
        .map_err(AppError::from)?;
    if form.is_none_or(|form| form.kind != "manual") {
        state.jobs.spawn_demo_runner(job.id.clone());
    }
    Ok(see_other(&format!("/jobs/{}", job.id)))
}

/// `303 See Other` to `location`.
pub fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .finish()
}

/// How often page A asks the API about its job where the browser has no EventSource.
pub const POLL_EVERY: Duration = Duration::from_secs(2);

/// Page A. It carries the server's limits that `handoff.js` must respect, so the script repeats
/// none of them: the jobs one shared stream may watch ([`MAX_WATCHED`]) and [`POLL_EVERY`].
#[derive(Template, WebTemplate)]
#[template(path = "wait.html")]
pub struct WaitPage {
    id: JobId,
    max_watched: usize,
    poll_ms: u128,
}

impl WaitPage {
    fn new(id: JobId) -> Self {
        Self {
            id,
            max_watched: MAX_WATCHED,
            poll_ms: POLL_EVERY.as_millis(),
        }
    }
}

/// Page A. An unknown job gets a clear 404 page, not a spinner.
pub async fn wait(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<WaitPage, PageError> {
    let id = job_id(&path)?;
    let job = state.look_up(&req, &id).await?;
    Ok(WaitPage::new(job.id))
}

#[derive(Deserialize)]
pub struct ResultQuery {
    id: Option<String>,
}

#[derive(Template)]
#[template(path = "result.html")]
struct ResultPage {
    /// Whether the demo form is on, to offer another demo job.
    demo: bool,
    id: JobId,
    created_at: String,
    ended_at: String,
    /// The job's own target, when it names one (its tabs went there, not here).
    move_url: Option<String>,
}

#[derive(Template)]
#[template(path = "pending.html")]
struct PendingPage {
    id: JobId,
}

/// Page B of a job that failed or expired: what happened, instead of a result.
#[derive(Template)]
#[template(path = "ended.html")]
struct EndedPage {
    demo: bool,
    id: JobId,
    failed: bool,
    message: Option<String>,
    ended_at: String,
}

/// Page B, at the Spring server's address (`/test.do?id=…`), which its client was sent to.
pub async fn result(
    req: HttpRequest,
    query: web::Query<ResultQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, PageError> {
    let raw = query
        .id
        .as_deref()
        .ok_or_else(|| AppError::BadRequest("the link has no job id (?id=…)".into()))?;
    let id = job_id(raw)?;
    let job = state.look_up(&req, &id).await?;
    let ended_at = rfc3339(job.ended_at.unwrap_or_default());
    Ok(match job.status {
        JobStatus::Complete => html(
            StatusCode::OK,
            &ResultPage {
                demo: state.demo.is_some(),
                move_url: job.move_url.as_ref().map(ToString::to_string),
                id: job.id,
                created_at: rfc3339(job.created_at),
                ended_at,
            },
        ),
        JobStatus::Failed | JobStatus::Expired => html(
            StatusCode::OK,
            &EndedPage {
                demo: state.demo.is_some(),
                failed: job.status == JobStatus::Failed,
                message: job.message.as_ref().map(ToString::to_string),
                id: job.id,
                ended_at,
            },
        ),
        JobStatus::Pending => html(StatusCode::OK, &PendingPage { id: job.id }),
    })
}

const HANDOFF_JS: &str = include_str!("../../static/handoff.js");
const STYLE_CSS: &str = include_str!("../../static/style.css");

/// The two static files, compiled in so the binary runs from any folder.
pub async fn static_file(path: web::Path<String>) -> Result<HttpResponse, PageError> {
    let (body, content_type) = match path.as_str() {
        "handoff.js" => (HANDOFF_JS, "text/javascript; charset=utf-8"),
        "style.css" => (STYLE_CSS, "text/css; charset=utf-8"),
        _ => return Ok(not_found().await),
    };
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .body(body))
}

pub async fn not_found() -> HttpResponse {
    html(
        StatusCode::NOT_FOUND,
        &ErrorPage {
            title: "Not found",
            message: "There is nothing at this address.".to_owned(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_a_carries_the_servers_own_limits_for_handoff_js() {
        let page = WaitPage::new(JobId::generate()).render().unwrap();
        let max_watched = format!("data-handoff-max-watched=\"{MAX_WATCHED}\"");
        let poll = format!("data-handoff-poll-ms=\"{}\"", POLL_EVERY.as_millis());
        assert!(page.contains(&max_watched), "{page}");
        assert!(page.contains(&poll), "{page}");
    }
}
