//! What an operator polls: `/healthz` and `/metrics`.

use std::fmt::Write;

use actix_web::{HttpResponse, web};

use crate::startup::AppState;

/// `200` with first line `ok` when the database (and Redis, when configured) answer and the last
/// write went through; otherwise
/// `503` with first line `unavailable`. Each part gets its own line, so the body names what is down.
pub async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let database = match state.store.ping().await {
        // Reads can go on while writes cannot (another writer holds SQLite's lock).
        Ok(()) if state.store.writes_failing() => Err("writes failing"),
        Ok(()) => Ok(()),
        Err(err) => {
            log::warn!("health check: database: {err}");
            Err("down")
        }
    };
    let redis = match &state.fanout {
        Some(fanout) => Some(fanout.check().await),
        None => None,
    };
    let healthy = database.is_ok() && redis.is_none_or(|r| r.is_ok());
    let mut body = String::from(if healthy { "ok\n" } else { "unavailable\n" });
    // Writing into a String cannot fail.
    let _ = match database {
        Ok(()) => writeln!(body, "database: ok ({})", state.store.kind()),
        Err(why) => writeln!(body, "database: {why} ({})", state.store.kind()),
    };
    let _ = match redis {
        None => writeln!(body, "redis: not used (REDIS_URL is not set)"),
        Some(Ok(())) => writeln!(body, "redis: ok"),
        Some(Err(why)) => writeln!(body, "redis: down ({why})"),
    };
    let mut response = if healthy {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response
        .content_type("text/plain; charset=utf-8")
        .body(body)
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
