//! The job vocabulary: job ids, redirect targets and statuses.
//!
//! Everything a request hands us is parsed here into a type that can only exist when valid,
//! so handlers never re-check raw strings.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use serde::Serialize;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};

/// Number of random bytes in a job id: 128 bits, so an id cannot be guessed.
const JOB_ID_BYTES: usize = 16;
/// Length of a job id once base64url-encoded without padding.
pub const JOB_ID_LEN: usize = 22;
/// Longest moveUrl we store; a redirect target longer than this is a mistake or an attack.
pub const MOVE_URL_MAX_LEN: usize = 2048;

/// A server-made job id: 22 URL-safe characters carrying 128 random bits. Shared, not copied:
/// the hub, each stream and each subscription hold the same allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Arc<str>);

/// Why a string is not a job id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JobIdError {
    #[error("job id is malformed: expected {JOB_ID_LEN} characters from A-Z a-z 0-9 - _")]
    Malformed,
}

impl JobId {
    /// Makes a fresh id from the operating system's CSPRNG-seeded thread generator.
    pub fn generate() -> Self {
        let mut bytes = [0u8; JOB_ID_BYTES];
        rand::rng().fill_bytes(&mut bytes);
        Self(URL_SAFE_NO_PAD.encode(bytes).into())
    }

    pub fn parse(raw: &str) -> Result<Self, JobIdError> {
        let well_formed = raw.len() == JOB_ID_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if well_formed {
            Ok(Self(raw.into()))
        } else {
            Err(JobIdError::Malformed)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// Where the browser goes when its job completes: always a path on this origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveUrl(String);

/// Why a string is not an acceptable redirect target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoveUrlError {
    #[error("moveUrl must be a path on this site starting with a single '/'")]
    NotAPath,
    #[error("moveUrl must not start with '//' (that would leave this site)")]
    SchemeRelative,
    #[error("moveUrl must not contain a backslash")]
    Backslash,
    #[error("moveUrl must not contain control characters or spaces")]
    ControlCharacter,
    #[error("moveUrl is longer than {MOVE_URL_MAX_LEN} bytes")]
    TooLong,
}

impl MoveUrl {
    /// Accepts only same-origin paths: exactly one leading `/`, no backslash (browsers read it
    /// as `/`), no control characters or whitespace (browsers strip some of them, which could turn
    /// `/\t/evil` into `//evil`).
    pub fn parse(raw: &str) -> Result<Self, MoveUrlError> {
        if raw.len() > MOVE_URL_MAX_LEN {
            return Err(MoveUrlError::TooLong);
        }
        if !raw.starts_with('/') {
            return Err(MoveUrlError::NotAPath);
        }
        if raw.contains('\\') {
            return Err(MoveUrlError::Backslash);
        }
        if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(MoveUrlError::ControlCharacter);
        }
        if raw.starts_with("//") {
            return Err(MoveUrlError::SchemeRelative);
        }
        Ok(Self(raw.into()))
    }

    /// The page B every job ends on unless it names its own target.
    pub fn default_for(id: &JobId) -> Self {
        Self(format!("/test.do?id={id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MoveUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job's state: `pending`, then one of three end states, which are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Complete,
    Failed,
    Expired,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Complete => "complete",
            Self::Failed => "failed",
            Self::Expired => "expired",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Pending, Self::Complete, Self::Failed, Self::Expired]
            .into_iter()
            .find(|status| status.as_str() == raw)
    }

    pub fn is_end(self) -> bool {
        self != Self::Pending
    }
}

/// The longest progress or failure message, in characters.
pub const MESSAGE_MAX_CHARS: usize = 200;

/// A short text for the person watching page A: at most [`MESSAGE_MAX_CHARS`] characters, no
/// control characters (a line break would not survive the event stream's framing anyway) and no
/// invisible format characters (Unicode category Cf: bidi overrides such as U+202E, zero-width
/// spaces and joiners, U+FEFF), which would make page A, page B and the admin page show a text
/// other than the one stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message is longer than {MESSAGE_MAX_CHARS} characters")]
    TooLong,
    #[error("message must not contain control characters")]
    ControlCharacter,
    #[error(
        "message must not contain invisible format characters (such as bidi overrides or \
         zero-width spaces): found U+{0:04X}"
    )]
    FormatCharacter(u32),
}

