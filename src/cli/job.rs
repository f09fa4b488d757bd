//! `handoff job …`: the job runner's calls to a running Handoff, over its HTTP API (several ids to
//! complete or fail go in batch calls), with the
//! one HTTP client ([`crate::http_client`]) in its blocking form: nothing here needs the server's
//! async runtime.
//!
//! What each command prints: a listing of the job, or with `--json` the server's answer as it
//! came. What a failure prints: the server's own message (its `{"error": …}`) on stderr, with
//! the exit code saying whose fault it was (see [`super`]).

use std::process::ExitCode;
use std::time::Duration;

use serde_json::{Map, Value, json};
use url::Url;

use super::{EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, JobArgs, JobCommand, JobIds};

/// At most this many operations in one batch call, the server's limit.
const BATCH_MAX: usize = 1000;

/// How long one call may take, connecting included: the API answers in milliseconds, so
/// anything near this is a server or network in trouble, and a job runner should hear of it.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a command did not do what it was asked.
#[derive(Debug)]
enum Failure {
    /// Nothing was sent: an argument or the environment is wrong.
    Usage(String),
    /// The server answered with an error status and, usually, its message.
    Refused { status: String, message: String },
    /// No answer came.
    Unreachable(String),
    /// A batch went through, but the server refused some of its jobs (each named on stderr).
    Partly { refused: usize, of: usize },
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            Self::Refused { .. } | Self::Partly { .. } => EXIT_REFUSED,
            Self::Unreachable(_) => EXIT_UNREACHABLE,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Usage(message) | Self::Unreachable(message) => f.write_str(message),
            Self::Refused { status, message } => {
                write!(f, "the server answered {status}: {message}")
            }
            Self::Partly { refused, of } => {
                write!(
                    f,
                    "the server refused {refused} of {of} job(s), each named above"
                )
            }
        }
    }
}

/// Runs one job command; the exit code tells the outcome.
pub fn run(args: JobArgs) -> ExitCode {
    match call(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("handoff: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

/// One request: the method and path under the base URL, and for a POST its JSON body.
struct Request {
    path: Vec<String>,
    /// `None` for the one GET.
    body: Option<Value>,
}

impl Request {
    fn post(path: &[&str], fields: &[(&str, Option<Value>)]) -> Self {
        let body: Map<String, Value> = fields
            .iter()
            .filter_map(|(name, value)| Some(((*name).to_owned(), value.clone()?)))
            .collect();
        Self {
            path: path.iter().map(|s| (*s).to_owned()).collect(),
            body: Some(Value::Object(body)),
        }
    }
}

/// `id`, or for a completion or failure its first id (the only one when it is sent alone).
fn request_for(command: &JobCommand, ids: &[String]) -> Request {
    let first = ids.first().map_or("", String::as_str);
    let text = |value: &Option<String>| value.as_ref().map(|v| json!(v));
    match command {
        JobCommand::Create { move_url, deadline } => Request::post(
            &["api", "jobs"],
            &[
                ("moveUrl", text(move_url)),
                ("deadlineSecs", deadline.map(|d| json!(d))),
            ],
        ),
        JobCommand::Progress {
            id,
            percent,
            message,
        } => Request::post(
            &["api", "jobs", id, "progress"],
            &[
                ("percent", percent.map(|p| json!(p))),
                ("message", text(message)),
            ],
        ),
        JobCommand::Complete { move_url, .. } => Request::post(
            &["api", "jobs", first, "complete"],
            &[("moveUrl", text(move_url))],
        ),
        JobCommand::Fail {
            message, move_url, ..
        } => Request::post(
            &["api", "jobs", first, "fail"],
            &[("message", text(message)), ("moveUrl", text(move_url))],
        ),
        JobCommand::Show { id } => Request {
            path: vec!["api".into(), "jobs".into(), id.clone()],
            body: None,
        },
    }
}

fn call(args: &JobArgs) -> Result<(), Failure> {
    let base = base_url(&args.url)?;
    let ids = ending_ids(&args.command)?;
    if ids.len() > 1 {
        return call_batch(&base, args, &ids);
    }
    let request = request_for(&args.command, &ids);
    let (text, parsed) = send(&base, &request)?;
    match (args.json, parsed) {
        (false, Some(job)) => {
            let lines = listing(&job, &base);
            let width = lines
                .iter()
                .map(|(label, _)| label.len())
                .max()
                .unwrap_or(0);
            for (label, value) in lines {
                println!("{label:<width$}  {value}");
            }
        }
        // The answer as it came: for scripts (and for a success that is not JSON, which no
        // Handoff sends, but a proxy in front of one might).
        _ => println!("{}", text.trim_end()),
    }
    Ok(())
}

/// Sends `request`: the answer's text and, when it is JSON, its value. An error status is a
/// refusal with the server's message.
fn send(base: &Url, request: &Request) -> Result<(String, Option<Value>), Failure> {
    let url = endpoint(base, request.path.iter().map(String::as_str));
    // A usage error is reported before anything is set up.
    let token = match request.body {
        Some(_) => Some(token()?),
        None => None,
    };
    let client = client(base, TIMEOUT).map_err(|why| {
        Failure::Unreachable(format!("cannot set up the HTTP client for {base}: {why}"))
    })?;
    let mut call = match &request.body {
        Some(body) => client.post(url).json(body),
        None => client.get(url),
    };
    if let Some(token) = token {
        call = call.bearer_auth(token);
    }
    // A 4xx or 5xx is an answer to read (the server's message), not a transport error.
    let response = call.send().map_err(|err| {
        Failure::Unreachable(format!(
            "cannot reach Handoff at {base}: {}",
            crate::http_client::describe(err)
        ))
    })?;
    let status = response.status();
    let text = response.text().map_err(|err| {
        Failure::Unreachable(format!(
            "reading the answer from {base}: {}",
            crate::http_client::describe(err)
        ))
    })?;
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    if !status.is_success() {
        return Err(Failure::Refused {
            status: status.to_string(),
            message: error_message(parsed.as_ref(), &text),
        });
    }
    Ok((text, parsed))
}

/// The ids a completion or failure names, those on the command line first, then the file's;
/// none for the other commands.
fn ending_ids(command: &JobCommand) -> Result<Vec<String>, Failure> {
    let (JobCommand::Complete { ids, .. } | JobCommand::Fail { ids, .. }) = command else {
        return Ok(Vec::new());
    };
    let JobIds {
        id,
        more,
        from_file,
    } = ids;
    let mut all: Vec<String> = id.iter().chain(more).cloned().collect();
    if let Some(path) = from_file {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())
        } else {
            std::fs::read_to_string(path)
        }
        .map_err(|err| Failure::Usage(format!("cannot read ids from {}: {err}", path.display())))?;
        all.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty())
                .map(str::to_owned),
        );
    }
    if all.is_empty() {
        return Err(Failure::Usage("no job ids given".into()));
    }
    Ok(all)
}

