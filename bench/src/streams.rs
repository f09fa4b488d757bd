//! The subscribers: N event streams opened at a bounded concurrency, each watching for its one
//! result event, and the board where every arrival is recorded exactly as it happened.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::http::{connect, request, source_for};
use crate::target::UrlTemplate;

/// What marks a result event in a stream's `data:`: Handoff's own payload, and the body the
/// bench publishes to generic targets.
pub const RESULT_MARK: &str = r#""status":"result""#;

/// One stream's record: how many result events it saw, and when the first arrived.
#[derive(Default)]
struct Slot {
    results: AtomicU32,
    first_at_nanos: AtomicU64,
}

/// Every stream's arrivals, on one clock.
pub struct Board {
    base: Instant,
    slots: Box<[Slot]>,
    delivered: AtomicUsize,
    duplicates: AtomicUsize,
}

impl Board {
    pub fn new(streams: usize) -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            slots: (0..streams).map(|_| Slot::default()).collect(),
            delivered: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
        })
    }

    fn record(&self, stream: usize, at: Instant) {
        let slot = &self.slots[stream];
        if slot.results.fetch_add(1, Ordering::Relaxed) > 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let nanos = u64::try_from(at.duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        slot.first_at_nanos.store(nanos, Ordering::Relaxed);
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until `want` streams (those that opened) have their result, or `deadline`.
    /// Arrival times are taken by the streams themselves, so this wait's granularity costs nothing.
    pub async fn wait_for(&self, want: usize, deadline: Instant) {
        while self.delivered() < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    pub fn delivered(&self) -> usize {
        self.delivered.load(Ordering::Relaxed)
    }

    pub fn duplicates(&self) -> usize {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// When stream `i` got its first result, if it did.
    pub fn arrival(&self, stream: usize) -> Option<Instant> {
        let slot = &self.slots[stream];
        (slot.results.load(Ordering::Relaxed) > 0)
            .then(|| self.base + Duration::from_nanos(slot.first_at_nanos.load(Ordering::Relaxed)))
    }
}

/// Stream `index` is open (answered 200) after `Ok(connect time)`, or failed to open.
pub struct Opened {
    pub result: Result<Duration, String>,
}

/// How the streams are opened and read.
pub struct Opening {
    pub streams: usize,
    /// Streams being opened at once.
    pub concurrency: usize,
    /// Close each stream as soon as its result arrives, as page A does.
    pub leave_on_result: bool,
    /// No stream is still being opened after this.
    pub deadline: Instant,
    /// Added to each stream's index to pick its source address and port, so that the processes
    /// of one split run never pick the same ones.
    pub index_base: usize,
    /// Where this run's source ports start (see [`port_seed`]); the same in every part of a
    /// split run, so that their index ranges map to ports that do not overlap.
    pub port_seed: usize,
}

/// A large prime step per second: back-to-back runs use different source ports.
pub fn port_seed() -> usize {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            usize::try_from(d.as_secs())
                .unwrap_or(0)
                .wrapping_mul(2_003)
        })
}

/// Spawns one task per stream, spread over `templates` (the instances); each reports how its opening went on the returned channel, then
/// reads its stream until the stream ends, `stop` is cancelled, or (with `leave_on_result`) its
/// result arrives.
pub fn open_all(
    templates: &[UrlTemplate],
    channel_of: impl Fn(usize) -> String,
    opening: &Opening,
    board: &Arc<Board>,
    stop: &CancellationToken,
) -> mpsc::UnboundedReceiver<Opened> {
    let &Opening {
        streams,
        concurrency,
        leave_on_result,
        deadline,
        index_base,
        port_seed: run,
    } = opening;
    let (tx, rx) = mpsc::unbounded_channel();
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    for index in 0..streams {
        // Stream i goes to instance i mod k: every instance holds an equal share.
        let template = &templates[index % templates.len()];
        let path = template.path(&channel_of(index));
        let (addr, host) = (template.addr, template.host.clone());
        let (gate, board, stop, tx) = (gate.clone(), board.clone(), stop.clone(), tx.clone());
        tokio::spawn(async move {
            let opening = async {
                let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
                let start = Instant::now();
                let mut sender = connect(addr, source_for(addr, index_base + index, run)).await?;
                let mut req = request("GET", &host, &path, None);
                req.headers_mut().insert(
                    "accept",
                    hyper::header::HeaderValue::from_static("text/event-stream"),
                );
                let resp = sender
                    .send_request(req)
                    .await
                    .map_err(|e| format!("request: {e}"))?;
                if resp.status() != hyper::StatusCode::OK {
                    return Err(format!("status {}", resp.status()));
                }
                Ok((start.elapsed(), sender, resp.into_body()))
            };
            let opened = timeout_at(deadline, opening)
                .await
                .unwrap_or_else(|_| Err("not open before the timeout".into()));
            let (connect_time, _sender, mut body) = match opened {
                Ok(open) => open,
                Err(why) => {
                    let _ = tx.send(Opened { result: Err(why) });
                    return;
                }
            };
            let _ = tx.send(Opened {
                result: Ok(connect_time),
            });
            let mut parser = EventParser::default();
            loop {
                let frame = tokio::select! {
                    frame = body.frame() => frame,
                    () = stop.cancelled() => return,
                };
                let Some(Ok(frame)) = frame else { return };
                let at = Instant::now();
                if let Ok(data) = frame.into_data() {
                    let results = parser.results_in(&data);
                    for _ in 0..results {
                        board.record(index, at);
                    }
                    if leave_on_result && results > 0 {
                        return;
                    }
                }
            }
        });
    }
    rx
}

/// Splits a `text/event-stream` into events and counts the result events.
#[derive(Default)]
struct EventParser {
    pending: Vec<u8>,
}

impl EventParser {
    /// Feeds a chunk; returns how many result events it completed.
    fn results_in(&mut self, chunk: &[u8]) -> usize {
        self.pending.extend_from_slice(chunk);
        let mut found = 0;
        while let Some(end) = find_blank_line(&self.pending) {
            let event: Vec<u8> = self.pending.drain(..end).collect();
            let text = String::from_utf8_lossy(&event);
            if text
                .lines()
                .any(|line| line.starts_with("data:") && line.contains(RESULT_MARK))
            {
                found += 1;
            }
        }
        found
    }
}

/// The end (exclusive, past the blank line) of the first complete event in `buf`.
fn find_blank_line(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_events_are_counted_across_chunk_boundaries() {
        let mut parser = EventParser::default();
        assert_eq!(
            parser.results_in(b"retry: 1000\n\nevent: result\ndata: {\"status\":\"connect\"}\n\n"),
            0
        );
        assert_eq!(
            parser.results_in(b": keep-alive\n\nevent: result\ndata: {\"status\":\"res"),
            0
        );
        assert_eq!(parser.results_in(b"ult\",\"moveUrl\":\"/x\"}\n\n"), 1);
        assert_eq!(
            parser.results_in(b"id: 1:0\r\ndata: {\"status\":\"result\"}\r\n\r\n"),
            1
        );
    }
}
