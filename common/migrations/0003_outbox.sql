-- The outbox relay (docs/reliability.md): a submission's row is written
-- before its publish; `published_at` records RabbitMQ's confirm, `owner` the
-- distribuidor that wrote it. A `queued` row with no confirmed publish whose
-- owner is gone (no heartbeat in `distribuidores`) or that is long past the
-- confirm timeout is published again by a relay. Rows from before the
-- relay stay NULL: a queued one is published again once (harmless, a task
-- runs once whatever how often it is delivered).
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS published_at timestamptz;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS owner text;
CREATE INDEX IF NOT EXISTS tasks_unpublished_idx ON tasks (queue, created_at)
    WHERE state = 'queued' AND published_at IS NULL;
CREATE TABLE IF NOT EXISTS distribuidores (
    instance text        PRIMARY KEY,
    seen_at  timestamptz NOT NULL
);
