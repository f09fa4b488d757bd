//! The HTTP interface, one module per area. `configure` is the whole route table.

pub mod admin;
pub mod api;
pub mod ops;
pub mod pages;
pub mod sse;

use actix_web::web;

use crate::domain::JobId;
use crate::error::AppError;

/// Largest request body we read: a job request is a few hundred bytes.
pub const BODY_LIMIT: usize = 16 * 1024;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::PayloadConfig::new(BODY_LIMIT))
        .app_data(
            web::FormConfig::default()
                .limit(BODY_LIMIT)
                .error_handler(|err, _| {
                    AppError::BadRequest(format!("form data is invalid: {err}")).into()
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
        .default_service(web::to(pages::not_found));
}

/// Parses a job id from the path or query.
fn job_id(raw: &str) -> Result<JobId, AppError> {
    Ok(JobId::parse(raw)?)
}
