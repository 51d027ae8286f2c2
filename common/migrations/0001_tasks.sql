-- The one table of Tareas: one row per task_id, whatever how often it was
-- submitted or delivered. Terminal states ('succeeded', 'failed') are never
-- left again.
CREATE TABLE IF NOT EXISTS tasks (
    task_id     text        PRIMARY KEY,
    task_type   text        NOT NULL,
    payload     jsonb       NOT NULL,
    state       text        NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed')),
    result      jsonb,
    error       text,
    worker_id   text,
    attempts    integer     NOT NULL DEFAULT 0,
    duration_ms bigint,
    created_at  timestamptz NOT NULL DEFAULT now(),
    started_at  timestamptz,
    finished_at timestamptz
);

CREATE INDEX IF NOT EXISTS tasks_state_idx ON tasks (state) WHERE state IN ('queued', 'running');
