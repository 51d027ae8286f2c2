-- The HTTP API (docs/architecture.md). A row that becomes terminal sends a
-- notification on the channel `tareas_finished` with the task's key, so a
-- `GET /tasks/<id>?wait=` on any distribuidor answers as soon as the task
-- finishes, whichever distribuidor accepted it. Listings run newest first.
CREATE OR REPLACE FUNCTION tareas_notify_finished() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('tareas_finished', NEW.task_id);
    RETURN NULL;
END
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS tasks_finished_notify ON tasks;
CREATE TRIGGER tasks_finished_notify AFTER UPDATE OF state ON tasks
    FOR EACH ROW
    WHEN (NEW.state IN ('succeeded', 'failed') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION tareas_notify_finished();
CREATE INDEX IF NOT EXISTS tasks_created_idx ON tasks (created_at DESC, task_id DESC);
