//! The JSON API: `GET /api/jobs/{id}` for anyone holding the id (the polling fallback), and
//! token-protected `POST /api/jobs`, `…/{id}/progress`, `…/{id}/complete` and `…/{id}/fail`
//! for the job runner, and `POST /api/jobs/batch` for many of the last three at once.
//!
//! The request and answer types derive `ToSchema` and each handler carries `#[utoipa::path]`, so
//! the OpenAPI document ([`super::openapi`]) is made from the very types the handlers read and
//! write; `tests/it/openapi.rs` checks real answers against it.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoResponses, ToSchema};

use super::error::{AppError, ErrorBody};
use super::{AppState, job_id};
use crate::domain::{Job, JobId, JobStatus, Message, MoveUrl, Percent, rfc3339};
use crate::jobs::{EndRequest, Operation};

/// A job's latest progress report, as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProgressView {
    /// 0 to 100; `null` when the report had none.
    #[schema(minimum = 0, maximum = 100, required = true)]
    pub percent: Option<f64>,
    /// `null` when the report had none.
    #[schema(required = true)]
    pub message: Option<String>,
    /// When the report was made.
    #[schema(format = DateTime)]
    pub at: String,
}

/// A job's state: `pending` until one of the three end states, which are final.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Pending,
    Complete,
    Failed,
    Expired,
}

impl From<JobStatus> for JobState {
    fn from(status: JobStatus) -> Self {
        match status {
            JobStatus::Pending => Self::Pending,
            JobStatus::Complete => Self::Complete,
            JobStatus::Failed => Self::Failed,
            JobStatus::Expired => Self::Expired,
        }
    }
}

/// A job as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    /// 22 URL-safe characters, made by the server.
    pub id: String,
    pub status: JobState,
    /// `""` while pending, the target once ended.
    pub move_url: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When the job ended, whichever way.
    #[schema(format = DateTime, required = true)]
    pub ended_at: Option<String>,
    /// The same as `endedAt`, under the name clients written before it know.
    #[schema(format = DateTime, required = true)]
    pub completed_at: Option<String>,
    /// When the job expires if still pending.
    #[schema(format = DateTime)]
    pub deadline: String,
    /// The latest stored report, `null` before the first.
    #[schema(required = true)]
    pub progress: Option<ProgressView>,
    /// Why a failed job failed, if its runner said.
    #[schema(required = true)]
    pub message: Option<String>,
    /// Only in the answer to a creation: page A of the job, where to send the user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_url: Option<String>,
}

impl From<&Job> for JobView {
    fn from(job: &Job) -> Self {
        Self {
            id: job.id.to_string(),
            status: job.status.into(),
            move_url: if job.status.is_end() {
                job.target().to_string()
            } else {
                String::new()
            },
            created_at: rfc3339(job.created_at),
            ended_at: job.ended_at.map(rfc3339),
            completed_at: job.ended_at.map(rfc3339),
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

/// The body of `POST /api/jobs`; empty is the same as `{}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct CreateRequest {
    /// Where page A sends the user once the job is complete: a path on this site (one leading
    /// `/`, no scheme, at most 2048 bytes); page B of the job when absent.
    move_url: Option<String>,
    /// Seconds from now until a still-pending job expires: from 1 to the retention; the server's
    /// `HANDOFF_JOB_DEADLINE_SECS` when absent.
    deadline_secs: Option<u64>,
}

/// The body of `…/complete`; empty is the same as `{}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct CompleteRequest {
    /// Overrides the job's target, with the same rules as at creation.
    move_url: Option<String>,
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
    let request: CompleteRequest = body(raw, JOB_SHAPE)?;
    move_url(request.move_url.as_deref())
}

// Named by reference, so the document says "optional" (an `Option` would also allow `null`,
// which the handlers refuse); `ApiDoc` lists the request types among its schemas.
const OPTIONAL_BODY: &str = "Optional: an empty body is the same as `{}`.";
const JOB_ID: &str = "The job's id: 22 URL-safe characters.";
const NOT_FOUND: &str = "No job has this id (or it was purged).";

/// What any token-protected call may be answered, whatever it asks (the OpenAPI document's
/// description of these answers; the answers themselves are [`AppError`]s).
#[derive(IntoResponses)]
#[expect(
    dead_code,
    reason = "describes answers for the OpenAPI document; never built"
)]
enum RunnerRefusals {
    /// No `Authorization: Bearer <token>`, or a wrong token.
    #[response(status = 401, headers(("WWW-Authenticate" = String, description = "`Bearer`")))]
    Unauthorized(ErrorBody),
    /// The body did not arrive in time; the connection closes.
    #[response(status = 408)]
    BodyTimeout(ErrorBody),
    /// The body is larger than the server's limit (a few KiB is plenty).
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// This address sent too many wrong tokens; no token is checked until `Retry-After` has
    /// passed.
    #[response(
        status = 429,
        headers(("Retry-After" = u64, description = "Seconds to wait before trying again."))
    )]
    TooManyGuesses(ErrorBody),
    /// The database did not answer, or too many requests of this kind are waiting for it;
    /// nothing was changed.
    #[response(
        status = 503,
        headers(("Retry-After" = u64, description = "Seconds to wait before trying again."))
    )]
    Unavailable(ErrorBody),
}

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), AppError> {
    state.authorize_bearer(req)
}

