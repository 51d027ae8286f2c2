-- Who submitted a task and to which work queue, for the per-client quota
-- (TAREAS_MAX_OUTSTANDING_PER_CLIENT): it counts a client's tasks of one
-- queue that are queued or running. Rows from before stay NULL: no client.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS client text;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS queue text;
CREATE INDEX IF NOT EXISTS tasks_outstanding_by_client_idx ON tasks (client, queue)
    WHERE state IN ('queued', 'running');
