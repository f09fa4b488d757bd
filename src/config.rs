//! Settings read from the environment, each declared once below: its variable, its kind of value,
//! its default and its meaning. The parser, `check-config`'s listing, the masking of secrets,
//! README's settings table and the packaged env file all come from these declarations
//! ([`setting`]).
//!
//! An invalid value stops start-up with a message that names the variable, so an operator never
//! runs with a setting they did not mean.

mod kinds;
pub mod setting;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

pub use secrecy::{ExposeSecret, SecretString};

use self::kinds::Unit::{Millis, Secs};
use self::kinds::{
    Between, Count, CountOrOff, Link, OnOff, Parsed, PhcHash, STRONG, Secret, TokenList, With,
};
pub use self::kinds::{
    MIN_TOKEN_DISTINCT_CHARS, MIN_TOKEN_LEN, NamedTokens, SECRET_SET, origin_only,
};
use self::setting::{Env, Setting, settings};
use crate::limits::TrustedProxies;
use crate::logging::LogFormat;

/// `HANDOFF_DB_POOL`'s default: the read and write lanes hold one connection each, and the rest
/// serve page loads, sessions and resyncs.
pub const DEFAULT_DB_POOL: u32 = 16;

/// `HANDOFF_WRITE_QUEUE`'s default: far more than callers usually have waiting at once, and
/// about a tenth of a second of SQLite's group-committed writes.
pub const DEFAULT_WRITE_QUEUE: usize = 1024;

/// `HANDOFF_MAX_STREAMS_PER_CLIENT`'s default: a browser needs at most 6 over HTTP/1.1 and one
/// per tab over HTTP/2, so 64 leaves room for a household or a small office behind one address,
/// while one address can no longer take every place on the server.
pub const DEFAULT_STREAMS_PER_CLIENT: usize = 64;

