//! The event streams: `GET /sse/connect/{id}` for one job, as page A listens to it, and
//! `GET /sse/watch?ids=…` for up to 32 jobs on one stream, which `handoff.js` shares between all
//! the tabs of a browser.
//!
//! The protocol extends the one of the Spring server Handoff replaces (README, "Event protocol"),
//! so its client keeps working: `retry:`, then `event: result` with `{"status":"connect",
//! "moveUrl":""}`; while the job is pending, `event: progress` with its latest report (the Spring
//! client does not listen for it); when the job ends, `event: result` with `{"status":"result"
//! (complete), "failed" or "expired", "moveUrl":"…"}` and the end of the stream. Every event about
//! a job names it (`"id"`); a client that does not know the field ignores it. `:` comments keep
//! idle proxies from cutting the stream; after the stream timeout it ends cleanly and the browser
//! reconnects after `retry`. The wire format (event names, JSON fields) lives here and nowhere
//! else.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::{HttpRequest, Responder, web};
use actix_web_lab::sse::{self, Sse};
use bytestring::ByteString;
use futures_util::stream::Stream;
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant, Sleep, sleep_until};

use super::error::AppError;
use super::{AppState, job_id};
use crate::domain::{Ending, JobId, Percent};
use crate::jobs::{News, Receipts, Subscription, Update, Watch};
use crate::limits::StreamPermit;
use crate::metrics::StreamGuard;

/// The stream timing, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct SseSettings {
    pub timeout: Duration,
    pub retry: Duration,
    pub keep_alive: Duration,
}

/// The event name of the connect event and of every ending, as the Spring client listens for it.
const EVENT: &str = "result";
/// The event name of progress reports, which the Spring client does not listen for.
const PROGRESS_EVENT: &str = "progress";
const KEEP_ALIVE: &str = "keep-alive";
/// At most one progress event per job per stream this often: a job reporting hundreds of times a
/// second would otherwise fill the socket's buffer with reports the browser reads one by one,
/// and the ending would queue behind them. The latest report is sent when the time has passed.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The payload of `event: result`: `data.status` and `data.moveUrl`, which the Spring client
/// reads, `message` for a failure, and the job's `id`. `status` comes first, as the Spring server
/// wrote it.
#[derive(serde::Serialize)]
struct EventData<'a> {
    status: &'a str,
    #[serde(rename = "moveUrl", skip_serializing_if = "Option::is_none")]
    move_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    /// The watched jobs, in a shared stream's connect event.
    #[serde(skip_serializing_if = "Option::is_none")]
    ids: Option<&'a [JobId]>,
}

impl<'a> EventData<'a> {
    fn status(status: &'a str) -> Self {
        Self {
            status,
            move_url: None,
            message: None,
            id: None,
            ids: None,
        }
    }
}

/// The payload of `event: progress`.
#[derive(serde::Serialize)]
struct ProgressData<'a> {
    status: &'static str,
    percent: Option<f64>,
    message: Option<&'a str>,
    id: &'a str,
}

fn to_json(data: &impl serde::Serialize) -> ByteString {
    // Serializing strings and numbers cannot fail.
    ByteString::from(serde_json::to_string(data).unwrap_or_default())
}

/// The data of an update about job `id`: `{"status":"result"|"failed"|"expired","moveUrl":"…"}`
/// for an ending (with `message` for a failure), `{"status":"progress","percent":…,"message":…}`.
fn update_data(id: &JobId, update: &Update) -> ByteString {
    let id = id.as_str();
    match update {
        Update::End(ending) => {
            let (status, message) = match ending {
                Ending::Complete { .. } => ("result", None),
                Ending::Failed { message, .. } => {
                    ("failed", Some(message.as_ref().map(|m| m.as_str())))
                }
                Ending::Expired { .. } => ("expired", None),
            };
            to_json(&EventData {
                move_url: Some(ending.target().as_str()),
                message,
                id: Some(id),
                ..EventData::status(status)
            })
        }
        Update::Progress(progress) => to_json(&ProgressData {
            status: "progress",
            percent: progress.percent.map(Percent::get),
            message: progress.message.as_ref().map(|m| m.as_str()),
            id,
        }),
    }
}

fn data_event(event: &'static str, data: ByteString) -> sse::Event {
    sse::Data::new(data).event(event).into()
}

/// An update about job `id`, encoded once per job and shared by all of its streams.
fn news_event(id: &JobId, news: &News) -> sse::Event {
    let event = match news.update {
        Update::End(_) => EVENT,
        Update::Progress(_) => PROGRESS_EVENT,
    };
    data_event(event, news.encoded(|update| update_data(id, update)))
}

/// What every stream needs besides its events: its place under the caps, its count in the
/// metrics, the counter of events sent, and (webhooks on) where it counts the endings it wrote.
struct Held {
    events_sent: Counter<u64, AtomicU64>,
    receipts: Option<Receipts>,
    _guard: StreamGuard,
    _permit: StreamPermit,
}

