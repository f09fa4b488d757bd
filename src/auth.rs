//! Who may change jobs: API callers with the token, and admins with a session cookie and a CSRF
//! token. Every secret comparison runs in constant time. Also the key that signs the messages
//! between instances when no key of its own is set, derived from the token they share.

use actix_web::cookie::{Cookie, CookieJar, Key, SameSite, time::Duration as CookieDuration};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256, Sha512};
use subtle::ConstantTimeEq as _;

use crate::domain::now_millis;

/// Name of the admin session cookie.
pub const SESSION_COOKIE: &str = "handoff_admin";
/// How long an admin session lasts.
const SESSION_MILLIS: i64 = 8 * 60 * 60 * 1000;

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

/// A logged-in admin; holds the CSRF token every admin form must echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSession {
    pub csrf: String,
}

impl AdminSession {
    /// Constant-time check of a form's CSRF token.
    pub fn csrf_matches(&self, presented: &str) -> bool {
        digest(presented).ct_eq(&digest(&self.csrf)).into()
    }
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
    // HMAC takes a key of any length, so this cannot fail.
    let mut mac =
        Hmac::<Sha256>::new_from_slice(api_token.as_bytes()).expect("HMAC accepts any key length");
    mac.update(b"handoff fan-out key v1");
    mac.finalize().into_bytes().into()
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

    /// Whether an `Authorization` header's value is `Bearer <the token>`.
    pub fn bearer_ok(&self, authorization: Option<&str>) -> bool {
        authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|token| self.token_matches(token.trim()))
    }

    /// A new session: the encrypted cookie to set and the session it stands for.
    pub fn start_session(&self, secure: bool) -> (Cookie<'static>, AdminSession) {
        let session = AdminSession {
            csrf: random_token(),
        };
        let value = format!("{}.{}", session.csrf, now_millis() + SESSION_MILLIS);
        let mut jar = CookieJar::new();
        jar.private_mut(&self.session_key)
            .add(session_cookie(value, secure));
        let cookie = jar
            .get(SESSION_COOKIE)
            .cloned()
            .unwrap_or_else(|| Cookie::new(SESSION_COOKIE, ""));
        (cookie, session)
    }

    /// The session a request's [`SESSION_COOKIE`] proves, if it is authentic and not expired.
    pub fn session(&self, cookie: Option<Cookie<'static>>) -> Option<AdminSession> {
        let jar = CookieJar::new();
        let plain = jar.private(&self.session_key).decrypt(cookie?)?;
        let (csrf, expires) = plain.value().split_once('.')?;
        let expires: i64 = expires.parse().ok()?;
        (expires > now_millis()).then(|| AdminSession {
            csrf: csrf.to_owned(),
        })
    }
}

/// The cookie that ends a session.
pub fn logout_cookie(secure: bool) -> Cookie<'static> {
    let mut cookie = session_cookie(String::new(), secure);
    cookie.make_removal();
    cookie
}

fn session_cookie(value: String, secure: bool) -> Cookie<'static> {
    Cookie::build(SESSION_COOKIE, value)
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(CookieDuration::milliseconds(SESSION_MILLIS))
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
        assert!(s.bearer_ok(Some("Bearer sesame")));
        assert!(!s.bearer_ok(Some("sesame")));
        assert!(!s.bearer_ok(None));
    }

    #[test]
    fn a_session_cookie_round_trips_and_a_forged_one_does_not() {
        let s = Secrets::new("sesame");
        let (cookie, session) = s.start_session(false);
        assert!(cookie.http_only().unwrap_or(false));
        assert_eq!(cookie.same_site(), Some(SameSite::Strict));
        assert_eq!(s.session(Some(cookie.clone())), Some(session.clone()));
        assert!(session.csrf_matches(&session.csrf.clone()));
        assert!(!session.csrf_matches("nope"));

        let other = Secrets::new("other");
        assert_eq!(other.session(Some(cookie)), None);
        let forged = Cookie::new(SESSION_COOKIE, format!("{}.{}", session.csrf, i64::MAX));
        assert_eq!(s.session(Some(forged)), None);
    }

    #[test]
    fn every_instance_with_the_token_derives_the_same_fanout_secret_and_it_is_not_the_token_s() {
        assert_eq!(fanout_secret("sesame"), fanout_secret("sesame"));
        assert_ne!(fanout_secret("sesame"), fanout_secret("sesamf"));
        assert_ne!(fanout_secret("sesame"), digest("sesame"));
    }
}
