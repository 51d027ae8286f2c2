//! Result retention: finished tasks of one work queue older than the TTL
//! are removed, their S3 objects first, a batch at a time, by one process
//! at a time (a transaction-scoped advisory lock); each leaves a tombstone
//! for one more TTL so that its status answers `expired`.

use std::future::Future;
use std::time::Duration;

use super::{Db, DbError};

/// Key of the advisory lock one retention pass holds.
const RETENTION_LOCK: i64 = 0x7461_7265_6174;

impl Db {
    /// Removes up to `limit` tasks of `queue` finished more than `ttl`
    /// ago: `remove_objects` gets their keys first (their S3 objects), then
    /// their rows go and tombstones are written. `None`: another process
    /// holds the retention lock. Never touches a task that is not terminal.
    pub async fn expire_batch<F, Fut, E>(
        &self,
        queue: &str,
        ttl: Duration,
        limit: i64,
        remove_objects: F,
    ) -> Result<Option<Result<usize, E>>, DbError>
    where
        F: FnOnce(Vec<String>) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let mut connection = self.pool.get().await?;
        let tx = connection.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK])
            .await?
            .try_get(0)?;
        if !locked {
            return Ok(None);
        }
        let ttl_secs = ttl.as_secs_f64();
        let rows = tx
            .query(
                "SELECT task_id FROM tasks
                 WHERE queue = $1 AND state IN ('succeeded', 'failed')
                   AND finished_at < now() - make_interval(secs => $2)
                 ORDER BY finished_at LIMIT $3 FOR UPDATE SKIP LOCKED",
                &[&queue, &ttl_secs, &limit],
            )
            .await?;
        let keys: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
        if keys.is_empty() {
            return Ok(Some(Ok(0)));
        }
        if let Err(err) = remove_objects(keys.clone()).await {
            return Ok(Some(Err(err)));
        }
        tx.execute(
            "DELETE FROM tasks WHERE task_id = ANY($1) AND state IN ('succeeded', 'failed')",
            &[&keys],
        )
        .await?;
        tx.execute(
            "INSERT INTO expired_tasks (task_id) SELECT unnest($1::text[])
             ON CONFLICT (task_id) DO UPDATE SET expired_at = now()",
            &[&keys],
        )
        .await?;
        tx.execute(
            "DELETE FROM expired_tasks WHERE expired_at < now() - make_interval(secs => $1)",
            &[&ttl_secs],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(Ok(keys.len())))
    }

    /// Whether task `key` was removed by retention (within one more TTL).
    pub async fn is_expired(&self, key: &str) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt("SELECT 1 FROM expired_tasks WHERE task_id = $1", &[&key])
            .await?;
        Ok(row.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{test_db, test_task, Finish, Origin, Submission};
    use super::*;
    use crate::task::TaskState;

    #[tokio::test]
    async fn only_finished_tasks_past_the_ttl_expire_and_leave_a_tombstone() {
        let db = test_db().await;
        let queue = format!("retention-{}", uuid::Uuid::new_v4());
        let origin = Origin {
            client: "test".into(),
            queue: queue.clone(),
            owner: "test".into(),
        };
        let (old, fresh, queued) = (test_task("echo"), test_task("echo"), test_task("echo"));
        for task in [&old, &fresh, &queued] {
            let recorded = db
                .insert_queued_from(task, origin.clone())
                .await
                .expect("insert");
            assert!(matches!(recorded, Submission::New(_)));
        }
        for task in [&old, &fresh] {
            db.claim(task, "w1", false).await.expect("claim");
            let finish = Finish {
                task_id: task.task_id.to_string(),
                state: TaskState::Succeeded,
                result: None,
                error: None,
                worker_id: "w1".into(),
                duration_ms: 1,
            };
            db.finish(finish).await.expect("finish");
        }
        let client = db.pool.get().await.expect("connection");
        let aged = "UPDATE tasks SET finished_at = now() - interval '1 hour', created_at = now() - interval '1 hour' WHERE task_id = ANY($1)";
        let ids = [old.task_id.as_str(), queued.task_id.as_str()];
        client.execute(aged, &[&&ids[..]]).await.expect("age");
        let expected = vec![old.task_id.to_string()];
        let removed = db
            .expire_batch(&queue, Duration::from_secs(60), 100, |keys| async move {
                assert_eq!(keys, expected, "only the old finished task");
                Ok::<(), ()>(())
            })
            .await
            .expect("retention");
        assert_eq!(removed, Some(Ok(1)));
        assert!(db.row(old.task_id.as_str()).await.expect("row").is_none());
        assert!(db
            .is_expired(old.task_id.as_str())
            .await
            .expect("tombstone"));
        for kept in [&fresh, &queued] {
            assert!(db.row(kept.task_id.as_str()).await.expect("row").is_some());
            assert!(!db
                .is_expired(kept.task_id.as_str())
                .await
                .expect("no tombstone"));
        }
    }
}
