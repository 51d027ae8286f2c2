//! The distribuidor's statements: record a submission (batched), undo or
//! renew it around its publish, answer status.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::Pool;
use serde_json::Value;

use super::rows::{record, records_by_id, TaskRecord};
use super::{Db, DbError};
use crate::task::{TaskMessage, TaskState};

/// What became of a submission.
#[derive(Debug, Clone, PartialEq)]
pub enum Submission {
    /// A new row, state `queued`, in this version.
    New(RowVersion),
    /// The task id was already known; its row as it stands.
    Existing(TaskRecord),
}

/// The version of a row one submission wrote (PostgreSQL's `xmin`): if its
/// publish is refused, that submission removes the row only while it is
/// still this version, never after another submission republished it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowVersion(pub(super) String);

/// Where a submission comes from: who sent it and the work queue it is for
/// (both for the per-client quota), and the distribuidor that records it
/// (for the outbox relay).
#[derive(Debug, Clone)]
pub struct Origin {
    pub client: String,
    pub queue: String,
    pub owner: String,
}

/// A submission as the batch writer takes it.
#[derive(Debug, Clone)]
pub(super) struct SubmitCall {
    task: TaskMessage,
    origin: Option<Origin>,
}

impl Db {
    /// Records a submitted task as `queued`, unless its id is known already.
    pub async fn insert_queued(&self, task: &TaskMessage) -> Result<Submission, DbError> {
        self.record(task, None).await
    }

    /// [`Db::insert_queued`] from `origin`: counted by [`Db::outstanding`],
    /// relayed by [`Db::relay_orphans`] if its publish is never confirmed.
    pub async fn insert_queued_from(
        &self,
        task: &TaskMessage,
        origin: Origin,
    ) -> Result<Submission, DbError> {
        self.record(task, Some(origin)).await
    }

    async fn record(
        &self,
        task: &TaskMessage,
        origin: Option<Origin>,
    ) -> Result<Submission, DbError> {
        let call = SubmitCall {
            task: task.clone(),
            origin,
        };
        self.submissions.call(call).await
    }

    /// How many of `client`'s tasks of work queue `queue` are queued or running.
    pub async fn outstanding(&self, client: &str, queue: &str) -> Result<u64, DbError> {
        let connection = self.pool.get().await?;
        let count: i64 = connection
            .query_one(
                "SELECT count(*) FROM tasks
                 WHERE client = $1 AND queue = $2 AND state IN ('queued', 'running')",
                &[&client, &queue],
            )
            .await?
            .try_get(0)?;
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// The row of `task_id`, if there is one.
    pub async fn status(&self, task_id: &str) -> Result<Option<TaskRecord>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT state, result, error, worker_id, duration_ms FROM tasks WHERE task_id = $1",
                &[&task_id],
            )
            .await?;
        row.map(|row| record(task_id, &row)).transpose()
    }

    /// The rows of those `task_ids` that exist.
    pub async fn records(&self, task_ids: &[&str]) -> Result<HashMap<String, TaskRecord>, DbError> {
        let client = self.pool.get().await?;
        records_by_id(&client, task_ids).await
    }

    /// Removes the row of a submission that RabbitMQ certainly did not take
    /// (the client got `unavailable`), so no `queued` row outlives it —
    /// unless another submission of the same id published it meanwhile
    /// ([`Db::keep_queued`] changed its version). `false`: the row stays,
    /// so the task may run after all.
    pub async fn forget_unpublished(
        &self,
        task_id: &str,
        version: &RowVersion,
    ) -> Result<bool, DbError> {
        let client = self.pool.get().await?;
        let removed = client
            .execute(
                "DELETE FROM tasks
                 WHERE task_id = $1 AND state = 'queued' AND attempts = 0 AND xmin::text = $2",
                &[&task_id, &version.0],
            )
            .await?;
        Ok(removed > 0)
    }

    /// After republishing a task whose row was `queued`: gives the row a new
    /// version, so a concurrent refused submission does not remove it, or
    /// writes it again if one already did. A row that moved on is left alone.
    pub async fn keep_queued(&self, task: &TaskMessage) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "WITH touched AS (
                     UPDATE tasks SET state = state WHERE task_id = $1 AND state = 'queued'
                     RETURNING task_id)
                 INSERT INTO tasks (task_id, task_type, payload, state)
                 SELECT $1, $2, $3, 'queued' WHERE NOT EXISTS (SELECT 1 FROM touched)
                 ON CONFLICT (task_id) DO NOTHING",
                &[&task.task_id.as_str(), &task.task_type, &task.payload],
            )
            .await?;
        Ok(())
    }
}

