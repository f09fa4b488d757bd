//! How long a client may take to send a request: every head within [`TIMING`]`.head` of its first
//! byte, every body within `.body` of its head, and an idle connection closed after `.keep_alive`.
//! Once a request is complete, nothing here limits how long its answer lasts (an event stream
//! legitimately receives nothing from its client for minutes), only how long the client may
//! leave it unread: a connection whose writes make no progress for `.write` is closed, and so is
//! one whose writes are stalled when its event stream's timeout passes ([`StreamEnds`]).
//!
//! Those deadlines are what end a stream whose client stopped reading: once the socket's buffers
//! are full, actix-http stops polling the answer's body, so the stream's own timeout never runs;
//! the socket is the one place that still sees the stalled writes.
//!
//! actix-http 3 (its `h1/dispatcher.rs`) offers less than that, hence this module:
//! - its head timer (`client_request_timeout`) runs for a connection's *first* request only: it is
//!   cleared when the first head is parsed and never set again;
//! - its keep-alive timer closes an idle connection, but the first byte of a next request clears
//!   it: one byte, then silence, held a connection for ever;
//! - nothing limits how long a request body takes.
//!
//! So Handoff accepts connections itself (see `startup`) and wraps each socket in a [`Conn`] that
//! knows the connection's [`Phase`]. The requests on the connection tell it when a head is
//! complete and when its answer has been written ([`track`], a middleware); while the connection
//! waits for a head, a read that finds nothing runs against the head's deadline. [`track`] also
//! gives each request body a deadline. Idle connections are left to actix-http's keep-alive timer,
//! which works for them.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::BoxedPayloadStream;
use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header::ContentType;
use actix_web::http::{ConnectionType, StatusCode};
use actix_web::middleware::Next;
use actix_web::web::Bytes;
use actix_web::{Error, HttpMessage as _, HttpResponse};
use futures_util::Stream;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep, sleep_until};

use super::SECURITY_HEADERS;
use crate::limits::StreamEnds;

/// How long a client may take; see the module documentation.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// From a head's first byte to its end; for a connection's first request, from connecting.
    pub head: Duration,
    /// An idle connection between requests closes after this (actix-http's keep-alive timer).
    pub keep_alive: Duration,
    /// From the end of a head to the end of its body. Bodies are at most 16 KiB.
    pub body: Duration,
    /// How long writes may find the socket full without a byte going out before the connection
    /// is closed; an event stream's connection is closed sooner when its timeout passes first.
    pub write: Duration,
}

pub const TIMING: Timing = Timing {
    head: Duration::from_secs(5),
    keep_alive: Duration::from_secs(5),
    body: Duration::from_secs(10),
    write: Duration::from_secs(15),
};

/// Where a connection is in its request–answer cycle.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Waiting for a request head: since connecting, or since the last answer was written.
    /// Without a byte, actix-http's keep-alive timer closes the connection well before
    /// `deadline`, which only matters when a head pipelined behind the last request was buffered
    /// already, so no new byte starts [`Phase::Head`].
    Waiting { deadline: Instant },
    /// The first bytes of a head arrived; the rest must be in by `deadline`.
    Head { deadline: Instant },
    /// A complete request is being served: its body has its own deadline, its answer none but
    /// the one that holds while the client reads nothing: the write deadline, or `ends`, when
    /// an event stream ends at the latest, whichever comes first.
    Serving { ends: Option<Instant> },
}

/// A connection's phase, shared by its [`Conn`] and the requests on it (as connection data).
/// An `Rc`: a connection and its requests live on one worker thread.
#[derive(Debug, Clone)]
pub struct ConnPhase(Rc<Cell<Phase>>);

impl ConnPhase {
    fn new() -> Self {
        Self(Rc::new(Cell::new(Phase::Waiting {
            deadline: Instant::now() + TIMING.head,
        })))
    }

    fn deadline(&self) -> Option<Instant> {
        match self.0.get() {
            Phase::Waiting { deadline } | Phase::Head { deadline } => Some(deadline),
            Phase::Serving { .. } => None,
        }
    }

    /// When the answer being served ends at the latest, if it says.
    fn answer_ends(&self) -> Option<Instant> {
        match self.0.get() {
            Phase::Serving { ends } => ends,
            Phase::Waiting { .. } | Phase::Head { .. } => None,
        }
    }

    fn bytes_arrived(&self) {
        if let Phase::Waiting { deadline } = self.0.get() {
            let deadline = deadline.min(Instant::now() + TIMING.head);
            self.0.set(Phase::Head { deadline });
        }
    }