settings! {
    /// Everything Handoff can be told at start-up. Its `Debug` is `check-config`'s listing.
    #[derive(Clone)]
    pub struct Config {
        /// where to listen
        pub addr: SocketAddr = HANDOFF_ADDR, Parsed, default "127.0.0.1:8080";
        /// `sqlite://…` (folder and file are created) or `postgres://…`
        pub database_url: String = DATABASE_URL, Link::DATABASE,
            default "sqlite://data/handoff.db";
        /// `redis://…`: fan completions out to the instances watching them (see Scale-out);
        /// with `HANDOFF_REDIS_CLUSTER=on`, a comma-separated list of the cluster's seed nodes
        pub redis_url: Option<String> = REDIS_URL, Link::REDIS, unset "unset";
        /// the single Pub/Sub channel of the releases before routing, and the prefix of each
        /// job's channel (`<it>:{<job id>}`)
        pub redis_channel: String = HANDOFF_REDIS_CHANNEL, Parsed, default "handoff:completions";
        /// `on`: `REDIS_URL` names a Redis Cluster (7+), whose job channels are sharded
        /// (`SSUBSCRIBE`/`SPUBLISH`)
        pub redis_cluster: bool = HANDOFF_REDIS_CLUSTER, OnOff, default "off";
        /// the single channel of the releases before routing: `publish` also publishes every
        /// message there, so that older instances hear this one; `on` listens there too, so that
        /// this one hears older instances at once during a rolling upgrade (not at the next
        /// resync); `off` once every instance runs this release (see Upgrading)
        pub fanout_legacy_channel: LegacyChannel = HANDOFF_FANOUT_LEGACY_CHANNEL, Parsed,
            default "publish";
        /// a bearer token for the API (named `default`) and, unless
        /// `HANDOFF_ADMIN_PASSWORD_HASH` is set, the admin password; at least 16 characters, at
        /// least 8 of them different (start-up refuses `aaaa…` or `1212…` and says why). Kept
        /// for existing setups: prefer `HANDOFF_API_TOKENS` (see Security, rotating tokens)
        pub api_token: Option<SecretString> = HANDOFF_API_TOKEN, Secret {
            advice: "; unset it to get a random one",
            ..STRONG
        }, unset "generated at start and logged, unless `HANDOFF_API_TOKENS` is set";
        /// job runners' bearer tokens, several at once so that they can be rotated:
        /// `name:token,name2:token2`, each token under `HANDOFF_API_TOKEN`'s rule, each name of
        /// `a-z`, `0-9`, `_` and `-`. The name shows in the log and in
        /// `handoff_api_calls_total{token="name"}`, the token never
        pub api_tokens: Option<NamedTokens> = HANDOFF_API_TOKENS, TokenList, unset "unset";
        /// the admin password's argon2id hash in PHC format, from `handoff hash-password`; once
        /// set, only that password opens `/admin`, and no API token does
        pub admin_password_hash: Option<SecretString> = HANDOFF_ADMIN_PASSWORD_HASH, PhcHash,
            unset "the API tokens open `/admin`";
        /// the secret (`handoff token` makes one; the same on every instance) from which the
        /// admin cookie key and the default fan-out key derive, one key per purpose, so that
        /// rotating API tokens changes neither. To switch from a `HANDOFF_API_TOKEN`, set it to
        /// that token's value: every key stays as it was
        pub secret_key: Option<SecretString> = HANDOFF_SECRET_KEY, Secret {
            advice: " (e.g. `handoff token`)",
            ..STRONG
        }, unset "`HANDOFF_API_TOKEN` serves, else random at each start";
        /// a stream ends cleanly after this long; the browser reconnects
        pub sse_timeout: Duration = HANDOFF_SSE_TIMEOUT_SECS, Secs, default "60";
        /// the `retry:` the browser waits before reconnecting
        pub sse_retry: Duration = HANDOFF_SSE_RETRY_MS, Millis, default "1000";
        /// interval of `:` keep-alive comments on an idle stream
        pub keep_alive: Duration = HANDOFF_KEEPALIVE_SECS, Secs, default "15";
        /// HTTP worker threads
        pub workers: Option<usize> = HANDOFF_WORKERS, Count, unset "one per core";
        /// with `REDIS_URL`: how often each instance re-reads its watched jobs even while its
        /// Redis link is up (see Scale-out)
        pub resync_interval: Duration = HANDOFF_RESYNC_SECS, Secs, default "30";
        /// open streams beyond it get `503` with `Retry-After` (see Limits and failure
        /// behaviour)
        pub max_streams: Option<usize> = HANDOFF_MAX_STREAMS, Count,
            unset "open-file limit minus a fortieth";
        /// open streams per client address (IPv6: per /64) beyond it get `429` with
        /// `Retry-After`; a number raises or lowers it, `off` lifts it (only for tests and
        /// benchmarks that open every stream from one address)
        pub max_streams_per_client: Option<usize> = HANDOFF_MAX_STREAMS_PER_CLIENT,
            CountOrOff, default "64";
        /// where browsers reach the site, e.g. `https://example.com` (scheme and host only).
        /// **The production setting**: when it is `https`, admin cookies are `Secure` whatever a
        /// proxy reports
        pub public_url: Option<url::Url> = HANDOFF_PUBLIC_URL, Link::ORIGIN, unset "unset";
        /// an admin session unused this long is over (at most 8 hours after login, however
        /// busy)
        pub admin_idle: Duration = HANDOFF_ADMIN_IDLE_SECS, Secs, default "1800", "30 min";
        /// IPs/CIDRs (e.g. `127.0.0.1`) whose `X-Forwarded-For` / `X-Forwarded-Proto` are
        /// believed; **set it to nginx's address behind nginx** (Handoff logs one warning when
        /// an untrusted peer sends these headers)
        pub trusted_proxies: TrustedProxies = HANDOFF_TRUSTED_PROXIES,
            With(TrustedProxies::parse), default "";
        /// jobs older than this are purged; a purged job answers like an unknown one
        pub retention: Duration = HANDOFF_RETENTION_SECS, Secs, default "604800", "7 days";
        /// a job still pending this long after creation expires (unless it was created with its
        /// own `deadlineSecs`)
        pub job_deadline: Duration = HANDOFF_JOB_DEADLINE_SECS, Secs, default "3600";
        /// `off`: the landing page's demo form is gone and `POST /jobs` answers `404`
        /// (recommended in production, see Security)
        pub demo: bool = HANDOFF_DEMO, OnOff, default "on";
        /// job creations, and apart from them completions and failures, that may wait for the
        /// database at once; beyond it `503` with `Retry-After`
        pub write_queue: usize = HANDOFF_WRITE_QUEUE, Count, default "1024";
        /// job reads (a page, an API lookup, a stream's connect) that may wait for the database
        /// at once; beyond it `503` with `Retry-After`
        pub read_queue: usize = HANDOFF_READ_QUEUE, Count, default "1024";
        /// PostgreSQL connections per instance at most (SQLite ignores it); size it so that
        /// every instance fits the server's `max_connections` (100 by default)
        pub db_pool: u32 = HANDOFF_DB_POOL, Between(2, 1000), default "16";
        /// with `REDIS_URL`: the secret (at least 32 characters, the same on every instance)
        /// that signs the messages between instances; `REDIS_URL` with none of it,
        /// `HANDOFF_SECRET_KEY` and `HANDOFF_API_TOKEN` set stops start-up
        pub fanout_key: Option<SecretString> = HANDOFF_FANOUT_KEY, Secret {
            min_len: 32,
            min_distinct: 0,
            advice: " (e.g. `openssl rand -base64 32`); unset it to derive one from \
                     HANDOFF_SECRET_KEY",
        }, unset "derived from `HANDOFF_SECRET_KEY`";
        /// on SIGTERM, how long the instance goes on serving while `/readyz` answers `503`, so
        /// that a load balancer polling it sends new streams and writes elsewhere first; then it
        /// stops accepting, ends its streams (browsers reconnect after `retry`), finishes what
        /// is in flight and exits. `0` stops at once (see Draining and rolling restarts)
        pub drain_secs: u32 = HANDOFF_DRAIN_SECS, Between(0, 300), default "0";
        /// `text`: env_logger's lines; `json`: one JSON object per line with `time`, `level`,
        /// `target`, `message`, `instance` and the line's fields, such as `job` (see Monitoring)
        pub log_format: LogFormat = HANDOFF_LOG_FORMAT, Parsed, default "text";
        group webhook: WebhookConfig when HANDOFF_WEBHOOK_URL else "unset: webhooks off";
    }
}