/// Creates a pending job.
#[utoipa::path(
    post,
    path = "/api/jobs",
    tag = "jobs",
    request_body(content = ref("#/components/schemas/CreateRequest"), description = OPTIONAL_BODY),
    responses(
        (status = 201, description = "The job, created; `waitUrl` is page A.", body = JobView,
            headers(("Location" = String, description = "The job's `/api/jobs/{id}`."))),
        (status = 400, description = "The body is not such JSON, or its moveUrl or deadlineSecs is refused; the text says why.", body = ErrorBody),
        RunnerRefusals,
    ),
    security(("bearer" = [])),
)]
pub async fn create(
    req: HttpRequest,
    raw: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AppError> {
    authorize(&req, &state)?;
    let request: CreateRequest = body(&raw, "{\"moveUrl\":\"/path\",\"deadlineSecs\":600}")?;
    let target = move_url(request.move_url.as_deref())?;
    let deadline = request.deadline_secs.map(Duration::from_secs);
    let job = state.jobs.create(target, deadline).await?;
    let mut view = JobView::from(&job);
    view.wait_url = Some(format!("/jobs/{}", job.id));
    Ok(HttpResponse::Created()
        .insert_header((header::LOCATION, format!("/api/jobs/{}", job.id)))
        .json(view))
}

/// A job's state, progress and target: the polling fallback, for anyone who holds the id.
#[utoipa::path(
    get,
    path = "/api/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = JOB_ID)),
    responses(
        (status = 200, description = "The job.", body = JobView),
        (status = 400, description = "The id is not a job id.", body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody),
        (status = 429, description = "This address asked for too many job ids that do not exist.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again."))),
        (status = 503, description = "The database did not answer, or too many reads wait for it.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again."))),
    ),
)]
pub async fn show(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AppError> {
    let id = job_id(&path)?;
    let job = state.look_up(&req, &id).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(JobView::from(&job)))
}

/// Completes a pending job: every stream on it moves to the target. Completing it again
/// changes nothing and answers `200`.
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/complete",
    tag = "jobs",
    params(("id" = String, Path, description = JOB_ID)),
    request_body(content = ref("#/components/schemas/CompleteRequest"), description = OPTIONAL_BODY),
    responses(
        (status = 200, description = "The job, complete.", body = JobView),
        (status = 400, description = "A malformed id, a body that is not such JSON, or a refused moveUrl; the text says why.", body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody),
        (status = 409, description = "The job failed or expired; the text says which.", body = ErrorBody),
        RunnerRefusals,
    ),
    security(("bearer" = [])),
)]
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

/// The body of `…/progress`; empty is the same as `{}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub(super) struct ProgressRequest {
    /// 0 to 100; a lower one than before is allowed (jobs have phases).
    #[schema(minimum = 0, maximum = 100)]
    percent: Option<f64>,
    /// For the person watching page A: no control characters.
    // MESSAGE_MAX_CHARS (the attribute takes a literal; a unit test in `openapi` compares).
    #[schema(max_length = 200)]
    message: Option<String>,
}

/// Reports progress on a pending job; the latest report wins.
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/progress",
    tag = "jobs",
    params(("id" = String, Path, description = JOB_ID)),
    request_body(content = ref("#/components/schemas/ProgressRequest"), description = OPTIONAL_BODY),
    responses(
        (status = 200, description = "The job, pending; its `progress` is the latest stored report, which may not be this one yet.", body = JobView),
        (status = 400, description = "A malformed id, a body that is not such JSON, a percent out of range or a refused message; the text says why.", body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody),
        (status = 409, description = "The job has ended; the text says how.", body = ErrorBody),
        RunnerRefusals,
    ),
    security(("bearer" = [])),
)]
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