    fn request_started(&self) {
        self.0.set(Phase::Serving { ends: None });
    }

    /// The answer being served is an event stream that ends by `at`.
    fn stream_ends(&self, at: Instant) {
        if let Phase::Serving { .. } = self.0.get() {
            self.0.set(Phase::Serving { ends: Some(at) });
        }
    }

    fn answered(&self) {
        let deadline = Instant::now() + TIMING.keep_alive + TIMING.head;
        self.0.set(Phase::Waiting { deadline });
    }
}

/// An accepted socket that closes its connection when a request head is late.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    phase: ConnPhase,
    /// Fires at the current deadline; made when first needed, then reset.
    timer: Option<Pin<Box<Sleep>>>,
    /// Since when writes have found the socket full, without a byte going out since. Then the
    /// dispatcher may still hold part of an answer, and no answer of ours may go in between.
    write_stalled: Option<Instant>,
    /// Fires at the write deadline; made when first needed, then reset.
    write_timer: Option<Pin<Box<Sleep>>>,
}

impl Conn {
    pub fn new(io: TcpStream) -> Self {
        Self {
            io,
            phase: ConnPhase::new(),
            timer: None,
            write_stalled: None,
            write_timer: None,
        }
    }

    /// The handle the connection's requests get (see [`track`]).
    pub fn phase(&self) -> ConnPhase {
        self.phase.clone()
    }

    /// Whether `deadline` has passed; if not, the task is woken when it does.
    fn passed(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }

    /// Passes on a write's outcome, unless writes have found the socket full for
    /// [`TIMING`]`.write`, or found it full when the event stream being written was to end:
    /// then the write fails, and the dispatcher drops the connection (and with it the answer's
    /// body, a stream's place and its subscriptions).
    fn timed(
        &mut self,
        poll: Poll<io::Result<usize>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if poll.is_ready() {
            self.write_stalled = None;
            return poll;
        }
        let unread = *self.write_stalled.get_or_insert_with(Instant::now) + TIMING.write;
        let deadline = self
            .phase
            .answer_ends()
            .map_or(unread, |ends| ends.min(unread));
        let timer = self
            .write_timer
            .get_or_insert_with(|| Box::pin(sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading its answer",
        )))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                this.phase.bytes_arrived();
                return Poll::Ready(Ok(()));
            }
            Poll::Pending => {}
            done => return done,
        }
        let Some(deadline) = this.phase.deadline() else {
            // A request is being served, which for an event stream lasts as long as the stream:
            // its connection should not hold a timer it no longer needs.
            this.timer = None;
            return Poll::Pending;
        };
        if !this.passed(deadline, cx) {
            return Poll::Pending;
        }
        if this.write_stalled.is_some() {
            // Part of the last answer is still waiting to be written: drop the connection.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head timed out",
            )));
        }
        // The socket's send buffer has room, so this small answer goes out whole or not at all.
        let _ = this.io.try_write(&request_timeout_answer());
        // End of input: the dispatcher shuts the connection down in order.
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.timed(poll, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.timed(poll, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The `408` for a late head, written straight to the socket: there is no request to answer
/// through the app. It carries the security headers every other answer carries.
fn request_timeout_answer() -> Vec<u8> {
    let body = late_body("head", TIMING.head);
    let mut answer = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in SECURITY_HEADERS {
        answer.push_str(&format!("{name}: {value}\r\n"));
    }
    answer.push_str("\r\n");
    answer.push_str(&body);
    answer.into_bytes()
}

/// The JSON body of a `408`, in the shape of every error answer: which part of the request was
/// late, and how long it may take.
fn late_body(part: &str, limit: Duration) -> String {
    format!(
        "{{\"error\":\"the request {part} did not arrive within {} s\"}}",
        limit.as_secs()
    )
}

/// Middleware: marks the connection as serving while a request is handled (until when, for an
/// event stream) and as waiting again once its answer is written, and gives the request's body
/// a deadline. A body still arriving at its deadline gets `408` and the connection closes.
pub async fn track(
    mut req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let phase = req.conn_data::<ConnPhase>().cloned();
    if let Some(phase) = &phase {
        phase.request_started();
    }
    let (_, payload) = req.parts_mut();
    let late = match std::mem::replace(payload, Payload::None) {
        Payload::None => None,
        body => {
            let late = Rc::new(Cell::new(false));
            let stream = BodyDeadline {
                body,
                timer: sleep_until(Instant::now() + TIMING.body),
                late: Rc::clone(&late),
            };
            *payload = Payload::from(Box::pin(stream) as BoxedPayloadStream);
            Some(late)
        }
    };
    let res = match next.call(req).await {
        Ok(res) => res,
        Err(err) => {
            // actix-http answers the error itself, in a moment; the connection waits from now.
            if let Some(phase) = &phase {
                phase.answered();
            }
            return Err(err);
        }
    };
    let ends = res.request().extensions().get::<StreamEnds>().copied();
    if let (Some(phase), Some(StreamEnds(at))) = (&phase, ends) {
        phase.stream_ends(at);
    }
    let res = if late.is_some_and(|late| late.get()) {
        // Whatever the handler made of the failed body, the client is told what happened.
        let mut response = HttpResponse::build(StatusCode::REQUEST_TIMEOUT)
            .content_type(ContentType::json())
            .body(late_body("body", TIMING.body));
        // The rest of the body may still come: it must not be read as the next request.
        response
            .head_mut()
            .set_connection_type(ConnectionType::Close);
        ServiceResponse::new(res.into_parts().0, response).map_into_right_body()
    } else {
        res.map_into_left_body()
    };
    Ok(res.map_body(|_, body| Answer { body, phase }))
}

pin_project! {
    /// A request body that fails once its deadline passes, and says so through `late`.
    struct BodyDeadline {
        #[pin]
        body: Payload,
        #[pin]
        timer: Sleep,
        late: Rc<Cell<bool>>,
    }
}

impl Stream for BodyDeadline {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        if let Poll::Ready(item) = this.body.poll_next(cx) {
            return Poll::Ready(item);
        }
        if this.timer.poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.late.set(true);
        Poll::Ready(Some(Err(PayloadError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "the request body did not arrive in time",
        )))))
    }
}

