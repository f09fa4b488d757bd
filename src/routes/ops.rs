//! What an operator polls: `/healthz` and `/metrics`.

use actix_web::{HttpResponse, web};

use crate::startup::AppState;

/// `200 ok` when the database answers, `503` naming what is down otherwise.
pub async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    match state.store.ping().await {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(format!("ok\ndatabase: ok ({})\n", state.store.kind())),
        Err(err) => {
            log::warn!("health check: {err}");
            HttpResponse::ServiceUnavailable()
                .content_type("text/plain; charset=utf-8")
                .body("unavailable\ndatabase: down\n")
        }
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state
        .metrics
        .watched_jobs
        .set(state.hub.watched_jobs() as i64);
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.render())
}
