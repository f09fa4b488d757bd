-- Live admin sessions: a session cookie proves something only while its id is here. Logging out
-- deletes the row, so a copied cookie stops working on every instance that shares the database.
-- Times are milliseconds since the Unix epoch; valid SQL for both SQLite and PostgreSQL.
CREATE TABLE admin_sessions (
    id         TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);

CREATE INDEX admin_sessions_expires_at ON admin_sessions (expires_at);
