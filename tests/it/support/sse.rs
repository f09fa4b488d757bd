//! Event streams as a client reads them: [`SseReader`] event by event, and [`EventSource`], which
//! reconnects as a browser does. The parsing is the `sse-stream` crate's; what it leaves out,
//! comment lines (the keep-alives), is counted on the bytes on their way to it.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use serde_json::Value;
pub use sse_stream::Sse;

use super::WAIT;

type Events = Pin<Box<dyn Stream<Item = Result<Sse, sse_stream::Error>> + Send>>;

/// The body of a stream's response: not yet read (a refused stream's error is read whole),
/// being parsed, or ended.
enum Body {
    Unread(reqwest::Response),
    Parsing(Events),
    Ended,
}

/// Reads a `text/event-stream` response event by event. A block carrying only `retry:` is an
/// event here, as the crate gives it; comments are not, and are counted instead.
pub struct SseReader {
    pub response_status: u16,
    pub headers: reqwest::header::HeaderMap,
    body: Body,
    /// Comment lines seen so far, counted by the tap on the body (see [`SseReader::parse`]).
    comments: Arc<AtomicUsize>,
    /// An event that arrived in the same read as a keep-alive, kept for the next read.
    held: Option<Result<Sse, sse_stream::Error>>,
}

impl SseReader {
    /// `GET url` as an `EventSource` sends it, and the answer as it came.
    pub async fn open(client: &reqwest::Client, url: &str) -> Self {
        let response = stream_request(client, url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("stream request to {url}: {e}"));
        Self::from_response(response)
    }

    /// Reads a response already received (e.g. one sent with extra headers).
    pub fn from_response(response: reqwest::Response) -> Self {
        Self {
            response_status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: Body::Unread(response),
            comments: Arc::default(),
            held: None,
        }
    }

    /// Checks the stream was answered `200` and reads its connect event.
    pub async fn expect_connect(&mut self) {
        assert_eq!(self.response_status, 200, "the stream was refused");
        let connect = self.next_result(WAIT).await.expect("a connect event");
        assert_eq!(connect["status"], "connect", "{connect}");
    }

    /// The whole body as text (for a refused stream's JSON error).
    pub async fn into_body(self) -> String {
        match self.body {
            Body::Unread(response) => response.text().await.expect("a body"),
            Body::Parsing(_) | Body::Ended => panic!("the body is being read as a stream"),
        }
    }

    /// How many comment lines (keep-alives) arrived so far.
    pub fn keep_alives(&self) -> usize {
        self.comments.load(Ordering::Relaxed)
    }

    /// The next event (or `retry:` block), skipping comments; `None` when the stream ended or
    /// its connection dropped. Panics after `within`, or on a body that is not an event stream.
    pub async fn next_block(&mut self, within: Duration) -> Option<Sse> {
        tokio::time::timeout(within, self.next_block_unbounded())
            .await
            .unwrap_or_else(|_| panic!("no SSE event within {within:?}"))
    }

    async fn next_block_unbounded(&mut self) -> Option<Sse> {
        let item = match self.held.take() {
            Some(item) => Some(item),
            None => self.events()?.next().await,
        };
        self.event_of(item)
    }

    fn event_of(&mut self, item: Option<Result<Sse, sse_stream::Error>>) -> Option<Sse> {
        match item {
            Some(Ok(event)) => Some(event),
            // A broken connection ends the stream, as a browser sees it.
            None | Some(Err(sse_stream::Error::Body(_))) => {
                self.body = Body::Ended;
                None
            }
            Some(Err(e)) => panic!("not a valid event stream: {e}"),
        }
    }

    /// The body parsed as events, once it is being read; `None` once it ended.
    fn events(&mut self) -> Option<&mut Events> {
        if let Body::Unread(_) = self.body {
            let Body::Unread(response) = std::mem::replace(&mut self.body, Body::Ended) else {
                unreachable!("matched above");
            };
            self.body = Body::Parsing(Self::parse(response, Arc::clone(&self.comments)));
        }
        match &mut self.body {
            Body::Parsing(events) => Some(events),
            Body::Unread(_) | Body::Ended => None,
        }
    }

    /// The crate drops comment lines, so a tap on the bytes counts the lines that start with
    /// `:` before they reach it.
    fn parse(response: reqwest::Response, comments: Arc<AtomicUsize>) -> Events {
        let mut at_line_start = true;
        let bytes = response.bytes_stream().inspect(move |chunk| {
            for &byte in chunk.iter().flatten() {
                if at_line_start && byte == b':' {
                    comments.fetch_add(1, Ordering::Relaxed);
                }
                at_line_start = byte == b'\n' || byte == b'\r';
            }
        });
        Box::pin(sse_stream::SseStream::from_bytes_stream(bytes))
    }

    /// The next `result` event's data, skipping comments and `retry:`; panics on another event.
    pub async fn next_result(&mut self, within: Duration) -> Option<Value> {
        let event = self.next_data_event(within).await?;
        Some(result_of(&event).unwrap_or_else(|| panic!("not a result event: {event:?}")))
    }

