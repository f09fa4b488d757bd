//! Settings read from the environment, each with a working default.
//!
//! An invalid value stops start-up with a message that names the variable, so an operator never
//! runs with a setting they did not mean.

use std::net::SocketAddr;
use std::time::Duration;

use crate::limits::TrustedProxies;

/// Everything Handoff can be told at start-up. Its `Debug` masks the secrets.
#[derive(Clone)]
pub struct Config {
    /// `HANDOFF_ADDR`: where to listen.
    pub addr: SocketAddr,
    /// `DATABASE_URL`: `sqlite://…` (default) or `postgres://…`.
    pub database_url: String,
    /// `REDIS_URL`: when set, completions fan out to every instance over Redis Pub/Sub.
    pub redis_url: Option<String>,
    /// `HANDOFF_REDIS_CHANNEL`: the Pub/Sub channel the instances of one deployment share.
    pub redis_channel: String,
    /// `HANDOFF_API_TOKEN`: `None` means one is generated at start.
    pub api_token: Option<String>,
    /// `HANDOFF_SSE_TIMEOUT_SECS`: a stream ends cleanly after this long; the browser reconnects.
    pub sse_timeout: Duration,
    /// `HANDOFF_SSE_RETRY_MS`: the `retry:` the browser waits before reconnecting.
    pub sse_retry: Duration,
    /// `HANDOFF_KEEPALIVE_SECS`: interval of `:` comments on an idle stream.
    pub keep_alive: Duration,
    /// `HANDOFF_WORKERS`: actix worker threads (default: one per core).
    pub workers: Option<usize>,
    /// `HANDOFF_RESYNC_SECS`: with Redis, how often the watched jobs are re-read from the store
    /// even while the link is up, for completions whose publish failed.
    pub resync_interval: Duration,
    /// `HANDOFF_MAX_STREAMS`: open streams beyond this get `503`; `None` means "from the
    /// open-file limit" (see [`crate::limits::default_max_streams`]).
    pub max_streams: Option<usize>,
    /// `HANDOFF_MAX_STREAMS_PER_CLIENT`: open streams per client address (an IPv6 client is its
    /// /64), [`DEFAULT_STREAMS_PER_CLIENT`] unless set; `off` (`None`) lifts the cap.
    pub max_streams_per_client: Option<usize>,
    /// `HANDOFF_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    /// `HANDOFF_RETENTION_SECS`: jobs older than this are purged.
    pub retention: Duration,
    /// `HANDOFF_JOB_DEADLINE_SECS`: a job still pending this long after its creation expires,
    /// unless its creator names another deadline.
    pub job_deadline: Duration,
    /// `HANDOFF_PUBLIC_URL`: where browsers reach this deployment, e.g. `https://example.com`.
    /// When it is `https`, admin cookies are `Secure` whatever a proxy reports.
    pub public_url: Option<url::Url>,
    /// `HANDOFF_ADMIN_IDLE_SECS`: an admin session unused this long is over.
    pub admin_idle: Duration,
    /// `HANDOFF_DEMO` (`on` or `off`): whether the landing page's demo form creates jobs.
    pub demo: bool,
    /// `HANDOFF_WRITE_QUEUE`: how many job creations, and apart from them how many completions
    /// and failures, may wait for the database at once; beyond it they get `503`.
    pub write_queue: usize,
    /// `HANDOFF_DB_POOL`: at most this many PostgreSQL connections per instance (SQLite ignores
    /// it), so that a fleet fits the server's `max_connections`.
    pub db_pool: u32,
    /// `HANDOFF_FANOUT_KEY`: signs the messages between instances; `None`: a key derived from the
    /// API token.
    pub fanout_key: Option<String>,
    /// `HANDOFF_WEBHOOK_URL` and its settings: when set, each job that ends is reported there.
    pub webhook: Option<WebhookConfig>,
}