/// Completes or fails several jobs with `POST /api/jobs/batch`, [`BATCH_MAX`] per call. Prints
/// a line per job (with `--json`, each call's answer as it came); each refused job goes to
/// stderr with the server's status and message.
fn call_batch(base: &Url, args: &JobArgs, ids: &[String]) -> Result<(), Failure> {
    let (op, fields) = match &args.command {
        JobCommand::Complete { move_url, .. } => ("complete", vec![("moveUrl", move_url)]),
        JobCommand::Fail {
            message, move_url, ..
        } => ("fail", vec![("message", message), ("moveUrl", move_url)]),
        _ => unreachable!("only completions and failures name several jobs"),
    };
    let mut refused = 0;
    for chunk in ids.chunks(BATCH_MAX) {
        let operations: Vec<Value> = chunk
            .iter()
            .map(|id| {
                let mut operation = Map::new();
                operation.insert("op".into(), json!(op));
                operation.insert("id".into(), json!(id));
                for (name, value) in &fields {
                    if let Some(value) = value {
                        operation.insert((*name).into(), json!(value));
                    }
                }
                Value::Object(operation)
            })
            .collect();
        let request = Request {
            path: vec!["api".into(), "jobs".into(), "batch".into()],
            body: Some(json!({ "operations": operations })),
        };
        let (text, parsed) = send(base, &request)?;
        if args.json {
            println!("{}", text.trim_end());
        }
        let results = parsed
            .as_ref()
            .and_then(|answer| answer["results"].as_array())
            .ok_or_else(|| Failure::Refused {
                status: "200 OK".into(),
                message: format!("not a batch answer: {}", error_message(None, &text)),
            })?;
        for result in results {
            let id = result["id"].as_str().unwrap_or_default();
            if let Some(status) = result["job"]["status"].as_str() {
                if !args.json {
                    println!("{id}  {status}");
                }
            } else {
                refused += 1;
                let error = result["error"].as_str().unwrap_or("(no message)");
                eprintln!("handoff: {id}: {} {error}", result["status"]);
            }
        }
    }
    if refused > 0 {
        return Err(Failure::Partly {
            refused,
            of: ids.len(),
        });
    }
    Ok(())
}