/// The body of `…/fail`; empty is the same as `{}`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct FailRequest {
    /// Why it failed, shown on page B: no control characters.
    // MESSAGE_MAX_CHARS (the attribute takes a literal; a unit test in `openapi` compares).
    #[schema(max_length = 200)]
    message: Option<String>,
    /// Where page A sends the user; page B of the job, which shows the message, when absent.
    move_url: Option<String>,
}

/// Fails a pending job: every stream on it is told, with the message. Failing it again changes
/// nothing and answers `200`.
#[utoipa::path(
    post,
    path = "/api/jobs/{id}/fail",
    tag = "jobs",
    params(("id" = String, Path, description = JOB_ID)),
    request_body(content = ref("#/components/schemas/FailRequest"), description = OPTIONAL_BODY),
    responses(
        (status = 200, description = "The job, failed.", body = JobView),
        (status = 400, description = "A malformed id, a body that is not such JSON, or a refused message or moveUrl; the text says why.", body = ErrorBody),
        (status = 404, description = NOT_FOUND, body = ErrorBody),
        (status = 409, description = "The job is complete or expired; the text says which.", body = ErrorBody),
        RunnerRefusals,
    ),
    security(("bearer" = [])),
)]
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

/// At most this many operations in one batch.
pub const BATCH_MAX: usize = 1000;
/// Largest batch body we read: a thousand completions with their moveUrls fit many times over.
pub const BATCH_BODY_LIMIT: usize = 1024 * 1024;

/// One operation of a batch: the body of a single call, with its `op` and its job's `id`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "lowercase")]
pub(super) enum BatchOperation {
    /// As `POST /api/jobs/{id}/complete`.
    Complete {
        #[schema(example = "Xf3kQ9vB2mLp7TzR4wYc1A")]
        id: String,
        /// Overrides the job's target, with the same rules as at creation.
        #[serde(rename = "moveUrl")]
        move_url: Option<String>,
    },
    /// As `POST /api/jobs/{id}/fail`.
    Fail {
        id: String,
        /// Why it failed, shown on page B: no control characters.
        #[schema(max_length = 200)]
        message: Option<String>,
        /// Where page A sends the user; page B of the job when absent.
        #[serde(rename = "moveUrl")]
        move_url: Option<String>,
    },
    /// As `POST /api/jobs/{id}/progress`.
    Progress {
        id: String,
        /// 0 to 100.
        #[schema(minimum = 0, maximum = 100)]
        percent: Option<f64>,
        /// For the person watching page A: no control characters.
        #[schema(max_length = 200)]
        message: Option<String>,
    },
}

/// The body of `POST /api/jobs/batch`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct BatchRequest {
    /// 1 to 1000 operations, applied in this order.
    #[schema(min_items = 1, max_items = 1000)]
    operations: Vec<BatchOperation>,
}

/// Only counts the operations, whatever they are: tells a list too long from a bad one.
#[derive(Deserialize)]
struct BatchCount {
    operations: Vec<serde::de::IgnoredAny>,
}

/// What one operation of a batch did: what its single call would have answered.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchResult {
    /// Done: the job as the single call answers it.
    Done {
        id: String,
        /// `200`.
        #[schema(minimum = 200, maximum = 200)]
        status: u16,
        job: Box<JobView>,
    },
    /// Refused, with the single call's status and text: `400` (a malformed id, a refused
    /// moveUrl, percent or message), `404` (no such job), `409` (the job's end state does not
    /// allow it), `503` (the database did not take it: send that operation again).
    Refused {
        /// As sent.
        id: String,
        #[schema(minimum = 400, maximum = 599)]
        status: u16,
        error: String,
    },
}

/// The answer to a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchAnswer {
    /// One per operation, in their order.
    results: Vec<BatchResult>,
}

/// The answer to a batch that is refused as a whole.
fn batch_refused(status: actix_web::http::StatusCode, why: String) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody::new(why))
}