settings! {
    /// Where and how the delivery webhooks go (README, "Webhooks").
    #[derive(Clone)]
    pub struct WebhookConfig {
        /// `https://…` (or `http://…`): POST a signed webhook about every job that ends (see
        /// Webhooks). Any other scheme stops start-up
        pub url: url::Url = HANDOFF_WEBHOOK_URL, Link::WEBHOOK, required "unset",
            "it switches webhooks on";
        /// the HMAC-SHA256 key of `Handoff-Signature`, known to the receiver; the API token's
        /// rule applies (at least 16 characters, at least 8 different)
        pub secret: SecretString = HANDOFF_WEBHOOK_SECRET, STRONG,
            required "none; required with `HANDOFF_WEBHOOK_URL`",
            "HANDOFF_WEBHOOK_URL is set, so every webhook is signed: set HANDOFF_WEBHOOK_SECRET \
             to a secret the receiver knows too (e.g. `openssl rand -hex 32`)";
        /// how long an ending waits for a stream to take it before its webhook says `unclaimed`
        pub unclaimed: Duration = HANDOFF_UNCLAIMED_SECS, Secs, default "60";
        /// the wait before a failed webhook's first retry; it doubles at each attempt, up to an
        /// hour
        pub first_retry: Duration = HANDOFF_WEBHOOK_RETRY_MS, Millis, default "5000";
        /// attempts per webhook before it is given up
        pub attempts: u32 = HANDOFF_WEBHOOK_ATTEMPTS, Count, default "12";
        /// no attempt is made this long after the job ended
        pub max_age: Duration = HANDOFF_WEBHOOK_MAX_AGE_SECS, Secs, default "86400", "a day";
    }
}

/// `RUST_LOG`'s default.
pub const LOG_FILTER: &str = "info";

/// `RUST_LOG`: read by env_logger itself, not by [`Config`]; declared here so that the README
/// and the env file name it with the others.
pub const RUST_LOG: Setting = Setting {
    var: "RUST_LOG",
    default: Some(LOG_FILTER),
    note: "",
    meaning: &["log filter (env_logger); stream open/close are at `debug`"],
};

/// Every setting, in README's order.
pub fn all() -> impl Iterator<Item = &'static Setting> {
    Config::SETTINGS
        .iter()
        .chain(WebhookConfig::SETTINGS)
        .chain([&RUST_LOG])
}

/// A variable that is set but unusable.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests can supply their own environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let config = Self::read(&Env(&lookup))?;
        if config.redis_url.is_some()
            && config.root_secret().is_none()
            && config.fanout_key.is_none()
        {
            return Err(ConfigError {
                var: HANDOFF_FANOUT_KEY.var,
                value: String::new(),
                reason: "REDIS_URL is set, so instances sign the messages between them: set \
                         HANDOFF_FANOUT_KEY, or HANDOFF_SECRET_KEY, to the same secret on every \
                         instance (a key generated at start is this instance's alone)"
                    .into(),
            });
        }
        if let (Some(single), Some(NamedTokens(named))) = (&config.api_token, &config.api_tokens) {
            let clash = named.iter().find(|(name, token)| {
                name == DEFAULT_TOKEN_NAME || token.expose_secret() == single.expose_secret()
            });
            if let Some((name, _)) = clash {
                return Err(ConfigError {
                    var: HANDOFF_API_TOKENS.var,
                    value: "(not shown)".into(),
                    reason: format!(
                        "{name}: HANDOFF_API_TOKEN is the token named {DEFAULT_TOKEN_NAME}; give \
                         every token its own name and value"
                    ),
                });
            }
        }
        // An unclaimed webhook falls due `unclaimed` after the ending; past `max_age` none is sent.
        if let Some(hook) = &config.webhook
            && hook.max_age <= hook.unclaimed
        {
            return Err(ConfigError {
                var: HANDOFF_WEBHOOK_MAX_AGE_SECS.var,
                value: hook.max_age.as_secs().to_string(),
                reason: format!(
                    "must be longer than HANDOFF_UNCLAIMED_SECS ({} s), or no unclaimed webhook \
                     is ever sent",
                    hook.unclaimed.as_secs()
                ),
            });
        }
        Ok(config)
    }

    /// The secret the derived keys come from ([`crate::auth`]): `HANDOFF_SECRET_KEY`, or else
    /// `HANDOFF_API_TOKEN` (as before there was a key of its own, so an upgrade changes no key);
    /// `None`: a random one at each start.
    pub fn root_secret(&self) -> Option<&SecretString> {
        self.secret_key.as_ref().or(self.api_token.as_ref())
    }

    /// Valid but unwise settings, for `check-config` and the start-up log.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.admin_password_hash.is_none() {
            let tokens = match (&self.api_token, &self.api_tokens) {
                (Some(_), Some(_)) => {
                    Some("HANDOFF_API_TOKEN and every token of HANDOFF_API_TOKENS")
                }
                (Some(_), None) => Some("HANDOFF_API_TOKEN"),
                (None, Some(_)) => Some("every token of HANDOFF_API_TOKENS"),
                (None, None) => None,
            };
            if let Some(tokens) = tokens {
                warnings.push(format!(
                    "{tokens} also serves as the admin password: every job runner that holds \
                     one can use /admin. Set HANDOFF_ADMIN_PASSWORD_HASH (`handoff \
                     hash-password`) to give the admin a password of its own"
                ));
            }
        }
        if self.secret_key.is_none() {
            if self.api_token.is_some() {
                warnings.push(
                    "the admin cookie key and the fan-out key derive from HANDOFF_API_TOKEN: \
                     before rotating it, set HANDOFF_SECRET_KEY to its current value (README, \
                     Security)"
                        .into(),
                );
            } else if self.api_tokens.is_some() {
                warnings.push(
                    "HANDOFF_SECRET_KEY is not set: admin sessions end when this instance \
                     restarts and hold on this instance only; set it, the same on every \
                     instance (`handoff token`)"
                        .into(),
                );
            }
        }
        warnings
    }
}

