//! The wire format of the event streams, and nothing else: event names, the JSON of each event
//! (README, "Event protocol"), and the encoding of a job's news once for all of its streams.

use actix_web_lab::sse;
use bytestring::ByteString;

use crate::domain::{Ending, JobId, Percent};
use crate::jobs::{News, Update};

/// The event the Spring client listens for: the connect event, and every ending.
const RESULT_EVENT: &str = "result";
/// The event of progress reports, which the Spring client does not listen for.
const PROGRESS_EVENT: &str = "progress";
const KEEP_ALIVE: &str = "keep-alive";

/// What a stream's connect event names.
#[derive(Debug, Clone, Copy)]
pub(super) enum Greeting {
    /// The one job of `/sse/connect/{id}`, with the empty `moveUrl` the Spring client expects.
    Job,
    /// Every job of `/sse/watch?ids=`, in the order asked.
    Watch,
}

/// The payload of `event: result`: `data.status` and `data.moveUrl`, which the Spring client
/// reads, `message` for a failure, and the job's `id`. `status` comes first, as the Spring server
/// wrote it.
#[derive(serde::Serialize)]
struct ResultData<'a> {
    status: &'a str,
    #[serde(rename = "moveUrl", skip_serializing_if = "Option::is_none")]
    move_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<Option<&'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

impl<'a> ResultData<'a> {
    fn status(status: &'a str) -> Self {
        Self {
            status,
            move_url: None,
            message: None,
            id: None,
        }
    }
}

/// The payload of a shared stream's connect event: `{"status":"connect","ids":[…]}`.
#[derive(serde::Serialize)]
#[serde(bound(serialize = "IdList<I>: serde::Serialize"))]
struct WatchData<I> {
    status: &'static str,
    ids: IdList<I>,
}

/// The watched ids, written as a JSON array straight from the stream's jobs.
struct IdList<I>(I);

impl<I> serde::Serialize for IdList<I>
where
    I: Iterator + Clone,
    I::Item: serde::Serialize,
{
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.clone())
    }
}

/// The payload of `event: progress`.
#[derive(serde::Serialize)]
struct ProgressData<'a> {
    status: &'static str,
    percent: Option<f64>,
    message: Option<&'a str>,
    id: &'a str,
}

fn to_json(data: &impl serde::Serialize) -> ByteString {
    // Serializing strings and numbers cannot fail.
    ByteString::from(serde_json::to_string(data).unwrap_or_default())
}

fn data_event(event: &'static str, data: ByteString) -> sse::Event {
    sse::Data::new(data).event(event).into()
}

/// The connect event, the first of every stream. `ids` are the stream's jobs, in order.
pub(super) fn connect_event<'a>(
    greeting: Greeting,
    mut ids: impl Iterator<Item = &'a JobId> + Clone,
) -> sse::Event {
    let data = match greeting {
        Greeting::Job => to_json(&ResultData {
            move_url: Some(""),
            id: ids.next().map(JobId::as_str),
            ..ResultData::status("connect")
        }),
        Greeting::Watch => to_json(&WatchData {
            status: "connect",
            ids: IdList(ids),
        }),
    };
    data_event(RESULT_EVENT, data)
}

/// Job `id` does not exist (or was purged): a shared stream says so instead of answering `404`.
pub(super) fn unknown_event(id: &JobId) -> sse::Event {
    let data = to_json(&ResultData {
        id: Some(id.as_str()),
        ..ResultData::status("unknown")
    });
    data_event(RESULT_EVENT, data)
}

/// An update about job `id`, encoded once per job and shared by all of its streams.
pub(super) fn news_event(id: &JobId, news: &News) -> sse::Event {
    let event = match news.update {
        Update::End(_) => RESULT_EVENT,
        Update::Progress(_) => PROGRESS_EVENT,
    };
    data_event(event, news.encoded(|update| update_data(id, update)))
}

pub(super) fn keep_alive() -> sse::Event {
    sse::Event::Comment(KEEP_ALIVE.into())
}

/// The data of an update about job `id`: `{"status":"result"|"failed"|"expired","moveUrl":"…"}`
/// for an ending (with `message` for a failure), `{"status":"progress","percent":…,"message":…}`.
fn update_data(id: &JobId, update: &Update) -> ByteString {
    let id = id.as_str();
    match update {
        Update::End(ending) => {
            let (status, message) = match ending {
                Ending::Complete { .. } => ("result", None),
                Ending::Failed { message, .. } => {
                    ("failed", Some(message.as_ref().map(|m| m.as_str())))
                }
                Ending::Expired { .. } => ("expired", None),
            };
            to_json(&ResultData {
                move_url: Some(ending.target().as_str()),
                message,
                id: Some(id),
                ..ResultData::status(status)
            })
        }
        Update::Progress(progress) => to_json(&ProgressData {
            status: "progress",
            percent: progress.percent.map(Percent::get),
            message: progress.message.as_ref().map(|m| m.as_str()),
            id,
        }),
    }
}
