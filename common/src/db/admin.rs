//! The operator's statement: `cliente dlq replay` makes a failed task
//! runnable again.

use super::{Db, DbError};

impl Db {
    /// Makes a `failed` task runnable again, for an operator's replay from
    /// the dead-letter queue: the one deliberate exit from a terminal state.
    /// Returns whether the row was reset.
    pub async fn reset_for_replay(&self, task_id: &str) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        let changed = client
            .execute(
                "UPDATE tasks SET state = 'queued', attempts = 0, result = NULL, error = NULL,
                                  worker_id = NULL, duration_ms = NULL, started_at = NULL, finished_at = NULL
                 WHERE task_id = $1 AND state = 'failed'",
                &[&task_id],
            )
            .await?;
        Ok(changed == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{test_db, test_task, Finish};
    use crate::task::TaskState;

    #[tokio::test]
    async fn only_a_failed_task_is_reset_for_replay() {
        let db = test_db().await;
        let task = test_task("echo");
        let id = task.task_id.as_str();
        db.claim(&task, "w1", false).await.expect("claim");
        assert!(!db.reset_for_replay(id).await.expect("reset"), "running");
        db.finish(Finish {
            task_id: id.to_owned(),
            state: TaskState::Failed,
            result: None,
            error: Some("boom".into()),
            worker_id: "w1".into(),
            duration_ms: 1,
        })
        .await
        .expect("finish");
        assert!(db.reset_for_replay(id).await.expect("reset"));
        let row = db.row(id).await.expect("row").expect("exists");
        assert_eq!((row.state, row.attempts), (TaskState::Queued, 0));
        assert_eq!(row.error, None);
    }
}