impl Held {
    fn new(permit: StreamPermit, state: &AppState) -> Self {
        Self {
            events_sent: state.metrics.events_sent.clone(),
            receipts: state.jobs.receipts().cloned(),
            _guard: StreamGuard::new(&state.metrics),
            _permit: permit,
        }
    }

    /// The stream is writing job `id`'s ending: counted for the job's webhook.
    fn writes_ending(&self, id: &JobId) {
        if let Some(receipts) = &self.receipts {
            receipts.record(id);
        }
    }
}

/// The headers and `retry:` every stream is answered with.
fn respond(
    events: impl Stream<Item = sse::Event> + 'static,
    settings: SseSettings,
) -> impl Responder {
    Sse::from_infallible_stream(events)
        .with_retry_duration(settings.retry)
        .customize()
        .insert_header(("X-Accel-Buffering", "no"))
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

pin_project! {
    /// A stream's clock: a keep-alive comment every `keep_alive` while nothing else is sent, and
    /// the end at the deadline. One timer for both, firing at whichever comes first.
    struct Ticker {
        keep_alive: Duration,
        deadline: Instant,
        #[pin]
        timer: Sleep,
    }
}

enum Tick {
    KeepAlive,
    Deadline,
}

impl Ticker {
    fn new(settings: SseSettings) -> Self {
        let now = Instant::now();
        let deadline = now + settings.timeout;
        Self {
            keep_alive: settings.keep_alive,
            deadline,
            // The first keep-alive comes one period after the connect event, not at once.
            timer: sleep_until((now + settings.keep_alive).min(deadline)),
        }
    }

    /// Makes the timer fire by `at` (to send a report held back by [`PROGRESS_EVERY`]); what it
    /// fires for then is a keep-alive, which is harmless.
    fn wake_by(self: Pin<&mut Self>, at: Instant) {
        let mut timer = self.project().timer;
        if at < timer.deadline() {
            timer.as_mut().reset(at);
        }
    }

    fn poll_tick(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Tick> {
        let mut this = self.project();
        if this.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let now = Instant::now();
        if now >= *this.deadline {
            return Poll::Ready(Tick::Deadline);
        }
        this.timer
            .as_mut()
            .reset((now + *this.keep_alive).min(*this.deadline));
        Poll::Ready(Tick::KeepAlive)
    }
}

/// A keep-alive comment, or the end of the stream at its deadline.
fn on_tick(tick: Tick) -> Option<sse::Event> {
    match tick {
        Tick::KeepAlive => Some(sse::Event::Comment(KEEP_ALIVE.into())),
        Tick::Deadline => None,
    }
}

pub async fn connect(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<impl Responder, AppError> {
    let id = job_id(&path)?;
    let permit = admit(&req, &state)?;
    let watch = state.jobs.watch(&id).await?;
    log::debug!("stream opened on job {id} from {:?}", req.peer_addr());
    let (step, subscription) = match watch {
        Watch::Ended(news) => (Step::Connect(Some(news)), None),
        Watch::Waiting(subscription) => (Step::Connect(None), Some(subscription)),
    };
    let events = Events {
        id,
        step,
        held: Held::new(permit, &state),
        quiet_until: None,
        ticker: Ticker::new(state.sse),
        subscription,
    };
    Ok(respond(events, state.sse))
}

enum Step {
    /// The connect event is next; then the news, if the job had ended already.
    Connect(Option<Arc<News>>),
    Send(Arc<News>),
    Wait,
    Finished,
}

pin_project! {
    /// One open stream on one job: everything it owns, and the state it is in. Dropping it (the
    /// stream ended or the client vanished) leaves the hub and uncounts the stream. Written by
    /// hand so that it holds each piece of state once and its timer inline: thousands are alive
    /// at once.
    struct Events {
        id: JobId,
        step: Step,
        held: Held,
        // No progress event before this (see PROGRESS_EVERY).
        quiet_until: Option<Instant>,
        #[pin]
        ticker: Ticker,
        #[pin]
        subscription: Option<Subscription>,
    }

    impl PinnedDrop for Events {
        fn drop(this: Pin<&mut Self>) {
            log::debug!("stream closed on job {}", this.id);
        }
    }
}

fn connect_data(id: &JobId) -> ByteString {
    to_json(&EventData {
        move_url: Some(""),
        id: Some(id.as_str()),
        ..EventData::status("connect")
    })
}

impl Stream for Events {
    type Item = sse::Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<sse::Event>> {
        let mut this = self.project();
        let event = match std::mem::replace(this.step, Step::Finished) {
            Step::Finished => return Poll::Ready(None),
            Step::Connect(ended) => {
                *this.step = ended.map_or(Step::Wait, Step::Send);
                data_event(EVENT, connect_data(this.id))
            }
            Step::Send(news) => {
                this.held.writes_ending(this.id);
                news_event(this.id, &news)
            }
            Step::Wait => {
                let Some(subscription) = this.subscription.as_pin_mut() else {
                    return Poll::Ready(None);
                };
                let now = Instant::now();
                let progress = this.quiet_until.is_none_or(|until| now >= until);
                match subscription.poll_update(cx, progress) {
                    Poll::Ready(Some(news)) => {
                        if matches!(news.update, Update::Progress(_)) {
                            *this.step = Step::Wait;
                            *this.quiet_until = Some(now + PROGRESS_EVERY);
                            this.ticker.as_mut().wake_by(now + PROGRESS_EVERY);
                        } else {
                            this.held.writes_ending(this.id);
                        }
                        news_event(this.id, &news)
                    }
                    // The hub closed for shutdown; the browser reconnects elsewhere.
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {
                        *this.step = Step::Wait;
                        if let Some(until) = this.quiet_until.filter(|_| !progress) {
                            // A report held back goes out when the quiet time is over.
                            this.ticker.as_mut().wake_by(until);
                        }
                        return match this.ticker.as_mut().poll_tick(cx) {
                            Poll::Ready(tick) => {
                                if matches!(tick, Tick::Deadline) {
                                    *this.step = Step::Finished;
                                }
                                Poll::Ready(on_tick(tick))
                            }
                            Poll::Pending => Poll::Pending,
                        };
                    }
                }
            }
        };
        this.held.events_sent.inc();
        Poll::Ready(Some(event))
    }
}

/// The most jobs one shared stream watches.
pub const MAX_WATCHED: usize = 32;

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

/// `GET /sse/watch?ids=…`: one stream for several jobs. It ends once every watched job has ended
/// (or is unknown), or at the stream timeout.
pub async fn watch(
    req: HttpRequest,
    query: web::Query<WatchQuery>,
    state: web::Data<AppState>,
) -> Result<impl Responder, AppError> {
    let ids = watched_ids(query.ids.as_deref())?;
    let permit = admit(&req, &state)?;
    let watched = state.jobs.watch_many(&ids).await?;
    log::debug!("shared stream opened on {} job(s)", ids.len());
    let connect = to_json(&EventData {
        ids: Some(&ids),
        ..EventData::status("connect")
    });
    let held = Held::new(permit, &state);
    let mut first = VecDeque::from([data_event(EVENT, connect)]);
    let mut waiting = Vec::new();
    for (id, watch) in ids.into_iter().zip(watched) {
        match watch {
            None => first.push_back(data_event(
                EVENT,
                to_json(&EventData {
                    id: Some(id.as_str()),
                    ..EventData::status("unknown")
                }),
            )),
            Some(Watch::Ended(news)) => {
                // Counted now: the event is written with the connect event, at the first poll.
                held.writes_ending(&id);
                first.push_back(news_event(&id, &news));
            }
            Some(Watch::Waiting(subscription)) => waiting.push(Waiting {
                id,
                subscription: Box::pin(subscription),
                quiet_until: None,
            }),
        }
    }
    let events = SharedEvents {
        first,
        waiting,
        next: 0,
        held,
        ticker: Ticker::new(state.sse),
    };
    Ok(respond(events, state.sse))
}

/// A job a shared stream still waits on.
struct Waiting {
    id: JobId,
    subscription: Pin<Box<Subscription>>,
    /// No progress event of this job before this (see [`PROGRESS_EVERY`]).
    quiet_until: Option<Instant>,
}

pin_project! {
    /// One shared stream: the events due at once (connect, unknown jobs, jobs ended already),
    /// then the news of every job still waiting, each dropped from the stream at its ending.
    struct SharedEvents {
        first: VecDeque<sse::Event>,
        waiting: Vec<Waiting>,
        // Where the next poll starts, so that a busy job does not starve the others.
        next: usize,
        held: Held,
        #[pin]
        ticker: Ticker,
    }
}

impl Stream for SharedEvents {
    type Item = sse::Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<sse::Event>> {
        let mut this = self.project();
        if let Some(event) = this.first.pop_front() {
            this.held.events_sent.inc();
            return Poll::Ready(Some(event));
        }
        let count = this.waiting.len();
        let now = Instant::now();
        for turn in 0..count {
            let i = (*this.next + turn) % count;
            let job = &mut this.waiting[i];
            let progress = job.quiet_until.is_none_or(|until| now >= until);
            match job.subscription.as_mut().poll_update(cx, progress) {
                Poll::Ready(Some(news)) => {
                    let event = news_event(&job.id, &news);
                    if matches!(news.update, Update::End(_)) {
                        this.held.writes_ending(&job.id);
                        this.waiting.swap_remove(i);
                    } else {
                        job.quiet_until = Some(now + PROGRESS_EVERY);
                        this.ticker.as_mut().wake_by(now + PROGRESS_EVERY);
                    }
                    *this.next = i + 1;
                    this.held.events_sent.inc();
                    return Poll::Ready(Some(event));
                }
                // The hub closed for shutdown; the browser reconnects elsewhere.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
        }
        if this.waiting.is_empty() {
            return Poll::Ready(None);
        }
        // Reports held back go out when their quiet time is over.
        if let Some(until) = this
            .waiting
            .iter()
            .filter_map(|job| job.quiet_until)
            .filter(|until| *until > now)
            .min()
        {
            this.ticker.as_mut().wake_by(until);
        }
        this.ticker.poll_tick(cx).map(on_tick)
    }
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