/// The name `HANDOFF_API_TOKEN` goes by in the log and in `handoff_api_calls_total`.
pub const DEFAULT_TOKEN_NAME: &str = "default";

/// What an instance does with the single channel of the releases before routing
/// (`HANDOFF_FANOUT_LEGACY_CHANNEL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegacyChannel {
    /// Nothing: every instance of the fleet runs a release with routing.
    Off,
    /// Every message also goes there, so that instances of older releases, which hear nothing
    /// else, get this one's news. The default for the release that brings routing: an upgrade
    /// that forgets the setting loses nothing, and a stream-less instance still hears nothing.
    Publish,
    /// Publish there and listen there too, during a rolling upgrade: a result that an older
    /// instance publishes reaches the streams here at once, not at the next resync.
    On,
}

impl FromStr for LegacyChannel {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "off" => Ok(Self::Off),
            "publish" => Ok(Self::Publish),
            "on" => Ok(Self::On),
            _ => Err("expected publish, on or off".into()),
        }
    }
}

impl fmt::Display for LegacyChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Publish => "publish",
            Self::On => "on",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn defaults_work_with_no_setup() {
        let c = with(&[]).unwrap();
        assert_eq!(c.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url, "sqlite://data/handoff.db");
        assert_eq!(c.sse_timeout, Duration::from_secs(60));
        assert_eq!(c.sse_retry, Duration::from_millis(1000));
        assert_eq!(c.keep_alive, Duration::from_secs(15));
        assert_eq!(c.resync_interval, Duration::from_secs(30));
        assert!(c.api_token.is_none() && c.redis_url.is_none());
        assert_eq!(c.redis_channel, "handoff:completions");
        assert_eq!(c.max_streams, None);
        assert_eq!(c.max_streams_per_client, Some(64));
        assert_eq!(c.trusted_proxies, TrustedProxies::default());
        assert_eq!(c.retention, Duration::from_secs(604_800));
        assert_eq!(c.job_deadline, Duration::from_secs(3600));
        assert_eq!(c.public_url, None);
        assert_eq!(c.admin_idle, Duration::from_secs(1800));
    }

    #[test]
    fn the_public_url_is_an_origin_and_nothing_more() {
        let url = |v: &str| with(&[("HANDOFF_PUBLIC_URL", v)]);
        let ok = url("https://example.com").unwrap().public_url.unwrap();
        assert_eq!((ok.scheme(), ok.host_str()), ("https", Some("example.com")));
        assert!(url("https://example.com:8443/").is_ok());
        assert!(url("http://127.0.0.1:8080").is_ok());
        for bad in [
            "example.com",
            "ftp://example.com",
            "https://example.com/app",
            "https://user:pw@example.com",
            "https://example.com/?x=1",
        ] {
            let err = url(bad).unwrap_err();
            assert_eq!(err.var, "HANDOFF_PUBLIC_URL", "{bad}");
        }
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let c = with(&[
            ("HANDOFF_API_TOKEN", "hunter2secret-hunter2secret"),
            ("DATABASE_URL", "postgres://app:dbsecret1@db/jobs"),
            ("REDIS_URL", "redis://:redissecret1@cache:6379"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        for secret in ["hunter2secret", "dbsecret1", "redissecret1"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(
            shown.contains("db/jobs") && shown.contains("HANDOFF_API_TOKEN"),
            "{shown}"
        );
    }

    #[test]
    fn invalid_values_name_their_variable() {
        for (var, value) in [
            ("HANDOFF_ADDR", "nowhere"),
            ("HANDOFF_SSE_TIMEOUT_SECS", "soon"),
            ("HANDOFF_SSE_RETRY_MS", "0"),
            ("HANDOFF_KEEPALIVE_SECS", "-1"),
            ("HANDOFF_SSE_TIMEOUT_SECS", "18446744073709551615"),
            ("HANDOFF_API_TOKEN", "short-secret"),
            ("HANDOFF_RESYNC_SECS", "0"),
            ("DATABASE_URL", "mysql://x"),
            ("REDIS_URL", "http://x"),
            ("HANDOFF_MAX_STREAMS", "0"),
            ("HANDOFF_MAX_STREAMS_PER_CLIENT", "many"),
            ("HANDOFF_TRUSTED_PROXIES", "10.0.0.0/40"),
            ("HANDOFF_RETENTION_SECS", "forever"),
            ("HANDOFF_JOB_DEADLINE_SECS", "0"),
            ("HANDOFF_PUBLIC_URL", "example.com"),
            ("HANDOFF_ADMIN_IDLE_SECS", "0"),
        ] {
            let err = with(&[(var, value)]).unwrap_err();
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn the_per_client_stream_cap_is_64_unless_raised_or_turned_off() {
        let cap = |v: &str| with(&[("HANDOFF_MAX_STREAMS_PER_CLIENT", v)]);
        assert_eq!(cap("").unwrap().max_streams_per_client, Some(64));
        assert_eq!(DEFAULT_STREAMS_PER_CLIENT, 64);
        assert_eq!(cap("500").unwrap().max_streams_per_client, Some(500));
        assert_eq!(cap("off").unwrap().max_streams_per_client, None);
        assert_eq!(cap("OFF").unwrap().max_streams_per_client, None);
        let err = cap("0").unwrap_err().to_string();
        assert!(err.contains("or off"), "{err}");
    }

    #[test]
    fn a_token_of_few_different_characters_is_refused_saying_why() {
        for weak in [
            "aaaaaaaaaaaaaaaaaaaaaaaa",
            "1212121212121212",
            "abcdefgabcdefgabcdefg",
        ] {
            let err = with(&[("HANDOFF_API_TOKEN", weak)]).unwrap_err();
            assert_eq!(err.var, "HANDOFF_API_TOKEN");
            let shown = err.to_string();
            assert!(shown.contains("8 different characters"), "{shown}");
            assert!(!shown.contains(weak), "the token is never shown: {shown}");
        }
        let fine = "abcdefgh12345678";
        let config = with(&[("HANDOFF_API_TOKEN", fine)]).unwrap();
        let token = config.api_token.as_ref().map(ExposeSecret::expose_secret);
        assert_eq!(token, Some(fine));
    }

    #[test]
    fn a_rejected_url_is_shown_without_its_password() {
        for (var, value) in [
            (
                "DATABASE_URL",
                "mysql://app:hunter2secret@db.internal:3306/jobs",
            ),
            ("REDIS_URL", "http://:hunter2secret@cache.internal:6379"),
        ] {
            let err = with(&[(var, value)]).unwrap_err().to_string();
            assert!(!err.contains("hunter2secret"), "{err}");
            assert!(err.contains("***@"), "the rest of the URL stays: {err}");
        }
        let err = with(&[("DATABASE_URL", "data/handoff.db")]).unwrap_err();
        assert!(err.to_string().contains("data/handoff.db"), "{err}");
        for (var, value) in [
            ("DATABASE_URL", "mysq1 app:hunter2secret@db"),
            ("DATABASE_URL", "app:hunter2secret@db/jobs"),
            ("REDIS_URL", "redis:hunter2secret@cache:6379"),
            ("REDIS_URL", "redis:/:hunter2secret@cache"),
            (
                "DATABASE_URL",
                "mysql://db.internal/jobs?user=app&password=hunter2secret",
            ),
        ] {
            let err = with(&[(var, value)]).unwrap_err().to_string();
            assert!(!err.contains("hunter2secret"), "{err}");
        }
    }

    #[test]
    fn the_database_pool_has_a_default_and_a_floor() {
        assert_eq!(with(&[]).unwrap().db_pool, DEFAULT_DB_POOL);
        assert_eq!(with(&[("HANDOFF_DB_POOL", "6")]).unwrap().db_pool, 6);
        for bad in ["1", "0", "lots", "1001"] {
            let err = with(&[("HANDOFF_DB_POOL", bad)]).unwrap_err();
            assert_eq!(err.var, "HANDOFF_DB_POOL", "{bad}");
        }
    }

    #[test]
    fn the_write_queue_has_a_default_and_names_its_variable() {
        assert_eq!(with(&[]).unwrap().write_queue, DEFAULT_WRITE_QUEUE);
        assert_eq!(
            with(&[("HANDOFF_WRITE_QUEUE", "8")]).unwrap().write_queue,
            8
        );
        let err = with(&[("HANDOFF_WRITE_QUEUE", "0")]).unwrap_err();
        assert_eq!(err.var, "HANDOFF_WRITE_QUEUE");
    }

    #[test]
    fn draining_is_off_by_default_and_at_most_five_minutes() {
        assert_eq!(with(&[]).unwrap().drain_secs, 0);
        assert_eq!(with(&[("HANDOFF_DRAIN_SECS", "0")]).unwrap().drain_secs, 0);
        assert_eq!(
            with(&[("HANDOFF_DRAIN_SECS", "10")]).unwrap().drain_secs,
            10
        );
        for bad in ["301", "-1", "soon"] {
            let err = with(&[("HANDOFF_DRAIN_SECS", bad)]).unwrap_err();
            assert_eq!(err.var, "HANDOFF_DRAIN_SECS", "{bad}");
        }
    }

    #[test]
    fn the_log_is_text_unless_json_is_asked_for() {
        assert_eq!(with(&[]).unwrap().log_format, LogFormat::Text);
        let json = with(&[("HANDOFF_LOG_FORMAT", "json")]).unwrap();
        assert_eq!(json.log_format, LogFormat::Json);
        let err = with(&[("HANDOFF_LOG_FORMAT", "xml")]).unwrap_err();
        assert_eq!(err.var, "HANDOFF_LOG_FORMAT");
        assert!(err.reason.contains("text or json"), "{err}");
    }

    #[test]
    fn the_demo_is_on_unless_switched_off() {
        assert!(with(&[]).unwrap().demo);
        assert!(!with(&[("HANDOFF_DEMO", "off")]).unwrap().demo);
        let err = with(&[("HANDOFF_DEMO", "no")]).unwrap_err();
        assert_eq!(err.var, "HANDOFF_DEMO");
        assert!(err.reason.contains("on or off"), "{err}");
    }

    #[test]
    fn the_settings_name_every_variable_and_show_no_secret() {
        let token = "a-secret-token-0123456789";
        let key = "a-fanout-key-of-at-least-32-characters";
        let c = with(&[
            ("HANDOFF_API_TOKEN", token),
            ("HANDOFF_FANOUT_KEY", key),
            ("DATABASE_URL", "postgres://app:hunter2secret@db:5432/jobs"),
            ("HANDOFF_MAX_STREAMS_PER_CLIENT", "off"),
        ])
        .unwrap();
        let settings = c.settings();
        let listed = format!("{settings:?}");
        for secret in [token, key, "hunter2secret"] {
            assert!(!listed.contains(secret), "{listed}");
        }
        let value = |var: &str| {
            settings
                .iter()
                .find(|(name, _)| *name == var)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(value("HANDOFF_API_TOKEN"), Some(SECRET_SET));
        assert_eq!(value("HANDOFF_MAX_STREAMS_PER_CLIENT"), Some("off"));
        assert_eq!(value("HANDOFF_JOB_DEADLINE_SECS"), Some("3600"));
        // Every variable the README's tables document, except RUST_LOG (env_logger's own).
        let documented: std::collections::BTreeSet<&str> = include_str!("../README.md")
            .lines()
            .filter_map(|line| line.strip_prefix("| `")?.split_once('`'))
            .map(|(var, _)| var)
            .filter(|var| var.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
            .filter(|var| *var != "RUST_LOG")
            .collect();
        let listed: std::collections::BTreeSet<&str> =
            settings.iter().map(|(var, _)| *var).collect();
        assert_eq!(listed, documented);
    }

    #[test]
    fn a_fanout_key_must_be_long_and_is_never_shown() {
        assert!(with(&[]).unwrap().fanout_key.is_none());
        let err = with(&[("HANDOFF_FANOUT_KEY", "too-short-a-key")]).unwrap_err();
        assert_eq!(err.var, "HANDOFF_FANOUT_KEY");
        assert!(!err.to_string().contains("too-short-a-key"), "{err}");
        let key = "a-fanout-key-of-at-least-32-characters";
        let c = with(&[("HANDOFF_FANOUT_KEY", key)]).unwrap();
        assert!(!format!("{c:?}").contains(key), "{c:?}");
    }

    const PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$t7zXCruHGnHUl5ub3tHGKg$nlTmlK1GJ2uMfHbFbnyab9tlTpmEX5nwGoxysNIbfpM";

    #[test]
    fn several_named_tokens_are_read_and_listed_by_name_only() {
        let c = with(&[(
            "HANDOFF_API_TOKENS",
            "ci:ci-token-0123456789, deploy-2:deploy-token-0123456789",
        )])
        .unwrap();
        let tokens = c.api_tokens.as_ref().unwrap();
        let names: Vec<&str> = tokens.0.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["ci", "deploy-2"]);
        assert_eq!(tokens.0[1].1.expose_secret(), "deploy-token-0123456789");
        let listed = format!("{c:?}");
        assert!(
            listed.contains("ci, deploy-2 (tokens not shown)"),
            "{listed}"
        );
        assert!(!listed.contains("ci-token"), "{listed}");
        for (bad, why) in [
            ("ci", "is not name:token"),
            ("CI:ci-token-0123456789", "a-z, 0-9, _ and -"),
            (":ci-token-0123456789", "a-z, 0-9, _ and -"),
            (
                "ci:ci-token-0123456789,ci:other-token-0123456789",
                "ci is given twice",
            ),
            (
                "a:ci-token-0123456789,b:ci-token-0123456789",
                "token of b is given twice",
            ),
            ("ci:short-secret", "ci must be at least 16 characters"),
            ("ci:abababababababababab", "8 different characters"),
        ] {
            let err = with(&[("HANDOFF_API_TOKENS", bad)]).unwrap_err();
            assert_eq!(err.var, "HANDOFF_API_TOKENS", "{bad}");
            assert!(err.reason.contains(why), "{bad}: {err}");
            for secret in ["ci-token", "short-secret", "abab"] {
                assert!(!err.to_string().contains(secret), "{err}");
            }
        }
        let single = ("HANDOFF_API_TOKEN", "ci-token-0123456789");
        for clash in ["default:other-token-0123456789", "ci:ci-token-0123456789"] {
            let err = with(&[single, ("HANDOFF_API_TOKENS", clash)]).unwrap_err();
            assert_eq!(err.var, "HANDOFF_API_TOKENS", "{clash}");
            assert!(!err.to_string().contains("token-0123456789"), "{err}");
        }
        assert!(with(&[single, ("HANDOFF_API_TOKENS", "ci:other-token-0123456789")]).is_ok());
    }

    #[test]
    fn the_admin_password_hash_must_be_argon2id_and_is_never_shown() {
        let c = with(&[("HANDOFF_ADMIN_PASSWORD_HASH", PHC)]).unwrap();
        assert_eq!(c.admin_password_hash.as_ref().unwrap().expose_secret(), PHC);
        assert!(!format!("{c:?}").contains("nlTmlK1G"), "{c:?}");
        for bad in [
            "hunter2",
            "$argon2i$v=19$m=19456,t=2,p=1$t7zXCruHGnHUl5ub3tHGKg$nlTmlK1GJ2uMfHbFbnyab9tlTpmEX5nwGoxysNIbfpM",
            "$argon2id$v=19$m=19456,t=2,p=1$t7zXCruHGnHUl5ub3tHGKg",
        ] {
            let err = with(&[("HANDOFF_ADMIN_PASSWORD_HASH", bad)]).unwrap_err();
            assert_eq!(err.var, "HANDOFF_ADMIN_PASSWORD_HASH", "{bad}");
            assert!(err.reason.contains("hash-password"), "{err}");
        }
    }

    #[test]
    fn check_config_warns_while_a_token_is_the_admin_password_or_the_root_of_the_keys() {
        let single = ("HANDOFF_API_TOKEN", "ci-token-0123456789");
        let named = ("HANDOFF_API_TOKENS", "ci:other-token-0123456789");
        let hash = ("HANDOFF_ADMIN_PASSWORD_HASH", PHC);
        let key = ("HANDOFF_SECRET_KEY", "a-secret-key-0123456789");
        let warned = |pairs: &[(&str, &str)]| with(pairs).unwrap().warnings().join("\n");
        assert!(
            warned(&[]).is_empty(),
            "a generated token warns at start-up instead"
        );
        let legacy = warned(&[single]);
        assert!(
            legacy.contains("HANDOFF_API_TOKEN also serves as the admin password"),
            "{legacy}"
        );
        assert!(
            legacy.contains("set HANDOFF_SECRET_KEY to its current value"),
            "{legacy}"
        );
        assert!(warned(&[single, hash, key]).is_empty());
        let rotating = warned(&[named, hash]);
        assert!(
            rotating.contains("HANDOFF_SECRET_KEY is not set"),
            "{rotating}"
        );
        assert!(warned(&[named, key]).contains("every token of HANDOFF_API_TOKENS"));
        assert!(warned(&[named, hash, key]).is_empty());
    }

    #[test]
    fn the_readme_settings_table_is_the_declaration() {
        let readme = include_str!("../README.md");
        let start = readme
            .find("| variable | default | meaning |")
            .expect("README.md has a settings table");
        let end = readme[start..]
            .find("\n\n")
            .map_or(readme.len(), |n| start + n + 1);
        let declared = setting::markdown_table(all());
        assert!(
            readme[start..end] == declared,
            "README.md's settings table differs from the declarations in src/config.rs; \
             `handoff check-config --markdown` prints it as it should read:\n\n{declared}"
        );
    }

    #[test]
    fn the_env_file_names_every_setting_at_its_default_under_its_meaning() {
        let file = setting::env_file(all());
        for setting in all() {
            let assignment = format!("\n#{}={}\n", setting.var, setting.default.unwrap_or(""));
            let at = file
                .find(&assignment)
                .unwrap_or_else(|| panic!("{assignment}: {file}"));
            let block = &file[file[..at].rfind("\n\n").expect("a blank line before")..=at];
            assert!(block.contains(&format!("# {}: ", setting.var)), "{block}");
            let default = format!("# Default: {}\n", setting.default_column());
            assert!(block.contains(&default), "{block}");
        }
        assert!(file.contains("\n#HANDOFF_ADMIN_IDLE_SECS=1800\n"), "{file}");
        assert!(file.contains("# Default: `1800` (30 min)\n"), "{file}");
        assert!(file.contains("\n#HANDOFF_API_TOKEN=\n"), "{file}");
        assert!(
            file.lines()
                .all(|line| line.len() <= 100 || !line.contains(' '))
        );
        assert!(
            file.lines()
                .all(|line| line.is_empty() || line.starts_with('#')),
            "nothing is set, every line is a comment: {file}"
        );
        // Every default, read back, is a valid configuration: the file changes nothing.
        let defaults: Vec<(String, String)> = file
            .lines()
            .filter_map(|line| line.strip_prefix('#')?.split_once('='))
            .map(|(var, value)| (var.to_owned(), value.to_owned()))
            // Webhook settings apply only with HANDOFF_WEBHOOK_URL, which has no default.
            .filter(|(var, _)| WebhookConfig::SETTINGS.iter().all(|s| s.var != var))
            .collect();
        let read = Config::from_lookup(|name| {
            defaults
                .iter()
                .find(|(var, _)| var == name)
                .map(|(_, value)| value.clone())
        })
        .unwrap();
        assert_eq!(format!("{read:?}"), format!("{:?}", with(&[]).unwrap()));
    }

    const HOOK: (&str, &str) = ("HANDOFF_WEBHOOK_URL", "https://app.example.com/hooks?x=1");
    const HOOK_SECRET: (&str, &str) = ("HANDOFF_WEBHOOK_SECRET", "whsec-0123456789abcdef");

    #[test]
    fn webhooks_are_off_by_default_and_take_their_defaults_when_on() {
        assert!(with(&[]).unwrap().webhook.is_none());
        let hook = with(&[HOOK, HOOK_SECRET]).unwrap().webhook.unwrap();
        assert_eq!(hook.url.as_str(), HOOK.1);
        assert_eq!(hook.unclaimed, Duration::from_secs(60));
        assert_eq!(hook.first_retry, Duration::from_secs(5));
        assert_eq!(hook.attempts, 12);
        assert_eq!(hook.max_age, Duration::from_secs(86_400));
        let shown = format!("{:?}", with(&[HOOK, HOOK_SECRET]).unwrap());
        assert!(!shown.contains(HOOK_SECRET.1), "{shown}");
    }

    #[test]
    fn a_webhook_url_that_is_not_http_or_has_no_strong_secret_stops_start_up() {
        for bad in [
            "ftp://app.example.com/x",
            "file:///etc/passwd",
            "app.example.com",
            "unix:/run/x",
        ] {
            let err = with(&[("HANDOFF_WEBHOOK_URL", bad), HOOK_SECRET]).unwrap_err();
            assert_eq!(err.var, "HANDOFF_WEBHOOK_URL", "{bad}");
            assert!(err.reason.contains("https://"), "{err}");
        }
        let err = with(&[HOOK]).unwrap_err();
        assert_eq!(err.var, "HANDOFF_WEBHOOK_SECRET");
        assert!(err.reason.contains("HANDOFF_WEBHOOK_URL is set"), "{err}");
        for weak in ["short-secret", "abababababababababab"] {
            let err = with(&[HOOK, ("HANDOFF_WEBHOOK_SECRET", weak)]).unwrap_err();
            assert_eq!(err.var, "HANDOFF_WEBHOOK_SECRET");
            assert!(!err.to_string().contains(weak), "{err}");
        }
        let err = with(&[HOOK_SECRET]).unwrap_err();
        assert!(
            err.reason.contains("only applies with HANDOFF_WEBHOOK_URL"),
            "{err}"
        );
    }

    #[test]
    fn a_webhook_url_shows_only_its_origin_and_refuses_credentials_and_a_short_max_age() {
        let secret_path = (
            "HANDOFF_WEBHOOK_URL",
            "https://hooks.example.com:8443/T0/B0/s3cr3tpath?token=s3cr3tquery",
        );
        let config = with(&[secret_path, HOOK_SECRET]).unwrap();
        let listed = format!("{:?} {:?}", config.settings(), config);
        assert!(!listed.contains("s3cr3t"), "{listed}");
        assert!(
            listed.contains("https://hooks.example.com:8443/…"),
            "{listed}"
        );
        let err = with(&[
            (
                "HANDOFF_WEBHOOK_URL",
                "https://user:s3cr3t@hooks.example.com/x",
            ),
            HOOK_SECRET,
        ])
        .unwrap_err();
        assert_eq!(err.var, "HANDOFF_WEBHOOK_URL");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
        let err = with(&[
            HOOK,
            HOOK_SECRET,
            ("HANDOFF_UNCLAIMED_SECS", "120"),
            ("HANDOFF_WEBHOOK_MAX_AGE_SECS", "120"),
        ])
        .unwrap_err();
        assert_eq!(err.var, "HANDOFF_WEBHOOK_MAX_AGE_SECS");
        assert!(err.reason.contains("HANDOFF_UNCLAIMED_SECS"), "{err}");
    }

    #[test]
    fn routing_keeps_the_single_channel_for_the_upgrade_and_a_cluster_is_asked_for() {
        let c = with(&[]).unwrap();
        assert_eq!(c.fanout_legacy_channel, LegacyChannel::Publish);
        assert!(!c.redis_cluster);
        let c = with(&[
            ("HANDOFF_FANOUT_LEGACY_CHANNEL", "off"),
            ("HANDOFF_REDIS_CLUSTER", "on"),
        ])
        .unwrap();
        assert_eq!(c.fanout_legacy_channel, LegacyChannel::Off);
        assert!(c.redis_cluster);
        let c = with(&[("HANDOFF_FANOUT_LEGACY_CHANNEL", "on")]).unwrap();
        assert_eq!(c.fanout_legacy_channel, LegacyChannel::On);
        let err = with(&[("HANDOFF_FANOUT_LEGACY_CHANNEL", "yes")]).unwrap_err();
        assert_eq!(err.var, "HANDOFF_FANOUT_LEGACY_CHANNEL");
        assert!(err.reason.contains("expected publish, on or off"), "{err}");
    }

    #[test]
    fn redis_without_a_shared_secret_to_sign_its_messages_is_refused() {
        let redis = ("REDIS_URL", "redis://127.0.0.1:6379");
        let err = with(&[redis]).unwrap_err();
        assert_eq!(err.var, "HANDOFF_FANOUT_KEY");
        assert!(err.reason.contains("HANDOFF_SECRET_KEY"), "{err}");
        assert!(with(&[redis, ("HANDOFF_API_TOKEN", "a-shared-token-0123")]).is_ok());
        assert!(with(&[redis, ("HANDOFF_SECRET_KEY", "a-shared-key-0123")]).is_ok());
        let named = ("HANDOFF_API_TOKENS", "ci:a-shared-token-0123");
        assert!(with(&[redis, named]).is_err(), "runner tokens are no key");
        let key = (
            "HANDOFF_FANOUT_KEY",
            "a-fanout-key-of-at-least-32-characters",
        );
        assert!(with(&[redis, key]).is_ok());
    }
}
