//! Who may change jobs: API callers with the token, and admins with a session cookie and a CSRF
//! token. Every secret comparison runs in constant time. Also [`HmacKey`], the one HMAC type
//! (the fan-out's messages and the webhooks are signed with it), and the key that signs the
//! messages between instances when no key of its own is set, derived from the token they share.
//!
//! A session cookie is encrypted and authenticated with a key derived from the token, and says
//! which session it stands for, when it started and when it was last used: it proves nothing once
//! it is older than [`SESSION_MILLIS`] or unused for the idle time. Whether the session is still
//! live (not logged out) is the store's to say; see [`crate::sessions`].

use std::time::Duration;

use actix_web::cookie::{Cookie, CookieJar, Key, SameSite, time::Duration as CookieDuration};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256, Sha512};
use subtle::ConstantTimeEq as _;

/// Name of the admin session cookie.
pub const SESSION_COOKIE: &str = "handoff_admin";
/// How long an admin session lasts at most, however busy.
pub const SESSION_MILLIS: i64 = 8 * 60 * 60 * 1000;

/// An HMAC-SHA256 key, whatever it signs.
#[derive(Clone)]
pub struct HmacKey(Hmac<Sha256>);

impl std::fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HmacKey(..)")
    }
}

impl HmacKey {
    pub fn new(secret: &[u8]) -> Self {
        // HMAC takes a key of any length, so this cannot fail.
        Self(Hmac::new_from_slice(secret).expect("HMAC accepts any key length"))
    }

    /// The tag over `parts`, one after the other.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.0.clone();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag over `parts`, compared in constant time.
    pub fn verifies(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.tag(parts).ct_eq(tag).into()
    }
}

/// The API token and what is derived from it. Instances that share the token share admin sessions.
#[derive(Clone)]
pub struct Secrets {
    token_digest: [u8; 32],
    session_key: Key,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secrets(..)")
    }
}

/// A logged-in admin: which session, the CSRF token every admin form must echo, and its times
/// (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSession {
    /// Random, like the CSRF token; the store knows the live ones by it.
    pub id: String,
    pub csrf: String,
    pub started: i64,
    pub last_used: i64,
}

impl AdminSession {
    /// Constant-time check of a form's CSRF token.
    pub fn csrf_matches(&self, presented: &str) -> bool {
        digest(presented).ct_eq(&digest(&self.csrf)).into()
    }
}

/// The token an `Authorization` header's value presents: `Bearer <token>`.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    authorization.strip_prefix("Bearer ").map(str::trim)
}

/// A fresh random token: 32 bytes, base64url.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The secret that signs the messages between instances when `HANDOFF_FANOUT_KEY` is not set:
/// derived from the API token, which every instance of a deployment shares. Knowing it tells
/// nothing about the token or the session key.
pub fn fanout_secret(api_token: &str) -> [u8; 32] {
    HmacKey::new(api_token.as_bytes()).tag(&[b"handoff fan-out key v1"])
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Secrets {
    pub fn new(api_token: &str) -> Self {
        let mut hasher = Sha512::new();
        hasher.update(b"handoff admin session key v1\0");
        hasher.update(api_token.as_bytes());
        Self {
            token_digest: digest(api_token),
            session_key: Key::from(&hasher.finalize()),
        }
    }

    /// Constant-time comparison (of digests, so the length leaks nothing either).
    pub fn token_matches(&self, presented: &str) -> bool {
        digest(presented).ct_eq(&self.token_digest).into()
    }

    /// The encrypted cookie that stands for `session`; the browser keeps it for `idle`.
    pub fn session_cookie(
        &self,
        session: &AdminSession,
        secure: bool,
        idle: Duration,
    ) -> Cookie<'static> {
        let AdminSession {
            id,
            csrf,
            started,
            last_used,
        } = session;
        // Both tokens are base64url: no `.` in them.
        let value = format!("{id}.{csrf}.{started}.{last_used}");
        let max_age = CookieDuration::try_from(idle).unwrap_or(CookieDuration::MAX);
        let mut jar = CookieJar::new();
        jar.private_mut(&self.session_key)
            .add(session_cookie(value, secure, max_age));
        jar.get(SESSION_COOKIE)
            .cloned()
            .unwrap_or_else(|| Cookie::new(SESSION_COOKIE, ""))
    }

    /// The session a request's [`SESSION_COOKIE`] proves at `now`: authentic, started less than
    /// [`SESSION_MILLIS`] ago and last used less than `idle` ago. Whether it was logged out is
    /// not the cookie's to say.
    pub fn session(
        &self,
        cookie: Option<Cookie<'static>>,
        now: i64,
        idle: Duration,
    ) -> Option<AdminSession> {
        let jar = CookieJar::new();
        let plain = jar.private(&self.session_key).decrypt(cookie?)?;
        let mut parts = plain.value().split('.');
        let (Some(id), Some(csrf), Some(started), Some(last_used), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let session = AdminSession {
            id: id.to_owned(),
            csrf: csrf.to_owned(),
            started: started.parse().ok()?,
            last_used: last_used.parse().ok()?,
        };
        let idle = crate::domain::millis(idle);
        let live = now < session.started.saturating_add(SESSION_MILLIS)
            && now < session.last_used.saturating_add(idle);
        live.then_some(session)
    }
}

/// A fresh session started at `now`.
pub fn new_session(now: i64) -> AdminSession {
    AdminSession {
        id: random_token(),
        csrf: random_token(),
        started: now,
        last_used: now,
    }
}

/// The cookie that ends a session in the browser.
pub fn logout_cookie(secure: bool) -> Cookie<'static> {
    let mut cookie = session_cookie(String::new(), secure, CookieDuration::ZERO);
    cookie.make_removal();
    cookie
}

