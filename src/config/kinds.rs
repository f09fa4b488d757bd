//! The kinds of value a setting takes: how its text is checked and parsed, how `check-config`
//! shows the value, and how a rejected text is shown in the error (masked when it may hold a
//! secret).

use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};

/// How a secret shows in `check-config`'s listing: whether it is set, never what it is.
pub const SECRET_SET: &str = "(set, not shown)";

/// How one kind of setting reads its text into a `T`, and shows it again.
pub trait Kind<T> {
    fn parse(&self, raw: &str) -> Result<T, String>;
    /// The value as `check-config` lists it.
    fn show(&self, value: &T) -> String;
    /// A rejected text as the error shows it.
    fn mask(&self, raw: &str) -> String {
        raw.into()
    }
}

/// Any type with `FromStr` and `Display`, shown as it was given.
pub struct Parsed;

impl<T: FromStr + Display> Kind<T> for Parsed
where
    T::Err: Display,
{
    fn parse(&self, raw: &str) -> Result<T, String> {
        raw.parse().map_err(|e: T::Err| e.to_string())
    }
    fn show(&self, value: &T) -> String {
        value.to_string()
    }
}

/// Checked by a function of its own, shown by `Display`.
pub struct With<T>(pub fn(&str) -> Result<T, String>);

impl<T: Display> Kind<T> for With<T> {
    fn parse(&self, raw: &str) -> Result<T, String> {
        (self.0)(raw)
    }
    fn show(&self, value: &T) -> String {
        value.to_string()
    }
}

/// The largest number any setting takes (about 31 years in seconds).
const MAX_SETTING: u64 = 1_000_000_000;

fn positive(raw: &str) -> Result<u64, String> {
    match raw.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        // Far beyond any sensible setting, and small enough that adding it (as seconds) to a
        // clock reading can never overflow.
        Ok(n) if n > MAX_SETTING => Err(format!("must be at most {MAX_SETTING}")),
        Ok(n) => Ok(n),
        Err(_) => Err("expected a whole number".into()),
    }
}

/// A positive whole number.
pub struct Count;

impl<T: TryFrom<u64> + Display> Kind<T> for Count {
    fn parse(&self, raw: &str) -> Result<T, String> {
        T::try_from(positive(raw)?).map_err(|_| "too large for this machine".into())
    }
    fn show(&self, value: &T) -> String {
        value.to_string()
    }
}

/// A positive count, or `off` for no cap at all.
pub struct CountOrOff;

impl Kind<Option<usize>> for CountOrOff {
    fn parse(&self, raw: &str) -> Result<Option<usize>, String> {
        if raw.eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        Kind::<usize>::parse(&Count, raw)
            .map(Some)
            .map_err(|reason| format!("{reason}, or off for no per-client cap"))
    }
    fn show(&self, value: &Option<usize>) -> String {
        value.map_or_else(|| "off".into(), |n| n.to_string())
    }
}

/// A whole number from `.0` to `.1`.
pub struct Between(pub u32, pub u32);

impl Kind<u32> for Between {
    fn parse(&self, raw: &str) -> Result<u32, String> {
        match raw.parse::<u32>() {
            Ok(n) if (self.0..=self.1).contains(&n) => Ok(n),
            _ => Err(format!(
                "expected a whole number from {} to {}",
                self.0, self.1
            )),
        }
    }
    fn show(&self, value: &u32) -> String {
        value.to_string()
    }
}

/// A positive duration, in the unit its variable's name ends with.
#[derive(Clone, Copy)]
pub enum Unit {
    Secs,
    Millis,
}

impl Kind<Duration> for Unit {
    fn parse(&self, raw: &str) -> Result<Duration, String> {
        let n = positive(raw)?;
        Ok(match self {
            Unit::Secs => Duration::from_secs(n),
            Unit::Millis => Duration::from_millis(n),
        })
    }
    fn show(&self, value: &Duration) -> String {
        match self {
            Unit::Secs => value.as_secs().to_string(),
            Unit::Millis => value.as_millis().to_string(),
        }
    }
}

/// `on` or `off`.
pub struct OnOff;

impl Kind<bool> for OnOff {
    fn parse(&self, raw: &str) -> Result<bool, String> {
        match raw {
            "on" => Ok(true),
            "off" => Ok(false),
            _ => Err("expected on or off".into()),
        }
    }
    fn show(&self, value: &bool) -> String {
        if *value { "on" } else { "off" }.into()
    }
}

/// A URL, checked by `check`, and only ever shown as `mask` shows it: it may hold a password,
/// and a webhook's path or query may be its receiver's secret.
pub struct Link<T> {
    check: fn(&str) -> Result<T, String>,
    mask: fn(&str) -> String,
}

impl<T: AsRef<str>> Kind<T> for Link<T> {
    fn parse(&self, raw: &str) -> Result<T, String> {
        (self.check)(raw)
    }
    fn show(&self, value: &T) -> String {
        (self.mask)(value.as_ref())
    }
    fn mask(&self, raw: &str) -> String {
        (self.mask)(raw)
    }
}

impl Link<String> {
    pub const DATABASE: Self = Self {
        check: |raw| {
            scheme(raw, &["sqlite:", "postgres:", "postgresql:"])
                .ok_or_else(|| "expected a sqlite://… or postgres://… URL".into())
        },
        mask: without_password,
    };
    pub const REDIS: Self = Self {
        check: |raw| {
            scheme(raw, &["redis://", "rediss://"]).ok_or_else(|| "expected a redis://… URL".into())
        },
        mask: without_password,
    };
}

