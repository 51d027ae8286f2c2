-- Workers record themselves (docs/operations.md): a row per worker id,
-- renewed every few seconds; one not seen for 30 s is shown as gone, and
-- rows of workers gone for a day are removed.
CREATE TABLE IF NOT EXISTS workers (
    worker_id   text        PRIMARY KEY,
    host        text        NOT NULL,
    started_at  timestamptz NOT NULL,
    concurrency integer     NOT NULL,
    last_seen   timestamptz NOT NULL,
    done        bigint      NOT NULL DEFAULT 0,
    failed      bigint      NOT NULL DEFAULT 0,
    busy        integer     NOT NULL DEFAULT 0
);
-- The dashboard's throughput chart reads recent finishes.
CREATE INDEX IF NOT EXISTS tasks_finished_idx ON tasks (finished_at) WHERE finished_at IS NOT NULL;
