//! `GET /sse/connect/{id}`: the event stream page A listens to.
//!
//! The protocol extends the one of the Spring server Handoff replaces (README, "Event protocol"),
//! so its client keeps working: `retry:`, then `event: result` with `{"status":"connect",
//! "moveUrl":""}`; while the job is pending, `event: progress` with its latest report (the Spring
//! client does not listen for it); when the job ends, `event: result` with `{"status":"result"
//! (complete), "failed" or "expired", "moveUrl":"…"}` and the end of the stream. `:` comments
//! keep idle proxies from cutting the stream; after the stream timeout it ends cleanly and the
//! browser reconnects after `retry`. The wire format (event names, JSON fields) lives here and
//! nowhere else.

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
use crate::hub::{News, Subscription, Update};
use crate::jobs::Watch;
use crate::limits::StreamPermit;
use crate::metrics::{Metrics, StreamGuard};

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

/// The payload of `event: result`: `data.status` and `data.moveUrl`, which the Spring client
/// reads, then `message` for a failure. `status` comes first, as the Spring server wrote it.
#[derive(serde::Serialize)]
struct EventData<'a> {
    status: &'a str,
    #[serde(rename = "moveUrl")]
    move_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<Option<&'a str>>,
}

/// The payload of `event: progress`.
#[derive(serde::Serialize)]
struct ProgressData<'a> {
    status: &'static str,
    percent: Option<f64>,
    message: Option<&'a str>,
}

fn to_json(data: &impl serde::Serialize) -> ByteString {
    // Serializing strings and numbers cannot fail.
    ByteString::from(serde_json::to_string(data).unwrap_or_default())
}

fn connect_data() -> ByteString {
    to_json(&EventData {
        status: "connect",
        move_url: "",
        message: None,
    })
}

/// The `data:` of an update: `{"status":"result"|"failed"|"expired","moveUrl":"…"}` for an
/// ending (with `message` for a failure), `{"status":"progress","percent":…,"message":…}`.
fn update_data(update: &Update) -> ByteString {
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
                status,
                move_url: ending.target().as_str(),
                message,
            })
        }
        Update::Progress(progress) => to_json(&ProgressData {
            status: "progress",
            percent: progress.percent.map(Percent::get),
            message: progress.message.as_ref().map(|m| m.as_str()),
        }),
    }
}

fn data_event(event: &'static str, data: ByteString) -> sse::Event {
    sse::Data::new(data).event(event).into()
}

fn news_event(news: &News) -> sse::Event {
    let event = match news.update {
        Update::End(_) => EVENT,
        Update::Progress(_) => PROGRESS_EVENT,
    };
    data_event(event, news.encoded(update_data))
}

pub async fn connect(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<impl Responder, AppError> {
    let id = job_id(&path)?;
    // Admission before anything else: a refused stream costs no hub entry and no query.
    let permit = state
        .limits
        .admit(state.client_addr(&req))
        .inspect_err(|_| {
            state.metrics.streams_refused.inc();
        })?;
    let watch = state.jobs.watch(&id).await?;
    log::debug!("stream opened on job {id} from {:?}", req.peer_addr());
    let events = events(id, watch, permit, state.sse, &state.metrics);
    Ok(Sse::from_infallible_stream(events)
        .with_retry_duration(state.sse.retry)
        .customize()
        .insert_header(("X-Accel-Buffering", "no")))
}

enum Step {
    /// The connect event is next; then the news, if the job had ended already.
    Connect(Option<Arc<News>>),
    Send(Arc<News>),
    Wait,
    Finished,
}

pin_project! {
    /// One open stream: everything it owns, and the state it is in. Dropping it (the stream
    /// ended or the client vanished) leaves the hub and uncounts the stream. Written by hand so
    /// that it holds each piece of state once and its timer inline: thousands are alive at once.
    struct Events {
        id: JobId,
        step: Step,
        events_sent: Counter<u64, AtomicU64>,
        _guard: StreamGuard,
        _permit: StreamPermit,
        keep_alive: Duration,
        deadline: Instant,
        // One timer for both jobs: it fires at the next keep-alive or at the deadline,
        // whichever comes first.
        #[pin]
        timer: Sleep,
        #[pin]
        subscription: Option<Subscription>,
    }

    impl PinnedDrop for Events {
        fn drop(this: Pin<&mut Self>) {
            log::debug!("stream closed on job {}", this.id);
        }
    }
}

fn events(
    id: JobId,
    watch: Watch,
    permit: StreamPermit,
    settings: SseSettings,
    metrics: &Metrics,
) -> Events {
    let now = Instant::now();
    let deadline = now + settings.timeout;
    let (step, subscription) = match watch {
        Watch::Ended(news) => (Step::Connect(Some(news)), None),
        Watch::Waiting(subscription) => (Step::Connect(None), Some(subscription)),
    };
    Events {
        id,
        step,
        events_sent: metrics.events_sent.clone(),
        _guard: StreamGuard::new(metrics),
        _permit: permit,
        keep_alive: settings.keep_alive,
        deadline,
        // The first keep-alive comes one period after the connect event, not at once.
        timer: sleep_until((now + settings.keep_alive).min(deadline)),
        subscription,
    }
}

impl Stream for Events {
    type Item = sse::Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<sse::Event>> {
        let mut this = self.project();
        let event = match std::mem::replace(this.step, Step::Finished) {
            Step::Finished => return Poll::Ready(None),
            Step::Connect(ended) => {
                *this.step = ended.map_or(Step::Wait, Step::Send);
                data_event(EVENT, connect_data())
            }
            Step::Send(news) => news_event(&news),
            Step::Wait => {
                let Some(subscription) = this.subscription.as_mut().as_pin_mut() else {
                    return Poll::Ready(None);
                };
                match subscription.poll_next(cx) {
                    Poll::Ready(Some(news)) => {
                        if matches!(news.update, Update::Progress(_)) {
                            *this.step = Step::Wait;
                        }
                        news_event(&news)
                    }
                    // The hub closed for shutdown; the browser reconnects elsewhere.
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {
                        *this.step = Step::Wait;
                        if this.timer.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        let now = Instant::now();
                        if now >= *this.deadline {
                            *this.step = Step::Finished;
                            return Poll::Ready(None);
                        }
                        this.timer
                            .as_mut()
                            .reset((now + *this.keep_alive).min(*this.deadline));
                        return Poll::Ready(Some(sse::Event::Comment(KEEP_ALIVE.into())));
                    }
                }
            }
        };
        this.events_sent.inc();
        Poll::Ready(Some(event))
    }
}