fn session_cookie(value: String, secure: bool, max_age: CookieDuration) -> Cookie<'static> {
    Cookie::build(SESSION_COOKIE, value)
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(max_age)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_matches() {
        let s = Secrets::new("sesame");
        assert!(s.token_matches("sesame"));
        assert!(!s.token_matches("sesam"));
        assert!(!s.token_matches(""));
        assert_eq!(bearer_token("Bearer sesame"), Some("sesame"));
        assert_eq!(bearer_token("sesame"), None);
        assert_eq!(bearer_token("Basic c2VzYW1l"), None);
    }

    const IDLE: Duration = Duration::from_secs(30 * 60);
    const MINUTE: i64 = 60_000;

    #[test]
    fn a_session_cookie_round_trips_and_a_forged_one_does_not() {
        let s = Secrets::new("sesame");
        let session = new_session(1_000_000);
        let cookie = s.session_cookie(&session, false, IDLE);
        assert!(cookie.http_only().unwrap_or(false));
        assert_eq!(cookie.same_site(), Some(SameSite::Strict));
        assert_eq!(cookie.max_age(), Some(CookieDuration::minutes(30)));
        assert_eq!(
            s.session(Some(cookie.clone()), 1_000_001, IDLE),
            Some(session.clone())
        );
        assert!(session.csrf_matches(&session.csrf.clone()));
        assert!(!session.csrf_matches("nope"));

        let other = Secrets::new("other");
        assert_eq!(other.session(Some(cookie), 1_000_001, IDLE), None);
        let plain = format!("{}.{}.{}.{}", session.id, session.csrf, i64::MAX, i64::MAX);
        let forged = Cookie::new(SESSION_COOKIE, plain);
        assert_eq!(s.session(Some(forged), 1_000_001, IDLE), None);
    }

    #[test]
    fn a_session_ends_after_the_idle_time_unless_used_and_after_eight_hours_regardless() {
        let s = Secrets::new("sesame");
        let start = 1_000_000;
        let mut session = new_session(start);
        let cookie = s.session_cookie(&session, false, IDLE);
        assert!(
            s.session(Some(cookie.clone()), start + 29 * MINUTE, IDLE)
                .is_some()
        );
        assert_eq!(s.session(Some(cookie), start + 30 * MINUTE, IDLE), None);

        // Used every 20 minutes, it lives on, until eight hours after it started.
        session.last_used = start + 7 * 60 * MINUTE + 50 * MINUTE;
        let renewed = s.session_cookie(&session, false, IDLE);
        let almost = start + SESSION_MILLIS - 1;
        assert!(s.session(Some(renewed.clone()), almost, IDLE).is_some());
        assert_eq!(s.session(Some(renewed), almost + 1, IDLE), None);
    }

    /// RFC 4231, test case 2.
    #[test]
    fn an_hmac_key_tags_as_hmac_sha256_does_and_verifies_only_its_own_tag() {
        let key = HmacKey::new(b"Jefe");
        let tag = key.tag(&[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(key.verifies(&[b"what do ya want for nothing?"], &tag));
        assert!(!key.verifies(&[b"what do ya want for nothing!"], &tag));
        assert!(!key.verifies(&[b"what do ya want for nothing?"], &tag[..31]));
        assert!(!HmacKey::new(b"Jeff").verifies(&[b"what do ya want for nothing?"], &tag));
    }

    #[test]
    fn every_instance_with_the_token_derives_the_same_fanout_secret_and_it_is_not_the_token_s() {
        assert_eq!(fanout_secret("sesame"), fanout_secret("sesame"));
        assert_ne!(fanout_secret("sesame"), fanout_secret("sesamf"));
        assert_ne!(fanout_secret("sesame"), digest("sesame"));
    }
}