impl Message {
    pub fn parse(raw: &str) -> Result<Self, MessageError> {
        if raw.chars().count() > MESSAGE_MAX_CHARS {
            return Err(MessageError::TooLong);
        }
        if raw.chars().any(char::is_control) {
            return Err(MessageError::ControlCharacter);
        }
        if let Some(c) = raw
            .chars()
            .find(|c| c.general_category() == GeneralCategory::Format)
        {
            return Err(MessageError::FormatCharacter(u32::from(c)));
        }
        Ok(Self(raw.into()))
    }

    /// A message as a release before the check above stored it (or sent it over Redis): read
    /// with its invisible format characters left out, rather than refused, so that such a job
    /// stays readable and its text still cannot reorder what page B shows.
    pub fn stored(raw: &str) -> Result<Self, MessageError> {
        let visible: String = raw
            .chars()
            .filter(|c| c.general_category() != GeneralCategory::Format)
            .collect();
        Self::parse(&visible)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How far a job got, in a number from 0 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percent(f64);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("percent must be a number from 0 to 100")]
pub struct PercentError;

impl Percent {
    pub fn parse(raw: f64) -> Result<Self, PercentError> {
        if (0.0..=100.0).contains(&raw) {
            Ok(Self(raw))
        } else {
            Err(PercentError)
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

/// The latest progress report of a pending job.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// `None`: the job does not know how far it is (the bar stays indeterminate).
    pub percent: Option<Percent>,
    pub message: Option<Message>,
    /// When it was reported, in milliseconds since the Unix epoch.
    pub at: i64,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub status: JobStatus,
    /// The target asked for at creation, or the final target once ended.
    pub move_url: Option<MoveUrl>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    /// When the job reached its end state, whichever it is.
    pub ended_at: Option<i64>,
    /// When a job still pending expires.
    pub deadline: i64,
    /// The latest progress report, as last stored.
    pub progress: Option<Progress>,
    /// Why a failed job failed, if its runner said.
    pub message: Option<Message>,
}

impl Job {
    /// Where the browser goes once this job has ended.
    pub fn target(&self) -> MoveUrl {
        self.move_url
            .clone()
            .unwrap_or_else(|| MoveUrl::default_for(&self.id))
    }

    /// How the job ended, once it has.
    pub fn ending(&self) -> Option<Ending> {
        let target = self.target();
        match self.status {
            JobStatus::Pending => None,
            JobStatus::Complete => Some(Ending::Complete { target }),
            JobStatus::Failed => Some(Ending::Failed {
                target,
                message: self.message.clone(),
            }),
            JobStatus::Expired => Some(Ending::Expired { target }),
        }
    }
}

/// What a job's waiting browsers are told when it ends: how, and where to go next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Complete {
        target: MoveUrl,
    },
    Failed {
        target: MoveUrl,
        message: Option<Message>,
    },
    /// Still pending at its deadline.
    Expired {
        target: MoveUrl,
    },
}

impl Ending {
    /// Where the browser goes.
    pub fn target(&self) -> &MoveUrl {
        match self {
            Self::Complete { target } | Self::Failed { target, .. } | Self::Expired { target } => {
                target
            }
        }
    }

    pub fn status(&self) -> JobStatus {
        match self {
            Self::Complete { .. } => JobStatus::Complete,
            Self::Failed { .. } => JobStatus::Failed,
            Self::Expired { .. } => JobStatus::Expired,
        }
    }
}

/// Milliseconds since the Unix epoch, the unit every stored time uses.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, millis)
}