/// One statement for many submissions; ids already known are looked up.
pub(super) async fn insert_queued_batch(
    pool: Pool,
    calls: Arc<[SubmitCall]>,
) -> Result<Vec<Result<Submission, DbError>>, DbError> {
    // One transaction: a batch that fails is written again row by row,
    // which is only right if none of it was committed.
    let mut connection = pool.get().await?;
    let client = connection.transaction().await?;
    let ids: Vec<&str> = calls.iter().map(|c| c.task.task_id.as_str()).collect();
    let types: Vec<&str> = calls.iter().map(|c| c.task.task_type.as_str()).collect();
    let payloads: Vec<&Value> = calls.iter().map(|c| &c.task.payload).collect();
    let origin = |field: fn(&Origin) -> &str| -> Vec<Option<&str>> {
        calls.iter().map(|c| c.origin.as_ref().map(field)).collect()
    };
    let clients = origin(|o| &o.client);
    let queues = origin(|o| &o.queue);
    let owners = origin(|o| &o.owner);
    let statement = client
        .prepare_cached(
            "INSERT INTO tasks (task_id, task_type, payload, state, client, queue, owner)
             SELECT id, task_type, payload, 'queued', client, queue, owner
             FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::text[], $5::text[], $6::text[])
                  AS u(id, task_type, payload, client, queue, owner)
             ON CONFLICT (task_id) DO NOTHING
             RETURNING task_id, xmin::text",
        )
        .await?;
    let rows = client
        .query(
            &statement,
            &[&ids, &types, &payloads, &clients, &queues, &owners],
        )
        .await?;
    let mut inserted: HashMap<String, String> = rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect();
    let known: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !inserted.contains_key(*id))
        .collect();
    let existing = records_by_id(&client, &known).await?;
    client.commit().await?;
    let answers = ids
        .iter()
        .map(|&id| {
            // The first call for an id gets the new row; a repeat in the
            // same batch sees it as it is, queued.
            if let Some(version) = inserted.remove(id) {
                return Ok(Submission::New(RowVersion(version)));
            }
            Ok(match existing.get(id) {
                Some(record) => Submission::Existing(record.clone()),
                None => Submission::Existing(TaskRecord {
                    state: TaskState::Queued,
                    result: None,
                    error: None,
                    worker_id: None,
                    duration_ms: None,
                }),
            })
        })
        .collect();
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use super::super::{test_db, test_task};
    use super::*;

    #[tokio::test]
    async fn a_submission_is_new_once_then_existing() {
        let db = test_db().await;
        let task = test_task("echo");
        let first = db.insert_queued(&task).await.expect("insert");
        assert!(matches!(first, Submission::New(_)), "{first:?}");
        let again = db.insert_queued(&task).await.expect("insert again");
        let Submission::Existing(record) = again else {
            panic!("a known id is not new: {again:?}");
        };
        assert_eq!(record.state, TaskState::Queued);
        let status = db.status(task.task_id.as_str()).await.expect("status");
        assert_eq!(status.map(|r| r.state), Some(TaskState::Queued));
        let records = db.records(&[task.task_id.as_str(), "never-seen"]).await;
        assert_eq!(records.expect("records").len(), 1);
    }

    #[tokio::test]
    async fn a_row_postgresql_refuses_fails_alone_in_its_batch() {
        let db = test_db().await;
        let mut tasks: Vec<TaskMessage> = (0..40).map(|_| test_task("echo")).collect();
        tasks[17].payload = serde_json::json!({"text": "a\u{0}b"});
        let calls = tasks.iter().map(|task| {
            let (db, task) = (db.clone(), task.clone());
            tokio::spawn(async move { db.insert_queued(&task).await })
        });
        let answers: Vec<_> = futures::future::join_all(calls).await;
        for (i, answer) in answers.into_iter().enumerate() {
            match answer.expect("task") {
                Ok(submission) => {
                    assert_ne!(i, 17, "jsonb takes no NUL");
                    assert!(matches!(submission, Submission::New(_)));
                }
                Err(err) => {
                    assert_eq!(i, 17, "only the NUL row fails: {err}");
                    assert!(err.is_data_error(), "{err:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn forgetting_removes_only_the_version_it_wrote() {
        let db = test_db().await;
        let task = test_task("echo");
        let Submission::New(version) = db.insert_queued(&task).await.expect("insert") else {
            panic!("new id");
        };
        // Another submission republished it: the row has a new version.
        db.keep_queued(&task).await.expect("keep");
        let id = task.task_id.as_str();
        db.forget_unpublished(id, &version).await.expect("forget");
        assert!(db.status(id).await.expect("status").is_some(), "kept");
        // Its own version is removed.
        let other = test_task("echo");
        let Submission::New(version) = db.insert_queued(&other).await.expect("insert") else {
            panic!("new id");
        };
        let other_id = other.task_id.as_str();
        db.forget_unpublished(other_id, &version)
            .await
            .expect("forget");
        assert!(db.status(other_id).await.expect("status").is_none());
        // keep_queued writes a removed row again.
        db.keep_queued(&other).await.expect("keep");
        assert!(db.status(other_id).await.expect("status").is_some());
    }
}
