//! A second floor beside `bare_actix.rs`: the same stream shape on hyper alone, one
//! current-thread tokio runtime that accepts and serves on the same thread (no acceptor thread,
//! no actix). It answers whether another Rust HTTP stack would lift the figures that bare
//! actix-web cannot reach. Not Handoff's stack; `scripts/bench.sh` runs it through the same tool.
//!
//!   cargo run --release -p handoff-bench --example bare_hyper -- 127.0.0.1:8091
//!   GET  /sub/{id}   the stream
//!   POST /pub/{id}   sends the body as the result event to every stream on {id}; answers how many

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt as _, stream};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Who waits for which id; one thread, so a `RefCell` (never borrowed across an `.await`).
type Waiting = Rc<RefCell<HashMap<String, Vec<oneshot::Sender<Bytes>>>>>;
type Body = UnsyncBoxBody<Bytes, Infallible>;

const CONNECT: &[u8] =
    b"retry: 1000\n\nevent: result\ndata: {\"status\":\"connect\",\"moveUrl\":\"\"}\n\n";

fn result_event(data: &[u8]) -> Bytes {
    [b"event: result\ndata: ".as_slice(), data, b"\n\n"]
        .concat()
        .into()
}

fn answer(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response
}

async fn handle(req: Request<Incoming>, waiting: Waiting) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if let Some(id) = path.strip_prefix("/sub/") {
        let (tx, rx) = oneshot::channel();
        waiting
            .borrow_mut()
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        let result = async move { rx.await.ok().map(|data| result_event(&data)) };
        let events = stream::once(async { Some(Bytes::from_static(CONNECT)) })
            .chain(stream::once(result))
            .filter_map(|event| async { event.map(|e| Ok(Frame::data(e))) });
        let mut response = Response::new(StreamBody::new(events).boxed_unsync());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        return Ok(response);
    }
    if let Some(id) = path.strip_prefix("/pub/") {
        let id = id.to_owned();
        let Ok(body) = req.into_body().collect().await else {
            return Ok(answer(
                StatusCode::BAD_REQUEST,
                "the body could not be read",
            ));
        };
        let data = body.to_bytes();
        let streams = waiting.borrow_mut().remove(&id).unwrap_or_default();
        let reached = streams.len();
        for stream in streams {
            let _ = stream.send(data.clone());
        }
        return Ok(answer(StatusCode::OK, reached.to_string()));
    }
    Ok(answer(StatusCode::NOT_FOUND, "no such path"))
}

fn main() -> std::io::Result<()> {
    let addr: std::net::SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8091".into())
        .parse()
        .map_err(std::io::Error::other)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    tokio::task::LocalSet::new().block_on(&runtime, async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        let waiting = Waiting::default();
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Out of descriptors, most likely: wait for some to close.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let waiting = waiting.clone();
            tokio::task::spawn_local(async move {
                let service = hyper::service::service_fn(move |req| handle(req, waiting.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