    /// The next event of any name with its parsed data, skipping comments and `retry:`; `None`
    /// at the end.
    pub async fn next_event(&mut self, within: Duration) -> Option<(String, Value)> {
        let event = self.next_data_event(within).await?;
        let data = event.data.as_deref().unwrap_or_default();
        let data = serde_json::from_str(data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {data}"));
        Some((event.event.unwrap_or_else(|| "message".into()), data))
    }

    async fn next_data_event(&mut self, within: Duration) -> Option<Sse> {
        loop {
            let event = self.next_block(within).await?;
            if event.data.is_some() || event.event.is_some() {
                return Some(event);
            }
        }
    }

    /// Reads until a keep-alive comment arrives; panics if an event or the end comes first, or
    /// nothing within `within`.
    pub async fn expect_keep_alive(&mut self, within: Duration) {
        let before = self.keep_alives();
        if let Some(held) = &self.held {
            panic!("expected a keep-alive, got {held:?}");
        }
        let read = poll_fn(|cx| {
            let Some(events) = self.events() else {
                return Poll::Ready(None);
            };
            let polled = events.poll_next_unpin(cx);
            if self.keep_alives() > before {
                // An event parsed from the same bytes as the comment waits for the next read.
                if let Poll::Ready(item) = polled {
                    self.held = item;
                }
                return Poll::Ready(Some(KeepAliveOr::KeepAlive));
            }
            polled.map(|item| Some(KeepAliveOr::Item(item)))
        });
        let read = tokio::time::timeout(within, read)
            .await
            .unwrap_or_else(|_| panic!("no keep-alive within {within:?}"));
        match read {
            Some(KeepAliveOr::KeepAlive) => {}
            Some(KeepAliveOr::Item(item)) => match self.event_of(item) {
                Some(event) => panic!("expected a keep-alive, got {event:?}"),
                None => panic!("expected a keep-alive, the stream ended"),
            },
            None => panic!("expected a keep-alive, the stream had ended"),
        }
    }

    /// Reads the connect event, then the result event, then the end of the stream.
    pub async fn expect_connect_result_end(&mut self, within: Duration) -> Value {
        let connect = self.next_result(within).await.expect("a connect event");
        assert_eq!(connect["status"], "connect", "{connect}");
        assert_eq!(connect["moveUrl"], "", "{connect}");
        let result = self.next_result(within).await.expect("a result event");
        assert_eq!(result["status"], "result", "{result}");
        assert_eq!(
            self.next_block(within).await,
            None,
            "the stream ends after the result"
        );
        result
    }
}

/// What [`SseReader::expect_keep_alive`] read first.
enum KeepAliveOr {
    KeepAlive,
    Item(Option<Result<Sse, sse_stream::Error>>),
}

/// The parsed data of `event` when it is a `result` event.
pub fn result_of(event: &Sse) -> Option<Value> {
    if event.event.as_deref() != Some("result") {
        return None;
    }
    serde_json::from_str(event.data.as_deref()?).ok()
}

fn stream_request(client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
    client.get(url).header("Accept", "text/event-stream")
}

/// What a browser's `EventSource` does, over reqwest: when its stream ends or its connection
/// drops, it waits the last `retry:` it was sent and connects again, until a `result` event with
/// status `result` arrives. Like a browser it gives up on a response that is not `200`.
pub struct EventSource {
    client: reqwest::Client,
    url: String,
    retry: Duration,
    opened: Arc<Mutex<Vec<Instant>>>,
}

impl EventSource {
    pub fn new(client: &reqwest::Client, url: &str) -> Self {
        Self {
            client: client.clone(),
            url: url.to_owned(),
            // Chromium's default until the server sends a `retry:`.
            retry: Duration::from_secs(3),
            opened: Arc::default(),
        }
    }

    /// When each of its streams opened (a `200` arrived), so far; shared with the running task.
    pub fn opened(&self) -> Arc<Mutex<Vec<Instant>>> {
        Arc::clone(&self.opened)
    }

    /// Reads, reconnecting as often as needed, until the result; panics after `within` overall.
    pub async fn result(mut self, within: Duration) -> Value {
        let url = self.url.clone();
        tokio::time::timeout(within, self.read_until_result())
            .await
            .unwrap_or_else(|_| panic!("no result on {url} within {within:?}"))
    }

    async fn read_until_result(&mut self) -> Value {
        loop {
            // A connection refused or dropped before the answer is a network error: a browser
            // reconnects after `retry` then too.
            if let Ok(response) = stream_request(&self.client, &self.url).send().await {
                let status = response.status();
                assert_eq!(status, 200, "a browser gives up on a {status} event stream");
                self.opened.lock().expect("opened log").push(Instant::now());
                let mut reader = SseReader::from_response(response);
                while let Some(event) = reader.next_block_unbounded().await {
                    if let Some(ms) = event.retry {
                        self.retry = Duration::from_millis(ms);
                    }
                    if let Some(data) = result_of(&event)
                        && data["status"] == "result"
                    {
                        return data;
                    }
                }
            }
            tokio::time::sleep(self.retry).await;
        }
    }
}

/// A task per `(job id, stream)` that says whether the stream's result sends its browser to the
/// job's own page B (`/test.do?id=…`, the default target) within a minute.
pub fn default_results(streams: Vec<(String, SseReader)>) -> Vec<tokio::task::JoinHandle<bool>> {
    streams
        .into_iter()
        .map(|(id, mut stream)| {
            tokio::spawn(async move {
                let result = stream.next_result(Duration::from_secs(60)).await;
                result.and_then(|r| r["moveUrl"].as_str().map(str::to_owned))
                    == Some(format!("/test.do?id={id}"))
            })
        })
        .collect()
}
