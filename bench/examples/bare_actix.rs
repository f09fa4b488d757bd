//! The floor under Handoff's figures in BENCHMARKS.md: the same stack (actix-web 4,
//! actix-web-lab's `Sse`, tokio, jemalloc) and the same stream shape (`retry:`, a connect event,
//! the result event, end of stream), with nothing else: no database, no limits, no metrics, no
//! middleware, no job ids to parse, no cleanup of a stream that leaves before its result.
//! `scripts/bench.sh` runs it through the same bench tool as a generic target, so a Handoff
//! figure that this server cannot reach either is bounded by the stack, not by Handoff's own code.
//!
//!   cargo run --release -p handoff-bench --example bare_actix -- 127.0.0.1:8090 [workers]
//!   GET  /sub/{id}   the stream
//!   POST /pub/{id}   sends the body as the result event to every stream on {id}; answers how many

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, Responder, web};
use actix_web_lab::sse::{self, Sse};
use bytestring::ByteString;
use futures_util::{StreamExt as _, stream};
use tokio::sync::oneshot;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Handoff's jemalloc settings, so the floor is measured with the same allocator.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 24] = handoff::startup::MALLOC_CONF;

/// Who waits for which id. A std `Mutex`: it is never held across an `.await`.
#[derive(Default)]
struct Waiting(Mutex<HashMap<String, Vec<oneshot::Sender<ByteString>>>>);

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<oneshot::Sender<ByteString>>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn result_event(data: ByteString) -> sse::Event {
    sse::Data::new(data).event("result").into()
}

async fn subscribe(id: web::Path<String>, waiting: web::Data<Waiting>) -> impl Responder {
    let (tx, rx) = oneshot::channel();
    waiting.lock().entry(id.into_inner()).or_default().push(tx);
    let connect = result_event(r#"{"status":"connect","moveUrl":""}"#.into());
    let result = async move { rx.await.ok().map(result_event) };
    let events = stream::once(async { Some(connect) })
        .chain(stream::once(result))
        .filter_map(|event| async { event.map(Ok::<_, Infallible>) });
    Sse::from_stream(events).with_retry_duration(Duration::from_secs(1))
}

async fn publish(
    id: web::Path<String>,
    body: web::Bytes,
    waiting: web::Data<Waiting>,
) -> HttpResponse {
    let Ok(data) = ByteString::try_from(body) else {
        return HttpResponse::BadRequest().body("the body is not UTF-8");
    };
    let streams = waiting.lock().remove(id.as_str()).unwrap_or_default();
    let reached = streams.len();
    for stream in streams {
        let _ = stream.send(data.clone());
    }
    HttpResponse::Ok().body(reached.to_string())
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8090".into());
    let workers = args.next().and_then(|w| w.parse().ok()).unwrap_or(1);
    let waiting = web::Data::new(Waiting::default());
    HttpServer::new(move || {
        App::new()
            .app_data(waiting.clone())
            .route("/sub/{id}", web::get().to(subscribe))
            .route("/pub/{id}", web::post().to(publish))
    })
    .workers(workers)
    .backlog(4096)
    .max_connections(25_000)
    .bind(addr)?
    .run()
    .await
}
