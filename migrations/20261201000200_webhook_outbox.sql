-- The webhook outbox: one row per job that ended while HANDOFF_WEBHOOK_URL was set, written in the
-- same transaction as the ending, so no restart loses a webhook. `id` is the job's id (a job
-- ends once, so it has at most one webhook). Valid SQL for SQLite and PostgreSQL; times are
-- milliseconds since the Unix epoch.
--
-- state: `waiting` (no stream has taken the ending yet; sent as `unclaimed` when due),
-- `delivered` (streams took it; sent as `delivered` when due), then `sent` or `dead` (gave up).
-- An instance claims a due row with a conditional update that sets `claimed_until` (a lease)
-- and counts the attempt, so of several instances one sends it, and a crashed claimer's row is
-- claimed again once its lease has run out.
CREATE TABLE webhooks (
    id            TEXT PRIMARY KEY,
    status        TEXT NOT NULL CHECK (status IN ('complete', 'failed', 'expired')),
    state         TEXT NOT NULL CHECK (state IN ('waiting', 'delivered', 'sent', 'dead')),
    streams       BIGINT NOT NULL DEFAULT 0,
    ended_at      BIGINT NOT NULL,
    delivered_at  BIGINT,
    due_at        BIGINT NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    claimed_until BIGINT,
    last_error    TEXT,
    settled_at    BIGINT
);

-- What the sender looks for, twice a second: only rows still to send are in it.
CREATE INDEX webhooks_due ON webhooks (due_at) WHERE state IN ('waiting', 'delivered');

-- What the purge looks for.
CREATE INDEX webhooks_ended_at ON webhooks (ended_at);
