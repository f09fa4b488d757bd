//! Who may change jobs: job runners with one of the named API tokens, and admins with a session
//! cookie and a CSRF token, who logged in with the admin password (an argon2id hash), or, while
//! none is set, with an API token. Every token comparison runs in constant time. Also the keys
//! derived from the deployment's root secret, one per purpose: the session cookie's and the one
//! that signs the messages between instances when no key of its own is set.
//! [`HmacKey`] is the one HMAC type: the fan-out's messages, the webhooks and the derived keys.
//!
//! A session cookie is encrypted and authenticated with the derived key, and says which session
//! it stands for, when it started and when it was last used: it proves nothing once it is older
//! than [`SESSION_MILLIS`] or unused for the idle time. Whether the session is still live (not
//! logged out) is the store's to say; see [`crate::sessions`].

use std::sync::Arc;
use std::time::Duration;

use actix_web::cookie::{Cookie, CookieJar, Key, SameSite, time::Duration as CookieDuration};
use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::Semaphore;

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

/// Password checks that may run at once. An argon2id check with the default costs takes 19 MiB
/// and tens of milliseconds of one core: a flood of logins waits its turn instead of taking the
/// machine's memory.
const PASSWORD_CHECKS_AT_ONCE: usize = 2;

/// The API tokens by name, the admin password and the session key. Instances with the same root
/// secret share admin sessions, whatever their tokens.
#[derive(Clone)]
pub struct Secrets {
    /// Each token's name and the digest of the token.
    tokens: Vec<(String, [u8; 32])>,
    admin: Option<AdminPassword>,
    session_key: Key,
}

/// The admin password's PHC hash, and the permits its checks take.
#[derive(Clone)]
struct AdminPassword {
    phc: Arc<str>,
    checks: Arc<Semaphore>,
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

/// The key for `purpose`, derived from the deployment's root secret (`HANDOFF_SECRET_KEY`, or
/// `HANDOFF_API_TOKEN`): HMAC-SHA256 keyed by the root, over the purpose's label. Knowing one
/// purpose's key tells nothing about the root or another purpose's key.
fn purpose_key(root: &[u8], purpose: &str) -> [u8; 32] {
    HmacKey::new(root).tag(&[purpose.as_bytes()])
}

/// The secret that signs the messages between instances when `HANDOFF_FANOUT_KEY` is not set.
/// Its label is the one it had when it was derived from the API token, so a root secret equal to
/// the old token keeps it.
pub fn fanout_secret(root: &[u8]) -> [u8; 32] {
    purpose_key(root, "handoff fan-out key v1")
}

/// The argon2id hash of `password` in PHC format, with argon2's default costs and a random salt.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt)?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Whether `password` is the one `phc` (an argon2 PHC string) is the hash of, with the costs the
/// hash names. Takes tens of milliseconds: call it off the async runtime.
pub fn verify_password(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc)
        .and_then(|hash| Argon2::default().verify_password(password.as_bytes(), &hash))
        .is_ok()
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Secrets {
    /// `tokens` by name; `admin_password_hash` (PHC) when the admin has a password of its own;
    /// the keys derived from `root`.
    pub fn new<'a>(
        tokens: impl IntoIterator<Item = (&'a str, &'a str)>,
        admin_password_hash: Option<&str>,
        root: &[u8],
    ) -> Self {
        let mut session_key = [0u8; 64];
        for (half, purpose) in session_key.chunks_mut(32).zip([
            "handoff admin session key v2 a",
            "handoff admin session key v2 b",
        ]) {
            half.copy_from_slice(&purpose_key(root, purpose));
        }
        Self {
            tokens: tokens
                .into_iter()
                .map(|(name, token)| (name.to_owned(), digest(token)))
                .collect(),
            admin: admin_password_hash.map(|phc| AdminPassword {
                phc: phc.into(),
                checks: Arc::new(Semaphore::new(PASSWORD_CHECKS_AT_ONCE)),
            }),
            session_key: Key::from(&session_key),
        }
    }

    /// The name of the API token `presented` is, if any. Every token is compared, in constant
    /// time (of digests, so the length leaks nothing either), whichever matches.
    pub fn token_name(&self, presented: &str) -> Option<&str> {
        let presented = digest(presented);
        let mut found = None;
        for (name, token) in &self.tokens {
            if bool::from(presented.ct_eq(token)) {
                found = Some(name.as_str());
            }
        }
        found
    }

