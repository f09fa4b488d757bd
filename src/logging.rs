//! The log's two formats (`HANDOFF_LOG_FORMAT`): env_logger's text lines, the default, for a
//! person reading a terminal or the journal; or one JSON object per line for a log shipper, with
//! `time`, `level`, `target` and `message`, this process's `instance` id, and the fields a call
//! site attaches with `log`'s key-values (`log::info!(job:% = id; "…")`).
//!
//! A field is a name the shipper can index on (every line about one job, from every instance),
//! so call sites attach the ids they already print; never a secret. The one secret a line ever
//! carries is the API token generated at start when none is set, logged once so that the operator
//! can use it (`HANDOFF_API_TOKEN` or `HANDOFF_API_TOKENS` set means there is none to log).

use std::fmt;
use std::io::Write as _;
use std::str::FromStr;
use std::sync::OnceLock;

use log::kv::{self, VisitSource};
use serde_json::{Map, Value};

/// How each log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err("expected text or json".into()),
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Text => "text",
            Self::Json => "json",
        })
    }
}

/// This process's instance id (the one its Redis messages carry), once it is known.
static INSTANCE: OnceLock<String> = OnceLock::new();

/// Names this process in every JSON line from now on; the first call wins.
pub fn name_instance(id: &str) {
    let _ = INSTANCE.set(id.to_owned());
}

/// Installs the logger for `format`, filtered by `RUST_LOG` (default `default_filter`).
pub fn init(format: LogFormat, default_filter: &str) {
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter));
    match format {
        // The fields are in the message already, as they always were.
        LogFormat::Text => builder.format_key_values(|_, _| Ok(())),
        LogFormat::Json => builder.format(|buf, record| {
            let time = buf.timestamp_millis().to_string();
            let line = json_line(&time, record, INSTANCE.get().map(String::as_str));
            buf.write_all(line.as_bytes())?;
            buf.write_all(b"\n")
        }),
    };
    builder.init();
}

/// One record as a JSON object (no newline): the four fixed fields, then `instance`, then the
/// record's own key-values in the order given (a field may not replace a fixed one).
fn json_line(time: &str, record: &log::Record<'_>, instance: Option<&str>) -> String {
    let mut line = Map::new();
    line.insert("time".into(), time.into());
    line.insert("level".into(), record.level().as_str().into());
    line.insert("target".into(), record.target().into());
    line.insert("message".into(), record.args().to_string().into());
    if let Some(instance) = instance {
        line.insert("instance".into(), instance.into());
    }
    // Visiting a map cannot fail.
    let _ = record.key_values().visit(&mut Fields(&mut line));
    Value::Object(line).to_string()
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl<'kvs> VisitSource<'kvs> for Fields<'_> {
    fn visit_pair(&mut self, key: kv::Key<'kvs>, value: kv::Value<'kvs>) -> Result<(), kv::Error> {
        let value = if let Some(b) = value.to_bool() {
            Value::from(b)
        } else if let Some(n) = value.to_u64() {
            Value::from(n)
        } else if let Some(n) = value.to_i64() {
            Value::from(n)
        } else {
            Value::from(value.to_string())
        };
        self.0.entry(key.as_str().to_owned()).or_insert(value);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(record: &log::Record<'_>, instance: Option<&str>) -> Value {
        let text = json_line("2026-12-01T10:00:00.000Z", record, instance);
        assert!(!text.contains('\n'), "one line: {text}");
        serde_json::from_str(&text).expect("valid JSON")
    }

    #[test]
    fn a_json_line_has_the_fixed_fields_the_instance_and_the_call_sites_fields() {
        let fields: [(&str, kv::Value<'_>); 3] = [
            ("job", kv::Value::from_display(&"AbC123")),
            ("streams", kv::Value::from(3u64)),
            (
                "message",
                kv::Value::from("a field cannot replace the message"),
            ),
        ];
        let args = format_args!("job AbC123 completed;\n\"3\" stream(s) here notified");
        let record = log::Record::builder()
            .args(args)
            .level(log::Level::Info)
            .target("handoff::jobs")
            .key_values(&fields)
            .build();
        let line = line_of(&record, Some("inst-1"));
        assert_eq!(line["time"], "2026-12-01T10:00:00.000Z");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], "handoff::jobs");
        assert_eq!(
            line["message"],
            "job AbC123 completed;\n\"3\" stream(s) here notified"
        );
        assert_eq!(line["instance"], "inst-1");
        assert_eq!(line["job"], "AbC123");
        assert_eq!(line["streams"], 3);
    }

    #[test]
    fn a_line_without_fields_or_instance_has_only_the_fixed_ones() {
        let record = log::Record::builder()
            .args(format_args!("listening"))
            .level(log::Level::Warn)
            .target("handoff")
            .build();
        let line = line_of(&record, None);
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 4, "{line}");
        assert_eq!(line["level"], "WARN");
    }

    #[test]
    fn the_format_is_text_or_json_and_nothing_else() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!(LogFormat::Json.to_string(), "json");
        assert!("JSON".parse::<LogFormat>().is_err());
        assert!("logfmt".parse::<LogFormat>().is_err());
    }
}