pin_project! {
    /// An answer's body; when the dispatcher is done with it (written, or the connection gone),
    /// the connection waits for its next request.
    struct Answer<B> {
        #[pin]
        body: B,
        phase: Option<ConnPhase>,
    }

    impl<B> PinnedDrop for Answer<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(phase) = &this.phase {
                phase.answered();
            }
        }
    }
}

impl<B: MessageBody> MessageBody for Answer<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        self.project().body.poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    /// A connection accepted from a client that never reads, with a receive buffer as small as
    /// the kernel allows, so that the socket's buffers fill after a few writes.
    async fn unread_connection() -> (Conn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Conn::new(server), client)
    }

    /// Writes to `conn` until a write fails; the error, and when the last write that went
    /// through at once was made (about when the socket filled).
    async fn write_until_failed(conn: &mut Conn) -> (io::Error, Instant) {
        let chunk = vec![b'x'; 64 * 1024];
        let mut stalled_at = Instant::now();
        loop {
            let before = Instant::now();
            if let Err(err) = conn.write_all(&chunk).await {
                return (err, stalled_at);
            }
            if before.elapsed() < Duration::from_millis(100) {
                stalled_at = Instant::now();
            }
        }
    }

    /// A client that never reads: once the socket's buffers are full, the writer's next write
    /// fails within the write deadline instead of waiting for ever.
    #[tokio::test]
    async fn writes_that_make_no_progress_fail_at_the_write_deadline() {
        let (mut conn, _client) = unread_connection().await;
        let (failed, stalled_at) =
            tokio::time::timeout(TIMING.write * 3, write_until_failed(&mut conn))
                .await
                .expect("the stalled write fails, not waits");
        assert_eq!(failed.kind(), io::ErrorKind::TimedOut);
        let waited = stalled_at.elapsed();
        assert!(
            waited >= TIMING.write - Duration::from_millis(200) && waited < TIMING.write * 2,
            "failed {waited:?} after the socket filled"
        );
    }

    /// An event stream whose client stopped reading ends at its timeout when that comes before
    /// the write deadline: the stalled write fails then, not 15 s after the socket filled.
    #[tokio::test]
    async fn stalled_writes_of_an_event_stream_fail_when_the_stream_is_to_end() {
        let (mut conn, _client) = unread_connection().await;
        let phase = conn.phase();
        phase.request_started();
        let ends = Instant::now() + Duration::from_secs(1);
        phase.stream_ends(ends);
        let (failed, _) = tokio::time::timeout(TIMING.write / 2, write_until_failed(&mut conn))
            .await
            .expect("the stalled write fails at the stream's end, not at the write deadline");
        assert_eq!(failed.kind(), io::ErrorKind::TimedOut);
        let now = Instant::now();
        assert!(
            now >= ends && now - ends < Duration::from_millis(500),
            "failed {:?} after the stream's end",
            now.saturating_duration_since(ends)
        );
    }
}