/// Where and how the delivery webhooks go (README, "Webhooks"). Its `Debug` masks the secret.
#[derive(Clone)]
pub struct WebhookConfig {
    /// `HANDOFF_WEBHOOK_URL`: the one address webhooks are POSTed to, `http://` or `https://`.
    pub url: url::Url,
    /// `HANDOFF_WEBHOOK_SECRET`: the HMAC-SHA256 key of the `Handoff-Signature` header.
    pub secret: String,
    /// `HANDOFF_UNCLAIMED_SECS`: how long an ending waits for a stream before its webhook says
    /// `unclaimed`.
    pub unclaimed: Duration,
    /// `HANDOFF_WEBHOOK_RETRY_MS`: the wait before the first retry; it doubles, up to an hour.
    pub first_retry: Duration,
    /// `HANDOFF_WEBHOOK_ATTEMPTS`: the most attempts per webhook.
    pub attempts: u32,
    /// `HANDOFF_WEBHOOK_MAX_AGE_SECS`: no attempt is made this long after the job ended.
    pub max_age: Duration,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &origin_only(self.url.as_str()))
            .field("secret", &"(set, not shown)")
            .field("unclaimed", &self.unclaimed)
            .field("first_retry", &self.first_retry)
            .field("attempts", &self.attempts)
            .field("max_age", &self.max_age)
            .finish()
    }
}

/// `HANDOFF_DB_POOL`'s default: the read and write lanes hold one connection each, and the rest
/// serve page loads, sessions and resyncs.
pub const DEFAULT_DB_POOL: u32 = 16;

/// `HANDOFF_WRITE_QUEUE`'s default: far more than callers usually have waiting at once, and
/// about a tenth of a second of SQLite's group-committed writes.
pub const DEFAULT_WRITE_QUEUE: usize = 1024;

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.settings()).finish()
    }
}

/// How a secret shows in [`Config::settings`]: whether it is set, never what it is.
const SECRET_SET: &str = "(set, not shown)";