/// The HTTP client of the job commands and of `handoff health`. No redirect is followed: one
/// would turn a POST into a GET without its token, and a 3xx is reported as the refusal it is.
pub(super) fn client(base: &Url, timeout: Duration) -> Result<reqwest::blocking::Client, String> {
    reqwest::blocking::ClientBuilder::from(crate::http_client::builder(base))
        .timeout(timeout)
        .build()
        .map_err(crate::http_client::describe)
}

/// `--url` / `HANDOFF_URL`, checked before anything is sent.
fn base_url(raw: &str) -> Result<Url, Failure> {
    let usage = |why: &str| {
        Failure::Usage(format!(
            "--url / HANDOFF_URL {raw:?} {why}: expected e.g. http://127.0.0.1:8080"
        ))
    };
    let url = Url::parse(raw).map_err(|err| usage(&format!("is not a URL ({err})")))?;
    if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
        return Err(usage("is not an http:// or https:// URL with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(usage("has a query or fragment"));
    }
    Ok(url)
}

/// `base` with `segments` appended, each percent-encoded as one path segment: an id that is not
/// an id reaches the server as such (and is answered `400`), never as another path.
pub(super) fn endpoint<'a>(base: &Url, segments: impl IntoIterator<Item = &'a str>) -> Url {
    let mut url = base.clone();
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(segments);
    }
    url
}

fn token() -> Result<String, Failure> {
    std::env::var("HANDOFF_API_TOKEN")
        .ok()
        .filter(|token| !token.is_empty())
        .ok_or_else(|| {
            Failure::Usage(
                "HANDOFF_API_TOKEN is not set: this command sends it as the API's bearer token"
                    .into(),
            )
        })
}

/// The server's `{"error": …}`, or what a proxy in front of it answered instead.
fn error_message(parsed: Option<&Value>, text: &str) -> String {
    if let Some(message) = parsed.and_then(|body| body.get("error")?.as_str()) {
        return message.to_owned();
    }
    let text = text.trim();
    if text.is_empty() {
        "(no message)".into()
    } else {
        text.chars().take(300).collect()
    }
}

/// A job's JSON as lines of label and value, skipping what it does not have (yet).
fn listing(job: &Value, base: &Url) -> Vec<(&'static str, String)> {
    let text = |name: &str| job.get(name).and_then(Value::as_str).map(str::to_owned);
    let mut lines = Vec::new();
    lines.extend(text("id").map(|id| ("id", id)));
    if let Some(wait) = text("waitUrl") {
        let page_a = endpoint(base, wait.trim_start_matches('/').split('/'));
        lines.push(("wait url", page_a.to_string()));
    }
    lines.extend(text("status").map(|status| ("status", status)));
    lines.extend(
        text("moveUrl")
            .filter(|target| !target.is_empty())
            .map(|target| ("move url", target)),
    );
    lines.extend(text("createdAt").map(|at| ("created", at)));
    lines.extend(text("deadline").map(|at| ("deadline", at)));
    lines.extend(text("endedAt").map(|at| ("ended", at)));
    if let Some(progress) = job.get("progress").filter(|p| p.is_object()) {
        lines.push(("progress", progress_line(progress)));
    }
    lines.extend(text("message").map(|message| ("message", message)));
    lines
}

/// `40% Rendering page 3 of 7 (at …)`, with whichever parts the report has.
fn progress_line(progress: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(percent) = progress.get("percent").and_then(Value::as_f64) {
        parts.push(format!("{percent}%"));
    }
    if let Some(message) = progress.get("message").and_then(Value::as_str) {
        parts.push(message.to_owned());
    }
    if let Some(at) = progress.get("at").and_then(Value::as_str) {
        parts.push(format!("(at {at})"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_stays_one_path_segment_under_a_base_with_or_without_a_prefix() {
        let plain = base_url("http://127.0.0.1:8080").unwrap();
        assert_eq!(
            endpoint(&plain, ["api", "jobs", "../admin", "complete"]).as_str(),
            "http://127.0.0.1:8080/api/jobs/..%2Fadmin/complete"
        );
        let prefixed = base_url("https://example.com/handoff/").unwrap();
        assert_eq!(
            endpoint(&prefixed, ["jobs", "abc"]).as_str(),
            "https://example.com/handoff/jobs/abc"
        );
    }

    #[test]
    fn a_base_url_that_is_not_http_is_a_usage_error() {
        for bad in [
            "127.0.0.1:8080",
            "ftp://example.com",
            "http://x/?a=1",
            "nonsense",
        ] {
            let failure = base_url(bad).unwrap_err();
            assert_eq!(failure.exit_code(), EXIT_USAGE, "{bad}");
        }
    }
}
