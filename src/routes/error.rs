//! The one error type of the HTTP layer, and how the use cases' errors map onto it. Each
//! variant's doc names its status code. Client errors say what was wrong; server errors say
//! nothing internal, and the log gets the cause.

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use utoipa::ToSchema;

use super::BODY_LIMIT;
use crate::domain::{JobIdError, MoveUrlError};
use crate::jobs::JobsError;
use crate::limits::{DEMO_BURST, Refusal};
use crate::store::StoreError;

/// What a refused stream is told to wait: long enough for other streams to end or time out.
const STREAM_RETRY_AFTER_SECS: u64 = 5;
/// What a write refused for a full write lane is told to wait: the lane clears its room in a
/// fraction of that.
const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// The body of every error answer of the API and the event streams.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong, for a person to read: a client error says what to change, a server
    /// error says nothing internal.
    pub error: String,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// 400: the id in the path or query is not a job id.
    #[error(transparent)]
    MalformedId(#[from] JobIdError),
    /// 400: a moveUrl that would leave the site.
    #[error(transparent)]
    BadMoveUrl(#[from] MoveUrlError),
    /// 400: anything else wrong with the request; the text says what.
    #[error("{0}")]
    BadRequest(String),
    /// 413: the body is over [`BODY_LIMIT`].
    #[error("the request body is larger than the limit of {BODY_LIMIT} bytes")]
    PayloadTooLarge,
    /// 401: no API token, or a wrong one.
    #[error("missing or wrong API token: send 'Authorization: Bearer <token>'")]
    Unauthorized,
    /// 429 with `Retry-After`: this address presented too many wrong API tokens and must wait
    /// this long before the next one is checked.
    #[error(
        "too many wrong API tokens from this address: try again in {} s",
        whole_secs(*.0)
    )]
    TooManyGuesses(Duration),
    /// 403: an admin form without a valid CSRF token, or without a session.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404: no job has this id.
    #[error("no job with this id")]
    JobNotFound,
    /// 404: the landing page's demo form is switched off (`HANDOFF_DEMO=off`).
    #[error("the demo is off on this server")]
    DemoOff,
    /// 429 with `Retry-After`: this address started its share of demo jobs; the wait is when
    /// it may start the next.
    #[error(
        "this address (for IPv6, its /64) has started {DEMO_BURST} demo jobs in a short time, \
         its limit; try again in {} s",
        whole_secs(*.0)
    )]
    TooManyDemoJobs(Duration),
    /// 429 with `Retry-After`: this address asked for too many job ids that do not exist; the
    /// wait is when it may ask again.
    #[error(
        "this address (for IPv6, its /64) asked for too many job ids that do not exist; try \
         again in {} s",
        whole_secs(*.0)
    )]
    TooManyLookups(Duration),
    /// 409: the job's end state does not allow the request; the text says which state.
    #[error("{0}")]
    Conflict(String),
    /// 503 when the server's stream cap is reached, 429 when the client address's is; both
    /// with `Retry-After`.
    #[error(transparent)]
    StreamLimit(#[from] Refusal),
    /// 503 with `Retry-After`: the write lane has its room for this kind of write full; nothing
    /// was stored.
    #[error("{0}; try again shortly")]
    Busy(#[source] StoreError),
    /// 503: the database did not answer; the cause is logged.
    #[error("the database is unavailable; try again shortly")]
    Unavailable(#[source] StoreError),
    /// 500: a bug; the cause is logged.
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Database(_) | StoreError::Shared(_) | StoreError::ShuttingDown => {
                Self::Unavailable(err)
            }
            StoreError::Busy { .. } => Self::Busy(err),
            _ => Self::Internal(err),
        }
    }
}

impl From<JobsError> for AppError {
    fn from(err: JobsError) -> Self {
        match err {
            JobsError::NotFound => Self::JobNotFound,
            JobsError::Ended(_) => Self::Conflict(err.to_string()),
            JobsError::DeadlineOutOfRange { .. } => Self::BadRequest(err.to_string()),
            JobsError::Store(err) => err.into(),
        }
    }
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::MalformedId(_) | Self::BadMoveUrl(_) | Self::BadRequest(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::JobNotFound | Self::DemoOff => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::StreamLimit(Refusal::Full(_)) | Self::Busy(_) | Self::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::StreamLimit(Refusal::ClientFull(_))
            | Self::TooManyDemoJobs(_)
            | Self::TooManyLookups(_)
            | Self::TooManyGuesses(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        self.log();
        let mut response = HttpResponse::build(self.status_code());
        if matches!(self, Self::Unauthorized) {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        if let Some(secs) = self.retry_after() {
            response.insert_header(("Retry-After", secs.to_string()));
        }
        response.json(ErrorBody::new(self.to_string()))
    }
}

/// A wait in whole seconds, rounded up, at least one: what `Retry-After` can say.
pub fn whole_secs(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

impl AppError {
    /// The seconds a client should wait before trying again, when waiting helps.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Unavailable(_) => Some(2),
            Self::StreamLimit(_) => Some(STREAM_RETRY_AFTER_SECS),
            Self::Busy(_) => Some(BUSY_RETRY_AFTER_SECS),
            Self::TooManyDemoJobs(wait)
            | Self::TooManyGuesses(wait)
            | Self::TooManyLookups(wait) => Some(whole_secs(*wait)),
            _ => None,
        }
    }

    /// Server-side failures go to the log with their cause; client mistakes do not.
    pub fn log(&self) {
        match self {
            Self::Unavailable(cause) => log::warn!("answering 503: {cause}"),
            Self::Internal(cause) => log::error!("answering 500: {cause}"),
            // Debug, not warn: a flood of refusals must not become a flood of log lines.
            Self::StreamLimit(refusal) => log::debug!("stream refused: {refusal}"),
            Self::Busy(cause) => log::debug!("write refused: {cause}"),
            _ => {}
        }
    }
}
