//! The one stream type behind both endpoints: `/sse/connect/{id}` is a watch of one job.
//!
//! A stream writes its connect event; then, in the order asked, what was known when it opened
//! (a job that does not exist, a job that had ended); then the news of the jobs it still waits
//! on, taking them in turn so that a busy job does not starve the others, each dropped at its
//! ending. It ends when no job is left, at its deadline, or when the hub closes for shutdown.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};

use actix_web_lab::sse;
use futures_util::stream::Stream;
use pin_project_lite::pin_project;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;

use super::pacing::{ProgressPace, Tick, Ticker};
use super::wire::{self, Greeting};
use crate::domain::JobId;
use crate::jobs::{News, Receipts, Subscription, Update, Watch};
use crate::limits::StreamPermit;
use crate::metrics::StreamGuard;
use crate::routes::AppState;

/// A stream's accounts, besides its events: its place under the caps, its count in the open
/// streams, the counter of events sent, and (webhooks on) the receipts of the endings it wrote.
pub(super) struct StreamAccounting {
    events_sent: Counter<u64, AtomicU64>,
    receipts: Option<Receipts>,
    _open: StreamGuard,
    _permit: StreamPermit,
}

impl StreamAccounting {
    pub(super) fn new(permit: StreamPermit, state: &AppState) -> Self {
        Self {
            events_sent: state.metrics.events_sent.clone(),
            receipts: state.jobs.receipts().cloned(),
            _open: StreamGuard::new(&state.metrics),
            _permit: permit,
        }
    }

    /// The stream is writing job `id`'s ending: counted for the job's webhook.
    fn writes_ending(&self, id: &JobId) {
        if let Some(receipts) = &self.receipts {
            receipts.record(id);
        }
    }

    fn sends(&self, event: sse::Event) -> Poll<Option<sse::Event>> {
        self.events_sent.inc();
        Poll::Ready(Some(event))
    }
}

pin_project! {
    /// One job a stream watches.
    pub(super) struct WatchedJob {
        id: JobId,
        #[pin]
        state: JobState,
        pace: ProgressPace,
    }
}

pin_project! {
    #[project = JobStateProj]
    enum JobState {
        /// It does not exist: said right after the connect event.
        Unknown,
        /// It had ended when the stream opened: said right after the connect event.
        Ended { news: Arc<News> },
        Waiting {
            #[pin]
            subscription: Subscription,
        },
        /// Its ending was written (the one job of a stream; a shared stream drops the job).
        Done,
    }
}

impl WatchedJob {
    /// Job `id` as [`Jobs::watch`](crate::jobs::Jobs::watch) found it; `None`: it does not exist.
    pub(super) fn new(id: JobId, watch: Option<Watch>) -> Self {
        let state = match watch {
            None => JobState::Unknown,
            Some(Watch::Ended(news)) => JobState::Ended { news },
            Some(Watch::Waiting(subscription)) => JobState::Waiting { subscription },
        };
        Self {
            id,
            state,
            pace: ProgressPace::default(),
        }
    }

    /// Its ending is written: its subscription leaves the hub now.
    fn finish(self: Pin<&mut Self>) {
        self.project().state.set(JobState::Done);
    }

    /// What was known of the job when the stream opened, if there is anything to say; an ending
    /// is counted in `accounting`'s receipts.
    fn opening_event(&self, accounting: &StreamAccounting) -> Option<sse::Event> {
        match &self.state {
            JobState::Unknown => Some(wire::unknown_event(&self.id)),
            JobState::Ended { news } => {
                accounting.writes_ending(&self.id);
                Some(wire::news_event(&self.id, news))
            }
            JobState::Waiting { .. } | JobState::Done => None,
        }
    }

    /// The job's next news, progress only as its pace allows.
    fn poll_news(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        now: Instant,
        ticker: Pin<&mut Ticker>,
    ) -> Poll<Option<Arc<News>>> {
        let this = self.project();
        let JobStateProj::Waiting { subscription } = this.state.project() else {
            // Only waiting jobs are left once the opening events are written.
            return Poll::Pending;
        };
        let polled = subscription.poll_update(cx, this.pace.allows(now));
        if let Poll::Ready(Some(news)) = &polled
            && matches!(news.update, Update::Progress(_))
        {
            this.pace.sent(now, ticker);
        }
        polled
    }
}

pin_project! {
    /// The jobs a stream watches: one inline, as the thousands of one-job streams need no more
    /// room and no allocation of their own; several each in a box of its own, as a
    /// [`Subscription`] must not move.
    #[project = WatchedProj]
    pub(super) enum Watched {
        One {
            #[pin]
            job: WatchedJob,
        },
        Many { jobs: Vec<Pin<Box<WatchedJob>>> },
    }
}

impl Watched {
    pub(super) fn new(mut jobs: Vec<WatchedJob>) -> Self {
        match jobs.pop() {
            Some(job) if jobs.is_empty() => Self::One { job },
            last => Self::Many {
                jobs: jobs.into_iter().chain(last).map(Box::pin).collect(),
            },
        }
    }

    /// Every job, in the order asked.
    fn ids(&self) -> impl Iterator<Item = &JobId> + Clone {
        let (one, many) = match self {
            Self::One { job } => (Some(&job.id), &[][..]),
            Self::Many { jobs } => (None, &jobs[..]),
        };
        one.into_iter().chain(many.iter().map(|job| &job.id))
    }

