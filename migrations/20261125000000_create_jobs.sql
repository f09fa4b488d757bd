-- One table, valid SQL for both SQLite and PostgreSQL. Times are milliseconds since the Unix epoch.
CREATE TABLE IF NOT EXISTS jobs (
    id           TEXT PRIMARY KEY,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'complete')),
    move_url     TEXT,
    created_at   BIGINT NOT NULL,
    completed_at BIGINT
);

CREATE INDEX IF NOT EXISTS jobs_created_at ON jobs (created_at);
