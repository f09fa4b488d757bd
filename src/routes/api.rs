//! The JSON API: `GET /api/jobs/{id}` for anyone holding the id (the polling fallback), and
//! token-protected `POST /api/jobs`, `…/{id}/progress`, `…/{id}/complete` and `…/{id}/fail`
//! for the job runner.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::AppError;
use super::{AppState, job_id};
use crate::domain::{Job, Message, MoveUrl, Percent, rfc3339};

/// A job's latest progress report, as the API shows it.
#[derive(Debug, Serialize)]
pub struct ProgressView {
    pub percent: Option<f64>,
    pub message: Option<String>,
    pub at: String,
}

/// A job as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: String,
    /// `pending`, `complete`, `failed` or `expired`.
    pub status: &'static str,
    /// `""` while pending, the target once ended.
    pub move_url: String,
    pub created_at: String,
    /// When the job ended, whichever way.
    pub completed_at: Option<String>,
    /// When the job expires if still pending.
    pub deadline: String,
    pub progress: Option<ProgressView>,
    /// Why a failed job failed, if its runner said.
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_url: Option<String>,
}

impl From<&Job> for JobView {
    fn from(job: &Job) -> Self {
        Self {
            id: job.id.to_string(),
            status: job.status.as_str(),
            move_url: if job.status.is_end() {
                job.target().to_string()
            } else {
                String::new()
            },
            created_at: rfc3339(job.created_at),
            completed_at: job.completed_at.map(rfc3339),
            deadline: rfc3339(job.deadline),
            progress: job.progress.as_ref().map(|p| ProgressView {
                percent: p.percent.map(Percent::get),
                message: p.message.as_ref().map(ToString::to_string),
                at: rfc3339(p.at),
            }),
            message: job.message.as_ref().map(ToString::to_string),
            wait_url: None,
        }
    }
}

/// Parses an optional JSON body: empty means every field absent. `shape` shows the caller what
/// is expected.
fn body<T: DeserializeOwned + Default>(body: &[u8], shape: &str) -> Result<T, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|err| {
        AppError::BadRequest(format!(
            "the body must be empty or JSON like {shape}: {err}"
        ))
    })
}

/// The body of `POST /api/jobs` and `…/complete`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobRequest {
    move_url: Option<String>,
    /// Only for creation.
    deadline_secs: Option<u64>,
}

const JOB_SHAPE: &str = "{\"moveUrl\":\"/path\"}";

fn move_url(raw: Option<&str>) -> Result<Option<MoveUrl>, AppError> {
    Ok(raw.map(MoveUrl::parse).transpose()?)
}

/// Parses an optional message for the person watching page A.
pub(super) fn message(raw: Option<&str>) -> Result<Option<Message>, AppError> {
    raw.map(Message::parse)
        .transpose()
        .map_err(|err| AppError::BadRequest(err.to_string()))
}

/// Reads the optional body of creation and completion, `{"moveUrl": "/path"}`, for its moveUrl.
/// Public for the fuzz targets and property tests.
pub fn move_url_from(raw: &[u8]) -> Result<Option<MoveUrl>, AppError> {
    let request: JobRequest = body(raw, JOB_SHAPE)?;
    move_url(request.move_url.as_deref())
}

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), AppError> {
    state.authorize_bearer(req)
}

pub async fn create(
    req: HttpRequest,
    raw: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AppError> {
    authorize(&req, &state)?;
    let request: JobRequest = body(&raw, "{\"moveUrl\":\"/path\",\"deadlineSecs\":600}")?;
    let target = move_url(request.move_url.as_deref())?;
    let deadline = request.deadline_secs.map(Duration::from_secs);
    let job = state.jobs.create(target, deadline).await?;
    let mut view = JobView::from(&job);
    view.wait_url = Some(format!("/jobs/{}", job.id));
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/api/jobs/{}", job.id)))
        .json(view))
}

pub async fn show(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AppError> {
    let id = job_id(&path)?;
    let job = state.jobs.get(&id).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(JobView::from(&job)))
}

pub async fn complete(
    req: HttpRequest,
    path: web::Path<String>,
    raw: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AppError> {
    authorize(&req, &state)?;
    let id = job_id(&path)?;
    let job = state.jobs.complete(&id, move_url_from(&raw)?).await?;
    Ok(HttpResponse::Ok().json(JobView::from(&job)))
}

/// The body of `…/progress`.
#[derive(Debug, Default, Deserialize)]
struct ProgressRequest {
    percent: Option<f64>,
    message: Option<String>,
}

pub async fn progress(
    req: HttpRequest,
    path: web::Path<String>,
    raw: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AppError> {
    authorize(&req, &state)?;
    let id = job_id(&path)?;
    let request: ProgressRequest = body(&raw, "{\"percent\":40,\"message\":\"…\"}")?;
    let percent = request
        .percent
        .map(Percent::parse)
        .transpose()
        .map_err(|err| AppError::BadRequest(err.to_string()))?;
    let text = message(request.message.as_deref())?;
    let job = state.jobs.report_progress(&id, percent, text).await?;
    Ok(HttpResponse::Ok().json(JobView::from(&job)))
}

/// The body of `…/fail`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FailRequest {
    message: Option<String>,
    move_url: Option<String>,
}

pub async fn fail(
    req: HttpRequest,
    path: web::Path<String>,
    raw: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AppError> {
    authorize(&req, &state)?;
    let id = job_id(&path)?;
    let request: FailRequest = body(&raw, "{\"message\":\"…\",\"moveUrl\":\"/path\"}")?;
    let text = message(request.message.as_deref())?;
    let target = move_url(request.move_url.as_deref())?;
    let job = state.jobs.fail(&id, text, target).await?;
    Ok(HttpResponse::Ok().json(JobView::from(&job)))
}
