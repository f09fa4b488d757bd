//! A stream's pacing: its clock (keep-alive comments while nothing else is sent, the end at the
//! stream timeout) and the pace of each job's progress reports.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};

use super::SseSettings;

/// At most one progress event per job per stream this often: a job reporting hundreds of times a
/// second would otherwise fill the socket's buffer with reports the browser reads one by one,
/// and the ending would queue behind them. The latest report is sent when the time has passed.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

pin_project! {
    /// A stream's clock: a keep-alive comment every `keep_alive` while nothing else is sent, and
    /// the end at the deadline. One timer for both, firing at whichever comes first.
    pub(super) struct Ticker {
        keep_alive: Duration,
        deadline: Instant,
        #[pin]
        timer: Sleep,
    }
}

pub(super) enum Tick {
    KeepAlive,
    Deadline,
}

impl Ticker {
    pub(super) fn new(settings: SseSettings) -> Self {
        let now = Instant::now();
        let deadline = now + settings.timeout;
        Self {
            keep_alive: settings.keep_alive,
            deadline,
            // The first keep-alive comes one period after the connect event, not at once.
            timer: sleep_until((now + settings.keep_alive).min(deadline)),
        }
    }

    /// When the stream ends at the latest.
    pub(super) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Makes the timer fire by `at` (to send a report a [`ProgressPace`] held back); what it
    /// fires for then is a keep-alive, which is harmless.
    pub(super) fn wake_by(self: Pin<&mut Self>, at: Instant) {
        let mut timer = self.project().timer;
        if at < timer.deadline() {
            timer.as_mut().reset(at);
        }
    }

    pub(super) fn poll_tick(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Tick> {
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

/// The pace of one job's progress reports on one stream (see [`PROGRESS_EVERY`]).
#[derive(Debug, Default)]
pub(super) struct ProgressPace {
    quiet_until: Option<Instant>,
}

impl ProgressPace {
    /// Whether a report may be sent at `now`.
    pub(super) fn allows(&self, now: Instant) -> bool {
        self.quiet_until.is_none_or(|until| now >= until)
    }

    /// A report was sent at `now`; the ticker wakes the stream when the next one may go.
    pub(super) fn sent(&mut self, now: Instant, ticker: Pin<&mut Ticker>) {
        let until = now + PROGRESS_EVERY;
        self.quiet_until = Some(until);
        ticker.wake_by(until);
    }

    /// Until when a report is held back, if it is at `now`.
    pub(super) fn holds_until(&self, now: Instant) -> Option<Instant> {
        self.quiet_until.filter(|until| *until > now)
    }
}