impl Config {
    /// Every setting as its variable and its effective value, in the variable's own units and
    /// with defaults filled in, for an operator to read (`handoff check-config`). Secrets are
    /// masked: tokens and keys entirely, passwords inside URLs.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let secs = |d: Duration| d.as_secs().to_string();
        let or = |value: Option<String>, otherwise: &str| value.unwrap_or_else(|| otherwise.into());
        let mut settings = vec![
            ("HANDOFF_ADDR", self.addr.to_string()),
            ("DATABASE_URL", without_password(&self.database_url)),
            (
                "REDIS_URL",
                or(self.redis_url.as_deref().map(without_password), "unset"),
            ),
            ("HANDOFF_REDIS_CHANNEL", self.redis_channel.clone()),
            (
                "HANDOFF_API_TOKEN",
                or(
                    self.api_token.as_ref().map(|_| SECRET_SET.into()),
                    "unset: one is generated at start and logged",
                ),
            ),
            ("HANDOFF_SSE_TIMEOUT_SECS", secs(self.sse_timeout)),
            (
                "HANDOFF_SSE_RETRY_MS",
                self.sse_retry.as_millis().to_string(),
            ),
            ("HANDOFF_KEEPALIVE_SECS", secs(self.keep_alive)),
            (
                "HANDOFF_WORKERS",
                or(self.workers.map(|n| n.to_string()), "one per core"),
            ),
            ("HANDOFF_RESYNC_SECS", secs(self.resync_interval)),
            (
                "HANDOFF_MAX_STREAMS",
                or(
                    self.max_streams.map(|n| n.to_string()),
                    "from the open-file limit at start",
                ),
            ),
            (
                "HANDOFF_MAX_STREAMS_PER_CLIENT",
                or(self.max_streams_per_client.map(|n| n.to_string()), "off"),
            ),
            ("HANDOFF_TRUSTED_PROXIES", self.trusted_proxies.to_string()),
            ("HANDOFF_RETENTION_SECS", secs(self.retention)),
            ("HANDOFF_JOB_DEADLINE_SECS", secs(self.job_deadline)),
            (
                "HANDOFF_PUBLIC_URL",
                or(self.public_url.as_ref().map(ToString::to_string), "unset"),
            ),
            ("HANDOFF_ADMIN_IDLE_SECS", secs(self.admin_idle)),
            ("HANDOFF_DEMO", if self.demo { "on" } else { "off" }.into()),
            ("HANDOFF_WRITE_QUEUE", self.write_queue.to_string()),
            ("HANDOFF_DB_POOL", self.db_pool.to_string()),
            (
                "HANDOFF_FANOUT_KEY",
                or(
                    self.fanout_key.as_ref().map(|_| SECRET_SET.into()),
                    "derived from HANDOFF_API_TOKEN",
                ),
            ),
        ];
        let webhook = self.webhook.as_ref();
        let off = || "unset: webhooks off".to_owned();
        settings.extend([
            (
                "HANDOFF_WEBHOOK_URL",
                webhook.map_or_else(off, |w| origin_only(w.url.as_str())),
            ),
            (
                "HANDOFF_WEBHOOK_SECRET",
                webhook.map_or_else(off, |_| SECRET_SET.into()),
            ),
            (
                "HANDOFF_UNCLAIMED_SECS",
                webhook.map_or_else(off, |w| secs(w.unclaimed)),
            ),
            (
                "HANDOFF_WEBHOOK_RETRY_MS",
                webhook.map_or_else(off, |w| w.first_retry.as_millis().to_string()),
            ),
            (
                "HANDOFF_WEBHOOK_ATTEMPTS",
                webhook.map_or_else(off, |w| w.attempts.to_string()),
            ),
            (
                "HANDOFF_WEBHOOK_MAX_AGE_SECS",
                webhook.map_or_else(off, |w| secs(w.max_age)),
            ),
        ]);
        settings
    }
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
        let get = |var: &'static str| lookup(var).filter(|v| !v.is_empty());
        let addr = parse(&get, "HANDOFF_ADDR", "127.0.0.1:8080", |v| {
            v.parse::<SocketAddr>().map_err(|e| e.to_string())
        })?;
        let database_url = get("DATABASE_URL").unwrap_or_else(|| "sqlite://data/handoff.db".into());
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres:")
            || database_url.starts_with("postgresql:"))
        {
            return Err(ConfigError {
                var: "DATABASE_URL",
                value: without_password(&database_url),
                reason: "expected a sqlite://… or postgres://… URL".into(),
            });
        }
        let redis_url = get("REDIS_URL");
        if let Some(url) = &redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://"))
        {
            return Err(ConfigError {
                var: "REDIS_URL",
                value: without_password(url),
                reason: "expected a redis://… URL".into(),
            });
        }
        let api_token = api_token(&get)?;
        let fanout_key = fanout_key(&get)?;
        if redis_url.is_some() && api_token.is_none() && fanout_key.is_none() {
            return Err(ConfigError {
                var: "HANDOFF_FANOUT_KEY",
                value: String::new(),
                reason: "REDIS_URL is set, so instances sign the messages between them: set \
                         HANDOFF_FANOUT_KEY, or HANDOFF_API_TOKEN, to the same secret on every \
                         instance (a token generated at start is this instance's alone)"
                    .into(),
            });
        }
        Ok(Self {
            addr,
            database_url,
            redis_url,
            redis_channel: get("HANDOFF_REDIS_CHANNEL")
                .unwrap_or_else(|| "handoff:completions".into()),
            api_token,
            sse_timeout: Duration::from_secs(positive(&get, "HANDOFF_SSE_TIMEOUT_SECS", 60)?),
            sse_retry: Duration::from_millis(positive(&get, "HANDOFF_SSE_RETRY_MS", 1000)?),
            keep_alive: Duration::from_secs(positive(&get, "HANDOFF_KEEPALIVE_SECS", 15)?),
            resync_interval: Duration::from_secs(positive(&get, "HANDOFF_RESYNC_SECS", 30)?),
            workers: optional(&get, "HANDOFF_WORKERS")?,
            max_streams: optional(&get, "HANDOFF_MAX_STREAMS")?,
            max_streams_per_client: streams_per_client(&get)?,
            trusted_proxies: parse(&get, "HANDOFF_TRUSTED_PROXIES", "", TrustedProxies::parse)?,
            retention: Duration::from_secs(positive(
                &get,
                "HANDOFF_RETENTION_SECS",
                7 * 24 * 60 * 60,
            )?),
            job_deadline: Duration::from_secs(positive(&get, "HANDOFF_JOB_DEADLINE_SECS", 3600)?),
            public_url: get("HANDOFF_PUBLIC_URL")
                .map(|raw| {
                    public_url(&raw).map_err(|reason| ConfigError {
                        var: "HANDOFF_PUBLIC_URL",
                        value: without_password(&raw),
                        reason,
                    })
                })
                .transpose()?,
            admin_idle: Duration::from_secs(positive(&get, "HANDOFF_ADMIN_IDLE_SECS", 30 * 60)?),
            demo: parse(&get, "HANDOFF_DEMO", "on", |v| match v {
                "on" => Ok(true),
                "off" => Ok(false),
                _ => Err("expected on or off".into()),
            })?,
            write_queue: usize::try_from(positive(
                &get,
                "HANDOFF_WRITE_QUEUE",
                DEFAULT_WRITE_QUEUE as u64,
            )?)
            .unwrap_or(usize::MAX),
            db_pool: parse(
                &get,
                "HANDOFF_DB_POOL",
                &DEFAULT_DB_POOL.to_string(),
                |v| match v.parse::<u32>() {
                    Ok(n) if (2..=1000).contains(&n) => Ok(n),
                    _ => Err("expected a whole number from 2 to 1000".into()),
                },
            )?,
            fanout_key,
            webhook: webhook(&get)?,
        })
    }
}

