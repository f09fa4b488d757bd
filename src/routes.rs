//! The HTTP interface, one module per area. `configure` is the whole route table.

pub mod admin;
pub mod api;
pub mod ops;
pub mod pages;
pub mod sse;

use actix_web::dev::ServiceResponse;
use actix_web::error::UrlencodedError;
use actix_web::http::{StatusCode, header};
use actix_web::middleware::{ErrorHandlerResponse, ErrorHandlers};
use actix_web::{HttpRequest, HttpResponse, web};

use crate::domain::JobId;
use crate::error::AppError;

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
        .service(web::resource("/").get(pages::index))
        .service(web::resource("/jobs").post(pages::create_demo_job))
        .service(web::resource("/jobs/{id}").get(pages::wait))
        .service(web::resource("/test.do").get(pages::result))
        .service(web::resource("/static/{file}").get(pages::static_file))
        .service(web::resource("/sse/connect/{id}").get(sse::connect))
        .service(web::resource("/api/jobs").post(api::create))
        .service(web::resource("/api/jobs/{id}").get(api::show))
        .service(web::resource("/api/jobs/{id}/complete").post(api::complete))
        .service(web::resource("/admin").get(admin::page))
        .service(web::resource("/admin/login").post(admin::login))
        .service(web::resource("/admin/logout").post(admin::logout))
        .service(web::resource("/admin/jobs").post(admin::create))
        .service(web::resource("/admin/jobs/{id}/complete").post(admin::complete))
        .service(web::resource("/healthz").get(ops::healthz))
        .service(web::resource("/metrics").get(ops::metrics))
        .default_service(web::to(not_found));
}

/// Unknown paths: JSON under `/api/` and `/sse/`, whose clients read JSON errors; a page elsewhere.
async fn not_found(req: HttpRequest) -> HttpResponse {
    if req.path().starts_with("/api/") || req.path().starts_with("/sse/") {
        HttpResponse::NotFound()
            .json(serde_json::json!({ "error": "there is nothing at this address" }))
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
    let mut new = new.json(serde_json::json!({ "error": message }));
    // A 413 leaves the body unread: keep actix's decision to close the connection.
    new.head_mut()
        .set_connection_type(old.head().connection_type());
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, new).map_into_right_body(),
    ))
}
