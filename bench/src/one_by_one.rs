//! `--mode one-by-one`: the latency of a lone completion, with nothing else in flight. For each
//! job in turn its stream opens (on instance i mod k), its completion is sent (through instance
//! (i + 1) mod k, over one keep-alive connection per instance, as a job runner keeps one), and
//! the result is read before the next job starts.

use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::http::{self, Body};
use crate::report::{Percentiles, Report};
use crate::streams::{self, Board, Opening};
use crate::target::Target;
use crate::{Args, channel_ids, conclude, note};

pub async fn run(args: &Args, targets: &[Target]) -> Report {
    let phase = Duration::from_secs(args.timeout);
    let k = targets.len();
    let mut report = Report {
        label: args.label.clone(),
        instances: k,
        processes: 1,
        target: if targets[0].handoff_token.is_some() {
            "handoff".into()
        } else {
            "generic".into()
        },
        mode: "one-by-one".into(),
        streams: args.streams,
        connect_concurrency: 1,
        publishers: k,
        leave_on_result: true,
        expected: args.streams,
        ..Report::default()
    };
    let ids = match channel_ids(
        &targets[0],
        args.publishers,
        args.streams,
        0,
        Instant::now() + phase,
    )
    .await
    {
        Ok(ids) => Arc::new(ids),
        Err(why) => {
            report.errors.push(why);
            return report;
        }
    };
    let mut publishers: Vec<Option<SendRequest<Body>>> = (0..k).map(|_| None).collect();
    let (mut connect_times, mut latencies, mut answers) = (Vec::new(), Vec::new(), Vec::new());
    let port_seed = args.port_seed.unwrap_or_else(streams::port_seed);
    let start = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let deadline = Instant::now() + phase;
        let board = Board::new(1);
        let stop = CancellationToken::new();
        let channel = id.clone();
        let mut opened = streams::open_all(
            std::slice::from_ref(&targets[i % k].subscribe),
            move |_| channel.clone(),
            &Opening {
                streams: 1,
                concurrency: 1,
                leave_on_result: true,
                deadline,
                // A source port of its own for each stream: the last one's may be in TIME_WAIT.
                index_base: i,
                port_seed,
            },
            &board,
            &stop,
        );
        match opened.recv().await.map(|o| o.result) {
            Some(Ok(time)) => connect_times.push(time),
            Some(Err(why)) => {
                report.connect_failures += 1;
                note(&mut report.errors, why);
                continue;
            }
            None => {
                report.connect_failures += 1;
                continue;
            }
        }
        report.opened += 1;
        let through = &targets[(i + 1) % k];
        let request = match &through.handoff_token {
            Some(token) => http::request(
                "POST",
                &through.publish.host,
                &through.publish.path(id),
                Some(token),
            ),
            None => http::request_with_body(
                "POST",
                &through.publish.host,
                &through.publish.path(id),
                None,
                format!(r#"{{"status":"result","moveUrl":"/done?id={id}"}}"#).into(),
            ),
        };
        let outcome = http::send(through.publish.addr, &mut publishers[(i + 1) % k], request).await;
        match &outcome.result {
            Ok((status, _)) if status.is_success() => {
                report.completions += 1;
                answers.push(outcome.done_at.duration_since(outcome.sent_at));
            }
            other => {
                report.completion_failures += 1;
                publishers[(i + 1) % k] = None;
                let why = match other {
                    Ok((status, body)) => format!(
                        "completion: status {status}: {}",
                        String::from_utf8_lossy(body)
                    ),
                    Err(why) => format!("completion: {why}"),
                };
                note(&mut report.errors, why);
            }
        }
        board.wait_for(1, deadline).await;
        stop.cancel();
        if let Some(arrived) = board.arrival(0) {
            report.delivered += 1;
            latencies.push(arrived.saturating_duration_since(outcome.sent_at));
        }
    }
    report.connect_secs = start.elapsed().as_secs_f64();
    report.connects_per_sec = report.opened as f64 / report.connect_secs.max(1e-9);
    report.completion_secs = report.connect_secs;
    report.completions_per_sec = report.completions as f64 / report.completion_secs.max(1e-9);
    report.connect_ms = Percentiles::of(connect_times);
    report.latency_ms = Percentiles::of(latencies);
    report.answer_ms = Percentiles::of(answers);
    conclude(&mut report);
    report
}