/// The webhook settings, when `HANDOFF_WEBHOOK_URL` is set; each of the others is refused
/// without it, so that none is set in the belief that it does something.
fn webhook(
    get: &impl Fn(&'static str) -> Option<String>,
) -> Result<Option<WebhookConfig>, ConfigError> {
    const URL: &str = "HANDOFF_WEBHOOK_URL";
    let Some(raw) = get(URL) else {
        for var in [
            "HANDOFF_WEBHOOK_SECRET",
            "HANDOFF_UNCLAIMED_SECS",
            "HANDOFF_WEBHOOK_RETRY_MS",
            "HANDOFF_WEBHOOK_ATTEMPTS",
            "HANDOFF_WEBHOOK_MAX_AGE_SECS",
        ] {
            if get(var).is_some() {
                return Err(ConfigError {
                    var,
                    value: "(not shown)".into(),
                    reason: format!("it only applies with {URL}, which is not set"),
                });
            }
        }
        return Ok(None);
    };
    let url = webhook_url(&raw).map_err(|reason| ConfigError {
        var: URL,
        value: origin_only(&raw),
        reason,
    })?;
    let Some(secret) = strong_secret(get, "HANDOFF_WEBHOOK_SECRET", "")? else {
        return Err(ConfigError {
            var: "HANDOFF_WEBHOOK_SECRET",
            value: String::new(),
            reason: format!(
                "{URL} is set, so every webhook is signed: set HANDOFF_WEBHOOK_SECRET to a secret \
                 the receiver knows too (e.g. `openssl rand -hex 32`)"
            ),
        });
    };
    let unclaimed = Duration::from_secs(positive(get, "HANDOFF_UNCLAIMED_SECS", 60)?);
    let max_age = Duration::from_secs(positive(get, "HANDOFF_WEBHOOK_MAX_AGE_SECS", 24 * 60 * 60)?);
    // An unclaimed webhook falls due `unclaimed` after the ending; past `max_age` none is sent.
    if max_age <= unclaimed {
        return Err(ConfigError {
            var: "HANDOFF_WEBHOOK_MAX_AGE_SECS",
            value: max_age.as_secs().to_string(),
            reason: format!(
                "must be longer than HANDOFF_UNCLAIMED_SECS ({} s), or no unclaimed webhook is \
                 ever sent",
                unclaimed.as_secs()
            ),
        });
    }
    Ok(Some(WebhookConfig {
        url,
        secret,
        unclaimed,
        first_retry: Duration::from_millis(positive(get, "HANDOFF_WEBHOOK_RETRY_MS", 5000)?),
        attempts: u32::try_from(positive(get, "HANDOFF_WEBHOOK_ATTEMPTS", 12)?).unwrap_or(u32::MAX),
        max_age,
    }))
}

/// `HANDOFF_WEBHOOK_URL`: an `http://` or `https://` URL with a host; the path and query are
/// the receiver's business.
fn webhook_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("expected an https:// URL: {e}"))?;
    if !matches!(url.scheme(), "https" | "http") {
        return Err(format!(
            "expected an https:// (or http://) URL, not {}://: webhooks are HTTP POSTs",
            url.scheme()
        ));
    }
    if !url.has_host() {
        return Err("expected a host in it, e.g. https://app.example.com/hooks/handoff".into());
    }
    if url.fragment().is_some() {
        return Err("expected no #fragment: it is never sent".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "expected no user name or password in it: they would never be sent; sign-in is the \
             Handoff-Signature header"
                .into(),
        );
    }
    Ok(url)
}