/// Microseconds since the Unix epoch: how a fan-out message carries its ending's commit time.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// A duration in the stored unit (milliseconds), saturating: added to a clock reading it never
/// overflows.
pub fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Formats stored milliseconds as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(millis: i64) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .format(FORMAT)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_message_from_before_the_format_check_is_read_without_those_characters() {
        assert!(Message::parse("paid \u{202e}gnp.exe").is_err());
        assert_eq!(
            Message::stored("paid \u{202e}gnp.exe").unwrap().as_str(),
            "paid gnp.exe"
        );
        assert!(
            Message::stored("line\nbreak").is_err(),
            "control characters stay refused"
        );
    }

    use proptest::prelude::*;

    #[test]
    fn generated_ids_parse_and_differ() {
        let a = JobId::generate();
        let b = JobId::generate();
        assert_eq!(a.as_str().len(), JOB_ID_LEN);
        assert_eq!(JobId::parse(a.as_str()), Ok(a.clone()));
        assert_ne!(a, b);
    }

    #[test]
    fn malformed_ids_are_rejected() {
        let long = "a".repeat(1000);
        for raw in [
            "",
            "../x",
            "%00",
            "<script>",
            "ééééééééééé",
            &long,
            "AAAAAAAAAAAAAAAAAAAAA/",
            "AAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(JobId::parse(raw), Err(JobIdError::Malformed), "{raw:?}");
        }
    }

    #[test]
    fn move_urls_that_leave_the_origin_are_rejected() {
        let cases = [
            ("https://evil.example", MoveUrlError::NotAPath),
            ("//evil.example", MoveUrlError::SchemeRelative),
            ("/\\evil.example", MoveUrlError::Backslash),
            ("javascript:alert(1)", MoveUrlError::NotAPath),
            ("/\t/evil.example", MoveUrlError::ControlCharacter),
            ("", MoveUrlError::NotAPath),
        ];
        for (raw, want) in cases {
            assert_eq!(MoveUrl::parse(raw), Err(want), "{raw:?}");
        }
        assert_eq!(MoveUrl::parse("/done?x=1").unwrap().as_str(), "/done?x=1");
    }

    #[test]
    fn messages_and_percents_outside_the_rules_are_refused() {
        assert!(Message::parse(&"é".repeat(200)).is_ok());
        assert_eq!(Message::parse(&"é".repeat(201)), Err(MessageError::TooLong));
        assert_eq!(Message::parse("a\nb"), Err(MessageError::ControlCharacter));
        assert_eq!(
            Message::parse("a\u{7f}"),
            Err(MessageError::ControlCharacter)
        );
        for invisible in [
            '\u{202E}',
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{200E}',
            '\u{200F}',
            '\u{2066}',
            '\u{2067}',
            '\u{2068}',
            '\u{2069}',
            '\u{FEFF}',
            '\u{00AD}',
            '\u{E0041}',
        ] {
            assert_eq!(
                Message::parse(&format!("done{invisible}txt.exe")),
                Err(MessageError::FormatCharacter(u32::from(invisible))),
                "U+{:04X}",
                u32::from(invisible)
            );
        }
        assert!(Message::parse("Étape 3 sur 8 — vérification ✓ 日本語").is_ok());
        for ok in [0.0, 40.5, 100.0] {
            assert!(Percent::parse(ok).is_ok());
        }
        for bad in [-1.0, 100.01, 101.0, f64::NAN] {
            assert_eq!(Percent::parse(bad), Err(PercentError), "{bad}");
        }
        for status in ["pending", "complete", "failed", "expired"] {
            assert_eq!(JobStatus::parse(status).unwrap().as_str(), status);
        }
    }

    #[test]
    fn rfc3339_formats_utc_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_583_200_250), "2025-12-01T10:00:00.250Z");
    }

    proptest! {
        /// Whatever the rule accepts, a browser resolves against our origin to our origin.
        #[test]
        fn accepted_move_urls_stay_on_the_origin(raw in "\\PC{0,40}") {
            if let Ok(url) = MoveUrl::parse(&raw) {
                let s = url.as_str();
                prop_assert!(s.starts_with('/'));
                prop_assert!(!s.starts_with("//"));
                prop_assert!(!s.contains('\\'));
                prop_assert!(!s.chars().any(char::is_control));
            }
        }
    }
}
