//! Admin sessions as every instance sees them: started at login, checked and renewed on each admin
//! request, ended at logout, after [`crate::config::Config::admin_idle`] unused, or eight hours
//! after login at the latest.
//!
//! The cookie ([`crate::auth`]) carries the session's id and times, encrypted under a key derived
//! from the API token, so instances that share the token read each other's cookies without asking
//! anyone. Logging out must reach them all, which a cookie alone cannot do: a copy of it would
//! stay valid. So the live sessions are rows in the store (`admin_sessions`), one read per admin
//! request; logging out deletes the row, and on every instance the cookie gets the login page.
//! The idle time rides in the cookie, renewed with each admin request, so a busy admin page
//! costs no write.

use std::time::Duration;

use actix_web::cookie::Cookie;

use crate::auth::{self, AdminSession, SESSION_MILLIS, Secrets};
use crate::domain::now_millis;
use crate::store::{Store, StoreError};

/// A session a request proved, and the renewed cookie its answer should carry.
#[derive(Debug)]
pub struct Checked {
    pub session: AdminSession,
    pub cookie: Cookie<'static>,
}

/// The admin session use cases; cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminSessions {
    secrets: Secrets,
    store: Store,
    idle: Duration,
}

impl AdminSessions {
    pub fn new(secrets: Secrets, store: Store, idle: Duration) -> Self {
        Self {
            secrets,
            store,
            idle,
        }
    }

    /// Starts a session (the token was right): records it, returns its cookie.
    pub async fn start(&self, secure: bool) -> Result<Cookie<'static>, StoreError> {
        let session = auth::new_session(now_millis());
        self.store
            .add_admin_session(&session.id, session.started + SESSION_MILLIS)
            .await?;
        Ok(self.secrets.session_cookie(&session, secure, self.idle))
    }

    /// The live session `cookie` proves, if any, with its cookie renewed as of now.
    pub async fn check(
        &self,
        cookie: Option<Cookie<'static>>,
        secure: bool,
    ) -> Result<Option<Checked>, StoreError> {
        let now = now_millis();
        let Some(mut session) = self.secrets.session(cookie, now, self.idle) else {
            return Ok(None);
        };
        if !self.store.admin_session_live(&session.id, now).await? {
            return Ok(None);
        }
        session.last_used = now;
        let cookie = self.secrets.session_cookie(&session, secure, self.idle);
        Ok(Some(Checked { session, cookie }))
    }

    /// Ends `session` on every instance.
    pub async fn end(&self, session: &AdminSession) -> Result<(), StoreError> {
        self.store.remove_admin_session(&session.id).await
    }
}