impl Link<url::Url> {
    /// `HANDOFF_PUBLIC_URL`: the scheme and host browsers use, nothing more.
    pub const ORIGIN: Self = Self {
        check: public_url,
        mask: without_password,
    };
    /// `HANDOFF_WEBHOOK_URL`: the path and query are the receiver's business.
    pub const WEBHOOK: Self = Self {
        check: webhook_url,
        mask: origin_only,
    };
}

/// `raw` when it starts with one of `schemes`.
fn scheme(raw: &str, schemes: &[&str]) -> Option<String> {
    schemes
        .iter()
        .any(|scheme| raw.starts_with(scheme))
        .then(|| raw.into())
}

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

/// An `http://` or `https://` URL with a host.
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

/// The shortest API token accepted: the token is all that guards completions and the admin page,
/// and a short one can be guessed from many addresses faster than any throttle slows it.
pub const MIN_TOKEN_LEN: usize = 16;
/// The fewest different characters an API token must have. Length alone lets through tokens
/// such as `aaaaaaaaaaaaaaaa` or `1212121212121212`, which are among the first an attacker tries.
pub const MIN_TOKEN_DISTINCT_CHARS: usize = 8;

/// A secret that must not be guessable; never shown, not even when it is refused.
pub struct Secret {
    pub min_len: usize,
    pub min_distinct: usize,
    /// Ends the refusal: how to make a good one, or what unsetting it does.
    pub advice: &'static str,
}

/// The API token's rule, which the webhook secret follows too.
pub const STRONG: Secret = Secret {
    min_len: MIN_TOKEN_LEN,
    min_distinct: MIN_TOKEN_DISTINCT_CHARS,
    advice: "",
};

impl Kind<SecretString> for Secret {
    fn parse(&self, raw: &str) -> Result<SecretString, String> {
        let distinct = raw.chars().collect::<std::collections::HashSet<_>>().len();
        let weakness = if raw.chars().count() < self.min_len {
            format!("must be at least {} characters", self.min_len)
        } else if distinct < self.min_distinct {
            format!(
                "is too easy to guess: it must use at least {} different characters, not a few \
                 repeated",
                self.min_distinct
            )
        } else {
            return Ok(raw.into());
        };
        Err(format!("{weakness}{}", self.advice))
    }
    fn show(&self, _: &SecretString) -> String {
        SECRET_SET.into()
    }
    fn mask(&self, _: &str) -> String {
        "(not shown)".into()
    }
}

/// Job runners' bearer tokens by name (`HANDOFF_API_TOKENS`), in the order given.
#[derive(Clone)]
pub struct NamedTokens(pub Vec<(String, SecretString)>);

/// The longest token name: it is a label in `/metrics` and a word in the log.
const MAX_TOKEN_NAME: usize = 32;

/// `name:token,name2:token2`: each name of `a-z`, `0-9`, `_` and `-`, used once; each token
/// under [`STRONG`]'s rule. Listed by names only; a refusal names the entry, never its token.
pub struct TokenList;

impl Kind<NamedTokens> for TokenList {
    fn parse(&self, raw: &str) -> Result<NamedTokens, String> {
        let mut tokens: Vec<(String, SecretString)> = Vec::new();
        for (n, entry) in raw.split(',').map(str::trim).enumerate() {
            let Some((name, token)) = entry.split_once(':') else {
                return Err(format!(
                    "entry {} is not name:token (e.g. runner-a:TOKEN,runner-b:TOKEN2)",
                    n + 1
                ));
            };
            let name = name.trim();
            if name.is_empty()
                || name.len() > MAX_TOKEN_NAME
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                return Err(format!(
                    "entry {}: a token's name is 1 to {MAX_TOKEN_NAME} of a-z, 0-9, _ and -",
                    n + 1
                ));
            }
            if tokens.iter().any(|(seen, _)| seen == name) {
                return Err(format!("the name {name} is given twice"));
            }
            let token = STRONG
                .parse(token.trim())
                .map_err(|weakness| format!("the token of {name} {weakness}"))?;
            if tokens
                .iter()
                .any(|(_, seen)| seen.expose_secret() == token.expose_secret())
            {
                return Err(format!("the token of {name} is given twice"));
            }
            tokens.push((name.to_owned(), token));
        }
        Ok(NamedTokens(tokens))
    }
    fn show(&self, value: &NamedTokens) -> String {
        let names: Vec<&str> = value.0.iter().map(|(name, _)| name.as_str()).collect();
        format!("{} (tokens not shown)", names.join(", "))
    }
    fn mask(&self, _: &str) -> String {
        "(not shown)".into()
    }
}

/// An argon2id hash in PHC format (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`), as
/// `handoff hash-password` prints it. Not shown: it allows guessing the password offline.
pub struct PhcHash;

impl Kind<SecretString> for PhcHash {
    fn parse(&self, raw: &str) -> Result<SecretString, String> {
        let hash = argon2::PasswordHash::new(raw).map_err(|err| {
            format!("expected an argon2id hash in PHC format, as `handoff hash-password` prints it: {err}")
        })?;
        if hash.algorithm.as_str() != "argon2id" || hash.hash.is_none() {
            return Err(
                "expected an argon2id hash ($argon2id$…), as `handoff hash-password` prints it"
                    .into(),
            );
        }
        argon2::Params::try_from(&hash)
            .map_err(|err| format!("its argon2 parameters are invalid: {err}"))?;
        Ok(raw.into())
    }
    fn show(&self, _: &SecretString) -> String {
        SECRET_SET.into()
    }
    fn mask(&self, _: &str) -> String {
        "(not shown)".into()
    }
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

/// A URL as a listing or an error message may show it: with its password, in the user part or
/// as a `password=` query parameter, masked; not at all when it has no `scheme://host` to go by
/// and might hold one.
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
