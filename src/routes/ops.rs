//! What an operator polls: `/healthz` (alive, and what is down), `/readyz` (ready for new
//! streams and writes) and `/metrics`.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use actix_web::{HttpResponse, web};

use super::AppState;

/// `200` with first line `ok` when the database (and Redis, when configured) answer and the last
/// write went through; otherwise `503` with first line `unavailable`. Each part gets its own
/// line, so the body names what is down.
pub async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let health = state.jobs.health().await;
    let mut body = String::from(if health.is_ok() {
        "ok\n"
    } else {
        "unavailable\n"
    });
    let kind = health.database_kind;
    // Writing into a String cannot fail.
    let _ = match health.database {
        Ok(()) => writeln!(body, "database: ok ({kind})"),
        Err(why) => writeln!(body, "database: {why} ({kind})"),
    };
    let _ = match health.redis {
        None => writeln!(body, "redis: not used (REDIS_URL is not set)"),
        Some(Ok(())) => writeln!(body, "redis: ok"),
        Some(Err(why)) => writeln!(body, "redis: down ({why})"),
    };
    let mut response = if health.is_ok() {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    response
        .content_type("text/plain; charset=utf-8")
        .body(body)
}

/// `200` `ready` while this instance can take new streams and writes; `503` while its database
/// does not answer (or its writes fail), or while it drains before stopping. Redis does not
/// count: without it streams still get their results (from the store, at the next resync), and
/// a Redis outage would otherwise take every instance out of the load balancer at once.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let not_ready = if state.draining.load(Ordering::Relaxed) {
        Some("draining: this instance is stopping".to_owned())
    } else {
        let health = state.jobs.health().await;
        let kind = health.database_kind;
        health
            .database
            .err()
            .map(|why| format!("database: {why} ({kind})"))
    };
    let (mut response, body) = match not_ready {
        None => (HttpResponse::Ok(), "ready\n".to_owned()),
        Some(why) => (
            HttpResponse::ServiceUnavailable(),
            format!("not ready\n{why}\n"),
        ),
    };
    response
        .content_type("text/plain; charset=utf-8")
        .body(body)
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    state
        .metrics
        .watched_jobs
        .set(state.jobs.watched_jobs() as i64);
    for (kind, waiting, room) in state.jobs.writes_waiting() {
        let kind = [("kind", kind)];
        let metrics = &state.metrics;
        metrics
            .writes_waiting
            .get_or_create(&kind)
            .set(waiting as i64);
        metrics.write_room.get_or_create(&kind).set(room as i64);
    }
    HttpResponse::Ok()
        .content_type("application/openmetrics-text; version=1.0.0; charset=utf-8")
        .body(state.metrics.render())
}