/// A webhook URL as logs and listings show it: its scheme, host and port. Its path or query may
/// be the receiver's own secret (many receivers put a token there).
pub fn origin_only(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(url) if url.has_host() => {
            let path = if url.path() == "/" && url.query().is_none() {
                ""
            } else {
                "/…"
            };
            format!("{}{path}", url.origin().ascii_serialization())
        }
        _ => "(not shown)".into(),
    }
}

fn parse<T>(
    get: &impl Fn(&'static str) -> Option<String>,
    var: &'static str,
    default: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<T, ConfigError> {
    let value = get(var).unwrap_or_else(|| default.to_owned());
    parse(&value).map_err(|reason| ConfigError { var, value, reason })
}

/// `HANDOFF_PUBLIC_URL`: the scheme and host browsers use, nothing more.
fn public_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("expected https://host: {e}"))?;
    if !matches!(url.scheme(), "https" | "http") || !url.has_host() {
        return Err("expected https://host (or http://host)".into());
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err("expected the site's origin alone, e.g. https://example.com".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("expected no user name or password in it".into());
    }
    Ok(url)
}

/// A rejected URL as an error message may show it: with its password, in the user part or as a
/// `password=` query parameter, masked; not at all when it has no `scheme://host` to go by and
/// might hold one.
fn without_password(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) if url.has_host() => {
            if url.password().is_some() {
                // Fails only for URLs that cannot carry a password, and this one has one.
                let _ = url.set_password(Some("***"));
            }
            let is_password = |key: &str| key.eq_ignore_ascii_case("password");
            if url.query_pairs().any(|(key, _)| is_password(&key)) {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(key, value)| {
                        let value = if is_password(&key) {
                            "***".into()
                        } else {
                            value
                        };
                        (key.into_owned(), value.into_owned())
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        // A path, say: shown as given.
        _ if !raw.contains('@') && !raw.to_ascii_lowercase().contains("password") => raw.to_owned(),
        _ => "(not shown: it may hold a password)".into(),
    }
}

/// The shortest API token accepted: the token is all that guards completions and the admin page,
/// and a short one can be guessed from many addresses faster than any throttle slows it.
pub const MIN_TOKEN_LEN: usize = 16;
/// The fewest different characters an API token must have. Length alone lets through tokens
/// such as `aaaaaaaaaaaaaaaa` or `1212121212121212`, which are among the first an attacker tries.
pub const MIN_TOKEN_DISTINCT_CHARS: usize = 8;

fn api_token(get: &impl Fn(&'static str) -> Option<String>) -> Result<Option<String>, ConfigError> {
    strong_secret(get, "HANDOFF_API_TOKEN", "; unset it to get a random one")
}

/// A secret that must not be guessable: at least [`MIN_TOKEN_LEN`] characters of which at least
/// [`MIN_TOKEN_DISTINCT_CHARS`] differ. `hint` ends the refusal.
fn strong_secret(
    get: &impl Fn(&'static str) -> Option<String>,
    var: &'static str,
    hint: &str,
) -> Result<Option<String>, ConfigError> {
    let Some(token) = get(var) else {
        return Ok(None);
    };
    let weakness = if token.chars().count() < MIN_TOKEN_LEN {
        format!("must be at least {MIN_TOKEN_LEN} characters")
    } else if distinct_chars(&token) < MIN_TOKEN_DISTINCT_CHARS {
        format!(
            "is too easy to guess: it must use at least {MIN_TOKEN_DISTINCT_CHARS} different \
             characters, not a few repeated"
        )
    } else {
        return Ok(Some(token));
    };
    Err(ConfigError {
        var,
        // Never echo a secret, not even a rejected one.
        value: "(not shown)".into(),
        reason: format!("{weakness}{hint}"),
    })
}

fn distinct_chars(s: &str) -> usize {
    s.chars().collect::<std::collections::HashSet<_>>().len()
}

/// The default cap on streams per client address: a browser needs at most 6 over HTTP/1.1 and one
/// per tab over HTTP/2, so 64 leaves room for a household or a small office behind one address,
/// while one address can no longer take every place on the server.
pub const DEFAULT_STREAMS_PER_CLIENT: usize = 64;

/// `HANDOFF_MAX_STREAMS_PER_CLIENT`: a positive count, or `off` for no per-client cap.
fn streams_per_client(
    get: &impl Fn(&'static str) -> Option<String>,
) -> Result<Option<usize>, ConfigError> {
    const VAR: &str = "HANDOFF_MAX_STREAMS_PER_CLIENT";
    match get(VAR) {
        None => Ok(Some(DEFAULT_STREAMS_PER_CLIENT)),
        Some(v) if v.eq_ignore_ascii_case("off") => Ok(None),
        Some(_) => optional(get, VAR).map_err(|mut err| {
            err.reason = format!("{}, or off for no per-client cap", err.reason);
            err
        }),
    }
}

/// The shortest fan-out key accepted: like the token, it must not be guessable.
const MIN_FANOUT_KEY_LEN: usize = 32;

fn fanout_key(
    get: &impl Fn(&'static str) -> Option<String>,
) -> Result<Option<String>, ConfigError> {
    match get("HANDOFF_FANOUT_KEY") {
        Some(key) if key.chars().count() < MIN_FANOUT_KEY_LEN => Err(ConfigError {
            var: "HANDOFF_FANOUT_KEY",
            value: "(not shown)".into(),
            reason: format!(
                "must be at least {MIN_FANOUT_KEY_LEN} characters (e.g. `openssl rand -base64 32`); \
                 unset it to derive one from HANDOFF_API_TOKEN"
            ),
        }),
        key => Ok(key),
    }
}

/// The largest number any setting takes (about 31 years in seconds).
const MAX_SETTING: u64 = 1_000_000_000;

fn positive(
    get: &impl Fn(&'static str) -> Option<String>,
    var: &'static str,
    default: u64,
) -> Result<u64, ConfigError> {
    parse(get, var, &default.to_string(), |v| match v.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        // Far beyond any sensible setting, and small enough that adding it (as seconds) to a
        // clock reading can never overflow.
        Ok(n) if n > MAX_SETTING => Err(format!("must be at most {MAX_SETTING}")),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number".into()),
    })
}

/// A positive count that has no default: unset means "none".
fn optional(
    get: &impl Fn(&'static str) -> Option<String>,
    var: &'static str,
) -> Result<Option<usize>, ConfigError> {
    match get(var) {
        None => Ok(None),
        Some(_) => Ok(Some(
            usize::try_from(positive(get, var, 1)?).unwrap_or(usize::MAX),
        )),
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
        assert_eq!(config.api_token.as_deref(), Some(fine));
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
        assert_eq!(with(&[]).unwrap().fanout_key, None);
        let err = with(&[("HANDOFF_FANOUT_KEY", "too-short-a-key")]).unwrap_err();
        assert_eq!(err.var, "HANDOFF_FANOUT_KEY");
        assert!(!err.to_string().contains("too-short-a-key"), "{err}");
        let key = "a-fanout-key-of-at-least-32-characters";
        let c = with(&[("HANDOFF_FANOUT_KEY", key)]).unwrap();
        assert!(!format!("{c:?}").contains(key), "{c:?}");
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
    fn redis_without_a_shared_secret_to_sign_its_messages_is_refused() {
        let redis = ("REDIS_URL", "redis://127.0.0.1:6379");
        let err = with(&[redis]).unwrap_err();
        assert_eq!(err.var, "HANDOFF_FANOUT_KEY");
        assert!(err.reason.contains("HANDOFF_API_TOKEN"), "{err}");
        assert!(with(&[redis, ("HANDOFF_API_TOKEN", "a-shared-token-0123")]).is_ok());
        let key = (
            "HANDOFF_FANOUT_KEY",
            "a-fanout-key-of-at-least-32-characters",
        );
        assert!(with(&[redis, key]).is_ok());
    }
}
