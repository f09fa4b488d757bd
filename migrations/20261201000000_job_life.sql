-- A job's life: pending, then complete, failed or expired; progress reports while pending, and a
-- deadline. SQLite cannot change a CHECK constraint in place, so the table is rebuilt (valid SQL
-- for SQLite and PostgreSQL alike). Jobs stored before this get the default deadline of one hour.
CREATE TABLE jobs_v2 (
    id               TEXT PRIMARY KEY,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'complete', 'failed', 'expired')),
    move_url         TEXT,
    created_at       BIGINT NOT NULL,
    completed_at     BIGINT,
    deadline         BIGINT NOT NULL,
    progress_percent DOUBLE PRECISION,
    progress_message TEXT,
    progress_at      BIGINT,
    message          TEXT
);

INSERT INTO jobs_v2 (id, status, move_url, created_at, completed_at, deadline)
    SELECT id, status, move_url, created_at, completed_at, created_at + 3600000 FROM jobs;

DROP TABLE jobs;

ALTER TABLE jobs_v2 RENAME TO jobs;

CREATE INDEX jobs_created_at ON jobs (created_at);

-- What the expiry sweep looks for, several times a second: only pending jobs are in it.
CREATE INDEX jobs_pending_deadline ON jobs (deadline) WHERE status = 'pending';
