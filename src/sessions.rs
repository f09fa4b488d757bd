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

use crate::auth::{self, AdminSession, SESSION_MILLIS};
use crate::domain::now_millis;
use crate::store::{Store, StoreError};

/// The admin session use cases; cheap to clone. What a session looks like to a browser (its
/// cookie) is the HTTP layer's to say, with [`crate::auth`]'s encryption.
#[derive(Debug, Clone)]
pub struct AdminSessions {
    store: Store,
    idle: Duration,
}

impl AdminSessions {
    pub fn new(store: Store, idle: Duration) -> Self {
        Self { store, idle }
    }

    /// How long a session lives unused.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Starts a session (the token was right) and records it.
    pub async fn start(&self) -> Result<AdminSession, StoreError> {
        let session = auth::new_session(now_millis());
        self.store
            .add_admin_session(&session.id, session.started + SESSION_MILLIS)
            .await?;
        Ok(session)
    }

    /// `session`, as a request's cookie proved it, if it is still live, renewed as of now.
    pub async fn check(
        &self,
        mut session: AdminSession,
    ) -> Result<Option<AdminSession>, StoreError> {
        let now = now_millis();
        if !self.store.admin_session_live(&session.id, now).await? {
            return Ok(None);
        }
        session.last_used = now;
        Ok(Some(session))
    }

    /// Ends `session` on every instance.
    pub async fn end(&self, session: &AdminSession) -> Result<(), StoreError> {
        self.store.remove_admin_session(&session.id).await
    }
}