    /// Whether the admin has a password of its own (`HANDOFF_ADMIN_PASSWORD_HASH`); without one,
    /// any API token logs in.
    pub fn has_admin_password(&self) -> bool {
        self.admin.is_some()
    }

    /// Whether `presented` opens `/admin`: the admin password when there is one, else any API
    /// token. A password check runs on the blocking pool, [`PASSWORD_CHECKS_AT_ONCE`] at most.
    pub async fn admin_login_matches(&self, presented: &str) -> bool {
        let Some(admin) = &self.admin else {
            return self.token_name(presented).is_some();
        };
        // The semaphore is never closed.
        let Ok(_permit) = admin.checks.acquire().await else {
            return false;
        };
        let (phc, presented) = (admin.phc.clone(), presented.to_owned());
        tokio::task::spawn_blocking(move || verify_password(&phc, &presented))
            .await
            .unwrap_or(false)
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

    fn secrets(root: &str) -> Secrets {
        Secrets::new([("default", "sesame")], None, root.as_bytes())
    }

    #[test]
    fn only_an_exact_token_matches_and_it_is_known_by_its_name() {
        let s = Secrets::new(
            [("ci", "sesame-ci"), ("deploy", "sesame-deploy")],
            None,
            b"root",
        );
        assert_eq!(s.token_name("sesame-ci"), Some("ci"));
        assert_eq!(s.token_name("sesame-deploy"), Some("deploy"));
        assert_eq!(s.token_name("sesame-c"), None);
        assert_eq!(s.token_name(""), None);
        assert_eq!(bearer_token("Bearer sesame"), Some("sesame"));
        assert_eq!(bearer_token("sesame"), None);
        assert_eq!(bearer_token("Basic c2VzYW1l"), None);
    }

    #[tokio::test]
    async fn with_an_admin_password_only_the_password_logs_in() {
        let phc = hash_password("correct horse battery").unwrap();
        assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
        let tokens = [("default", "sesame-token")];
        let with = Secrets::new(tokens, Some(&phc), b"root");
        assert!(with.admin_login_matches("correct horse battery").await);
        assert!(!with.admin_login_matches("sesame-token").await);
        assert!(!with.admin_login_matches("correct horse batter").await);
        assert_eq!(with.token_name("sesame-token"), Some("default"));
        let without = Secrets::new(tokens, None, b"root");
        assert!(without.admin_login_matches("sesame-token").await);
        assert!(!without.admin_login_matches("correct horse battery").await);
    }

    const IDLE: Duration = Duration::from_secs(30 * 60);
    const MINUTE: i64 = 60_000;

    #[test]
    fn a_session_cookie_round_trips_and_a_forged_one_does_not() {
        let s = secrets("root");
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

        let rotated = Secrets::new([("new-runner", "another-token")], None, b"root");
        assert_eq!(
            rotated.session(Some(cookie.clone()), 1_000_001, IDLE),
            Some(session.clone()),
            "the same root secret with other tokens opens the cookie"
        );
        let other = secrets("other");
        assert_eq!(other.session(Some(cookie), 1_000_001, IDLE), None);
        let plain = format!("{}.{}.{}.{}", session.id, session.csrf, i64::MAX, i64::MAX);
        let forged = Cookie::new(SESSION_COOKIE, plain);
        assert_eq!(s.session(Some(forged), 1_000_001, IDLE), None);
    }

    #[test]
    fn a_session_ends_after_the_idle_time_unless_used_and_after_eight_hours_regardless() {
        let s = secrets("root");
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
    fn every_instance_with_the_root_derives_the_same_fanout_secret_and_it_is_not_the_root_s() {
        assert_eq!(fanout_secret(b"sesame"), fanout_secret(b"sesame"));
        assert_ne!(fanout_secret(b"sesame"), fanout_secret(b"sesamf"));
        assert_ne!(fanout_secret(b"sesame"), digest("sesame"));
        // The derivation it had from the API token, so that such a root keeps it on upgrade.
        let mut old = Hmac::<Sha256>::new_from_slice(b"sesame").unwrap();
        old.update(b"handoff fan-out key v1");
        assert_eq!(
            fanout_secret(b"sesame"),
            <[u8; 32]>::from(old.finalize().into_bytes())
        );
        let keys = [
            fanout_secret(b"sesame"),
            purpose_key(b"sesame", "handoff admin session key v2 a"),
            purpose_key(b"sesame", "handoff admin session key v2 b"),
        ];
        assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2]);
    }
}