    /// The jobs left.
    fn len(&self) -> usize {
        match self {
            Self::One { job } => usize::from(!matches!(job.state, JobState::Done)),
            Self::Many { jobs } => jobs.len(),
        }
    }

    fn job(self: Pin<&mut Self>, i: usize) -> Pin<&mut WatchedJob> {
        match self.project() {
            WatchedProj::One { job } => job,
            WatchedProj::Many { jobs } => jobs[i].as_mut(),
        }
    }

    fn get(&self, i: usize) -> &WatchedJob {
        match self {
            Self::One { job } => job,
            Self::Many { jobs } => &jobs[i],
        }
    }

    /// Drops job `i`, keeping the others in the order asked: the opening events leave the
    /// waiting jobs in that order for the turns that follow.
    fn remove(self: Pin<&mut Self>, i: usize) {
        match self.project() {
            WatchedProj::One { job } => job.finish(),
            WatchedProj::Many { jobs } => drop(jobs.remove(i)),
        }
    }

    /// Drops job `i`, the last one taking its place.
    fn swap_remove(self: Pin<&mut Self>, i: usize) {
        match self.project() {
            WatchedProj::One { job } => job.finish(),
            WatchedProj::Many { jobs } => drop(jobs.swap_remove(i)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// The connect event is next.
    Greet(Greeting),
    /// Next, what was known when the stream opened, job by job from `next`.
    Open,
    /// Next, the news of the jobs still waiting.
    Follow,
}

pin_project! {
    /// One open stream: everything it owns, and the state it is in. Dropping it (the stream
    /// ended or the client vanished) leaves the hub and uncounts the stream. Written by hand so
    /// that it holds each piece of state once and its timer inline: thousands are alive at once.
    pub(super) struct EventStream {
        phase: Phase,
        // The job the next poll looks at first: in the opening, the next to say something about;
        // then the one after the last that had news, so that a busy job does not starve the others.
        // A byte, beside `phase`, as a stream watches at most `MAX_WATCHED` jobs.
        next: u8,
        #[pin]
        watched: Watched,
        accounting: StreamAccounting,
        #[pin]
        ticker: Ticker,
    }

    impl PinnedDrop for EventStream {
        fn drop(this: Pin<&mut Self>) {
            match &this.watched {
                Watched::One { job } => log::debug!(job:% = job.id; "stream closed on job {}", job.id),
                Watched::Many { jobs } => {
                    log::debug!("shared stream closed, {} job(s) still waited on", jobs.len());
                }
            }
        }
    }
}

const _: () = assert!(super::MAX_WATCHED < u8::MAX as usize);

impl EventStream {
    pub(super) fn new(
        greeting: Greeting,
        watched: Watched,
        accounting: StreamAccounting,
        ticker: Ticker,
    ) -> Self {
        Self {
            phase: Phase::Greet(greeting),
            next: 0,
            watched,
            accounting,
            ticker,
        }
    }
}

impl Stream for EventStream {
    type Item = sse::Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<sse::Event>> {
        let mut this = self.project();
        if let Phase::Greet(greeting) = *this.phase {
            *this.phase = Phase::Open;
            return this
                .accounting
                .sends(wire::connect_event(greeting, this.watched.ids()));
        }
        if let Phase::Open = *this.phase {
            while usize::from(*this.next) < this.watched.len() {
                let i = usize::from(*this.next);
                match this.watched.get(i).opening_event(this.accounting) {
                    Some(event) => {
                        this.watched.as_mut().remove(i);
                        return this.accounting.sends(event);
                    }
                    None => *this.next += 1,
                }
            }
            *this.phase = Phase::Follow;
            *this.next = 0;
        }
        let count = this.watched.len();
        if count == 0 {
            return Poll::Ready(None);
        }
        let now = Instant::now();
        for turn in 0..count {
            let i = (usize::from(*this.next) + turn) % count;
            let mut job = this.watched.as_mut().job(i);
            match job.as_mut().poll_news(cx, now, this.ticker.as_mut()) {
                Poll::Ready(Some(news)) => {
                    let event = wire::news_event(&job.id, &news);
                    if let Update::End(_) = news.update {
                        this.accounting.writes_ending(&job.id);
                        this.watched.as_mut().swap_remove(i);
                    }
                    *this.next = u8::try_from(i + 1).unwrap_or(0);
                    return this.accounting.sends(event);
                }
                // The hub closed for shutdown; the browser reconnects elsewhere.
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
        }
        // Reports held back go out when their quiet time is over.
        let held = (0..count).filter_map(|i| this.watched.get(i).pace.holds_until(now));
        if let Some(until) = held.min() {
            this.ticker.as_mut().wake_by(until);
        }
        this.ticker.poll_tick(cx).map(|tick| match tick {
            Tick::KeepAlive => Some(wire::keep_alive()),
            Tick::Deadline => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_job_stream_holds_each_piece_of_state_once_and_no_more() {
        // The other states and the shared stream's list fit in the room of the subscription.
        assert_eq!(size_of::<JobState>(), size_of::<Subscription>());
        assert_eq!(size_of::<Watched>(), size_of::<WatchedJob>());
        let parts = size_of::<JobId>()
            + size_of::<Subscription>()
            + size_of::<ProgressPace>()
            + size_of::<StreamAccounting>()
            + size_of::<Ticker>();
        // The phase and the cursor take two bytes, rounded up to the alignment.
        assert_eq!(size_of::<EventStream>(), parts + 8);
    }
}
