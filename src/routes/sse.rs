//! `GET /sse/connect/{id}`: the event stream page A listens to.
//!
//! Protocol (kept from the original server): `retry:`, then `event: result` with
//! `{"status":"connect","moveUrl":""}`, then, when the job completes, `event: result` with
//! `{"status":"result","moveUrl":"…"}` and the end of the stream. `:` comments keep idle
//! proxies from cutting the stream; after the stream timeout it ends cleanly and the browser
//! reconnects after `retry`.

use actix_web::{HttpRequest, Responder, web};
use actix_web_lab::sse::{self, Sse};
use bytestring::ByteString;
use futures_util::stream::Stream;
use pin_project_lite::pin_project;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep, sleep_until};

use super::job_id;
use crate::domain::JobId;
use crate::error::AppError;
use crate::hub::{ResultData, Subscription, event_data};
use crate::limits::StreamPermit;
use crate::metrics::{Metrics, StreamGuard};
use crate::startup::{AppState, SseSettings};

pub async fn connect(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<impl Responder, AppError> {
    let id = job_id(&path)?;
    // Admission before anything else: a refused stream costs no hub entry and no query.
    let permit = state
        .limits
        .admit(state.proxies.client_addr(&req))
        .inspect_err(|_| {
            state.metrics.streams_refused.inc();
        })?;
    // Subscribe first, then read the status: see `Hub::subscribe`. The read is skipped when
    // this job's result has reached its streams here, or another of them read it as pending.
    let subscription = state.hub.subscribe(&id);
    let waiting = if let Some(result) = subscription.delivered() {
        Waiting::Done(result)
    } else if subscription.known_pending() {
        Waiting::For(subscription)
    } else {
        let job = state
            .store
            .get_job(&id)
            .await?
            .ok_or(AppError::JobNotFound)?;
        if job.is_complete() {
            Waiting::Done(ResultData::for_job(&job))
        } else {
            subscription.saw_pending();
            Waiting::For(subscription)
        }
    };
    log::debug!("stream opened on job {id} from {:?}", req.peer_addr());
    let events = events(id, waiting, permit, state.sse, &state.metrics);
    Ok(Sse::from_infallible_stream(events)
        .with_retry_duration(state.sse.retry)
        .customize()
        .insert_header(("X-Accel-Buffering", "no")))
}

/// What the stream is waiting for after the connect event.
enum Waiting {
    /// Connect-and-send: the job was complete when the stream opened.
    Done(ResultData),
    For(Subscription),
}

enum Step {
    Connect(Waiting),
    Wait(Subscription),
    Send(ResultData),
    Finished,
}

pin_project! {
    /// One open stream: everything it owns, and the state it is in. Dropping it (the stream
    /// ended or the client vanished) leaves the hub and uncounts the stream. Written by hand
    /// rather than with `unfold` and an async block, which kept a second copy of this state
    /// inside the future and a boxed timer: thousands of these are alive at once.
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
        // The wake-up for the job's result, registered before the result is looked at, so a
        // delivery between the look and the wait still wakes the stream.
        #[pin]
        woken: Option<OwnedNotified>,
    }

    impl PinnedDrop for Events {
        fn drop(this: Pin<&mut Self>) {
            log::debug!("stream closed on job {}", this.id);
        }
    }
}

fn events(
    id: JobId,
    waiting: Waiting,
    permit: StreamPermit,
    settings: SseSettings,
    metrics: &Metrics,
) -> Events {
    let now = Instant::now();
    let deadline = now + settings.timeout;
    Events {
        id,
        step: Step::Connect(waiting),
        events_sent: metrics.events_sent.clone(),
        _guard: StreamGuard::new(metrics),
        _permit: permit,
        keep_alive: settings.keep_alive,
        deadline,
        // The first keep-alive comes one period after the connect event, not at once.
        timer: sleep_until((now + settings.keep_alive).min(deadline)),
        woken: None,
    }
}

impl Stream for Events {
    type Item = sse::Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<sse::Event>> {
        let mut this = self.project();
        let event = match std::mem::replace(this.step, Step::Finished) {
            Step::Finished => return Poll::Ready(None),
            Step::Connect(Waiting::For(subscription)) => {
                *this.step = Step::Wait(subscription);
                data_event(event_data("connect", ""))
            }
            Step::Connect(Waiting::Done(result)) => {
                *this.step = Step::Send(result);
                data_event(event_data("connect", ""))
            }
            Step::Send(result) => data_event(result.0),
            Step::Wait(subscription) => match subscription.poll_result(this.woken.as_mut(), cx) {
                Poll::Ready(Some(result)) => data_event(result.0),
                // The hub closed for shutdown; the browser reconnects elsewhere.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    if this.timer.as_mut().poll(cx).is_pending() {
                        *this.step = Step::Wait(subscription);
                        return Poll::Pending;
                    }
                    let now = Instant::now();
                    if now >= *this.deadline {
                        return Poll::Ready(None);
                    }
                    this.timer
                        .as_mut()
                        .reset((now + *this.keep_alive).min(*this.deadline));
                    *this.step = Step::Wait(subscription);
                    return Poll::Ready(Some(sse::Event::Comment(KEEP_ALIVE.into())));
                }
            },
        };
        this.events_sent.inc();
        Poll::Ready(Some(event))
    }
}

const KEEP_ALIVE: &str = "keep-alive";

fn data_event(data: ByteString) -> sse::Event {
    sse::Data::new(data).event("result").into()
}
