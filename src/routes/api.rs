//! The JSON API: `GET /api/jobs/{id}` for anyone holding the id (the polling fallback), and
//! token-protected `POST /api/jobs` and `POST /api/jobs/{id}/complete` for the job runner.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::{Deserialize, Serialize};

use super::error::AppError;
use super::{AppState, job_id};
use crate::domain::{Job, MoveUrl, rfc3339};

/// A job as the API shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    pub id: String,
    pub status: &'static str,
    /// `""` while pending, the target once complete.
    pub move_url: String,
    pub created_at: String,
    pub completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_url: Option<String>,
}

impl From<&Job> for JobView {
    fn from(job: &Job) -> Self {
        Self {
            id: job.id.to_string(),
            status: job.status.as_str(),
            move_url: if job.is_complete() {
                job.target().to_string()
            } else {
                String::new()
            },
            created_at: rfc3339(job.created_at),
            completed_at: job.completed_at.map(rfc3339),
            wait_url: None,
        }
    }
}

/// The optional body of both POSTs.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobRequest {
    move_url: Option<String>,
}

/// Reads the optional body of both POSTs, `{"moveUrl": "/path"}`; an empty body means none.
/// Public for the fuzz targets and property tests.
pub fn move_url_from(body: &[u8]) -> Result<Option<MoveUrl>, AppError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let request: JobRequest = serde_json::from_slice(body).map_err(|err| {
        AppError::BadRequest(format!(
            "the body must be empty or JSON like {{\"moveUrl\":\"/path\"}}: {err}"
        ))
    })?;
    Ok(request
        .move_url
        .as_deref()
        .map(MoveUrl::parse)
        .transpose()?)
}

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), AppError> {
    if state.bearer_ok(req) {
        Ok(())
    } else {
        Err(AppError::Unauthorized)
    }
}

pub async fn create(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AppError> {
    authorize(&req, &state)?;
    let job = state.jobs.create(move_url_from(&body)?).await?;
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
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AppError> {
    authorize(&req, &state)?;
    let id = job_id(&path)?;
    let job = state.jobs.complete(&id, move_url_from(&body)?).await?;
    Ok(HttpResponse::Ok().json(JobView::from(&job)))
}