/// An operation checked as its single call checks its path and body.
fn batch_operation(operation: BatchOperation) -> (String, Result<(JobId, Operation), AppError>) {
    match operation {
        BatchOperation::Complete { id, move_url: url } => {
            let checked = (|| {
                let request = EndRequest {
                    status: JobStatus::Complete,
                    move_url: move_url(url.as_deref())?,
                    message: None,
                };
                Ok((job_id(&id)?, Operation::End(request)))
            })();
            (id, checked)
        }
        BatchOperation::Fail {
            id,
            message: text,
            move_url: url,
        } => {
            let checked = (|| {
                let request = EndRequest {
                    status: JobStatus::Failed,
                    message: message(text.as_deref())?,
                    move_url: move_url(url.as_deref())?,
                };
                Ok((job_id(&id)?, Operation::End(request)))
            })();
            (id, checked)
        }
        BatchOperation::Progress {
            id,
            percent,
            message: text,
        } => {
            let checked = (|| {
                let percent = percent
                    .map(Percent::parse)
                    .transpose()
                    .map_err(|err| AppError::BadRequest(err.to_string()))?;
                let message = message(text.as_deref())?;
                Ok((job_id(&id)?, Operation::Progress { percent, message }))
            })();
            (id, checked)
        }
    }
}

/// Several completions, failures and progress reports in one request, applied in their order:
/// what a job runner ending many jobs at once sends instead of one call per job. All endings
/// are stored before the answer, together in as few commits as the write lane allows, and each
/// is published once stored.
#[utoipa::path(
    post,
    path = "/api/jobs/batch",
    tag = "jobs",
    request_body(content = BatchRequest, description = "1 to 1000 operations, at most 1 MiB."),
    responses(
        (status = 200, description = "Each operation's result, in order; each says its own status.", body = BatchAnswer),
        (status = 400, description = "The body is not such JSON, the list is empty, or an `op` is unknown; the text says why, and nothing was applied.", body = ErrorBody),
        (status = 413, description = "More than 1000 operations, or a body over 1 MiB; nothing was applied.", body = ErrorBody),
        RunnerRefusals,
    ),
    security(("bearer" = [])),
)]
pub async fn batch(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    authorize(&req, &state)?;
    let Ok(raw) = payload.to_bytes_limited(BATCH_BODY_LIMIT).await else {
        return Ok(batch_refused(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("the batch body is larger than the limit of {BATCH_BODY_LIMIT} bytes"),
        ));
    };
    let raw = raw?;
    let shape = r#"{"operations":[{"op":"complete","id":"…"}]}"#;
    let too_many = format!("a batch holds at most {BATCH_MAX} operations");
    let request: BatchRequest = match serde_json::from_slice(&raw) {
        Ok(request) => request,
        Err(err) => {
            let counted = serde_json::from_slice::<BatchCount>(&raw);
            if counted.is_ok_and(|count| count.operations.len() > BATCH_MAX) {
                return Ok(batch_refused(
                    actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                    too_many,
                ));
            }
            return Err(AppError::BadRequest(format!(
                "the body must be JSON like {shape}, each op one of complete, fail, progress: {err}"
            ))
            .into());
        }
    };
    match request.operations.len() {
        0 => return Err(AppError::BadRequest("the batch has no operations".into()).into()),
        n if n > BATCH_MAX => {
            return Ok(batch_refused(
                actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
                too_many,
            ));
        }
        _ => {}
    }
    let mut valid = Vec::with_capacity(request.operations.len());
    let checked: Vec<(String, Result<(), AppError>)> = request
        .operations
        .into_iter()
        .map(batch_operation)
        .map(|(id, checked)| (id, checked.map(|operation| valid.push(operation))))
        .collect();
    let mut applied = state.jobs.apply_all(valid).await.into_iter();
    let mut logged = false;
    let results = checked
        .into_iter()
        .map(|(id, checked)| {
            let done = checked.and_then(|_| {
                let answer = applied.next().expect("one answer per valid operation");
                answer.map_err(AppError::from)
            });
            match done {
                Ok(job) => BatchResult::Done {
                    id,
                    status: 200,
                    job: Box::new(JobView::from(&job)),
                },
                Err(err) => {
                    let status = actix_web::ResponseError::status_code(&err);
                    // One line for a batch the database refused, not one per operation.
                    if status.is_server_error() && !logged {
                        logged = true;
                        err.log();
                    }
                    BatchResult::Refused {
                        id,
                        status: status.as_u16(),
                        error: err.to_string(),
                    }
                }
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(BatchAnswer { results }))
}
