//! The event streams: `GET /sse/connect/{id}` for one job, as page A listens to it, and
//! `GET /sse/watch?ids=…` for up to 32 jobs on one stream, which `handoff.js` shares between all
//! the tabs of a browser. Both are the same stream (`stream`): a connect is a watch of one job
//! that names it in its connect event and answers `404` for a job that does not exist.
//!
//! The protocol extends the one of the Spring server Handoff replaces (README, "Event protocol"),
//! so its client keeps working: `retry:`, then `event: result` with `{"status":"connect",
//! "moveUrl":""}`; while the job is pending, `event: progress` with its latest report (the Spring
//! client does not listen for it); when the job ends, `event: result` with `{"status":"result"
//! (complete), "failed" or "expired", "moveUrl":"…"}` and the end of the stream. Every event about
//! a job names it (`"id"`); a client that does not know the field ignores it. `:` comments keep
//! idle proxies from cutting the stream; after the stream timeout it ends cleanly and the browser
//! reconnects after `retry`. The wire format (event names, JSON fields) lives in `wire` and
//! nowhere else; the keep-alives, the timeout and the progress pace in `pacing`.

mod pacing;
mod stream;
mod wire;

use std::time::Duration;

use actix_web::{HttpMessage as _, HttpRequest, Responder, web};
use actix_web_lab::sse::Sse;

use super::error::AppError;
use super::{AppState, job_id};
use crate::domain::JobId;
use crate::jobs::JobsError;
use crate::limits::{StreamEnds, StreamPermit};
use pacing::Ticker;
use stream::{EventStream, StreamAccounting, Watched, WatchedJob};
use wire::Greeting;

/// The stream timing, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct SseSettings {
    pub timeout: Duration,
    pub retry: Duration,
    pub keep_alive: Duration,
}

/// The most jobs one shared stream watches.
pub const MAX_WATCHED: usize = 32;

/// `GET /sse/connect/{id}`: the stream of one job; `404` when there is no such job.
pub async fn connect(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<impl Responder, AppError> {
    let id = job_id(&path)?;
    let client = state.lookup(&req)?;
    let permit = admit(&req, &state)?;
    let watch = state.jobs.watch(&id).await.inspect_err(|err| {
        if matches!(err, JobsError::NotFound) {
            state.lookups.missed(client, 1);
        }
    })?;
    log::debug!(job:% = id; "stream opened on job {id} from {:?}", req.peer_addr());
    let watched = Watched::One {
        job: WatchedJob::new(id, Some(watch)),
    };
    Ok(respond(&req, Greeting::Job, watched, permit, &state))
}

/// `GET /sse/watch?ids=…`: one stream for several jobs. It ends once every watched job has ended
/// (or is unknown), or at the stream timeout.
pub async fn watch(
    req: HttpRequest,
    query: web::Query<WatchQuery>,
    state: web::Data<AppState>,
) -> Result<impl Responder, AppError> {
    let ids = watched_ids(query.ids.as_deref())?;
    let client = state.lookup(&req)?;
    let permit = admit(&req, &state)?;
    let watches = state.jobs.watch_many(&ids).await?;
    state.lookups.missed(
        client,
        watches.iter().filter(|watch| watch.is_none()).count(),
    );
    log::debug!("shared stream opened on {} job(s)", ids.len());
    let jobs = ids.into_iter().zip(watches);
    let watched = Watched::new(jobs.map(|(id, watch)| WatchedJob::new(id, watch)).collect());
    Ok(respond(&req, Greeting::Watch, watched, permit, &state))
}

/// Takes a place under the stream caps for `req`'s client, or says which cap is reached.
fn admit(req: &HttpRequest, state: &AppState) -> Result<StreamPermit, AppError> {
    // Admission before anything else: a refused stream costs no hub entry and no query.
    Ok(state
        .limits
        .admit(state.client_addr(req))
        .inspect_err(|_| {
            state.metrics.streams_refused.inc();
        })?)
}

/// The stream of `watched`, with the headers and `retry:` every stream is answered with; `req`
/// is told when it ends ([`StreamEnds`]).
fn respond(
    req: &HttpRequest,
    greeting: Greeting,
    watched: Watched,
    permit: StreamPermit,
    state: &AppState,
) -> impl Responder + use<> {
    let accounting = StreamAccounting::new(permit, state);
    let ticker = Ticker::new(state.sse);
    req.extensions_mut().insert(StreamEnds(ticker.deadline()));
    let events = EventStream::new(greeting, watched, accounting, ticker);
    Sse::from_infallible_stream(events)
        .with_retry_duration(state.sse.retry)
        .customize()
        .insert_header(("X-Accel-Buffering", "no"))
}

#[derive(serde::Deserialize)]
pub struct WatchQuery {
    ids: Option<String>,
}

/// Parses `ids=ID1,ID2,…`: 1 to [`MAX_WATCHED`] distinct, well-formed job ids.
fn watched_ids(raw: Option<&str>) -> Result<Vec<JobId>, AppError> {
    let bad = |why: String| AppError::BadRequest(why);
    let raw = raw.unwrap_or_default();
    if raw.is_empty() {
        return Err(bad(
            "ids is empty: give 1 to 32 job ids, comma-separated".into()
        ));
    }
    let parts: Vec<&str> = raw.split(',').collect();
    if parts.len() > MAX_WATCHED {
        return Err(bad(format!(
            "{} ids: one stream watches at most {MAX_WATCHED}",
            parts.len()
        )));
    }
    let mut ids: Vec<JobId> = Vec::with_capacity(parts.len());
    for part in parts {
        let id = JobId::parse(part).map_err(|_| {
            let shown: String = part.chars().take(40).collect();
            bad(format!("malformed job id {shown:?} in ids"))
        })?;
        if ids.contains(&id) {
            return Err(bad(format!("job id {id} is in ids twice")));
        }
        ids.push(id);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_list_must_hold_one_to_32_distinct_well_formed_ids() {
        let id = || JobId::generate().to_string();
        let (a, b) = (id(), id());
        assert_eq!(watched_ids(Some(&format!("{a},{b}"))).unwrap().len(), 2);
        let many: Vec<String> = (0..33).map(|_| id()).collect();
        for (raw, why) in [
            (String::new(), "empty"),
            (many.join(","), "at most 32"),
            (format!("{a},{a}"), "twice"),
            (format!("{a},nope"), "malformed"),
            (format!("{a},"), "malformed"),
        ] {
            let err = watched_ids(Some(&raw)).unwrap_err().to_string();
            assert!(err.contains(why), "{raw}: {err}");
        }
        assert!(watched_ids(None).unwrap_err().to_string().contains("empty"));
    }
}
