-- Result retention (TAREAS_RESULT_TTL, docs/operations.md): finished tasks
-- older than the TTL are removed in batches; each removed task leaves a
-- tombstone for one more TTL, so its status answers `expired`, not `unknown`.
CREATE TABLE IF NOT EXISTS expired_tasks (
    task_id    text        PRIMARY KEY,
    expired_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS expired_tasks_at_idx ON expired_tasks (expired_at);
CREATE INDEX IF NOT EXISTS tasks_retention_idx ON tasks (queue, finished_at)
    WHERE state IN ('succeeded', 'failed');
