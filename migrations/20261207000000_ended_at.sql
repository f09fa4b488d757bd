-- The moment a job ended, whichever way (complete, failed, expired), as the webhook outbox
-- already calls it. The API still shows it as completedAt too, for clients written before.
ALTER TABLE jobs RENAME COLUMN completed_at TO ended_at;
