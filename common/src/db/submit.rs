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
    /// The task id was already known, with the same task type and payload
    /// (equal JSON values); its row as it stands.
    Existing(TaskRecord),
    /// The task id was already known with another task type or payload:
    /// nothing was written.
    Conflict,
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

/// One statement for many submissions; ids already known are looked up
/// and compared with what was submitted.
pub(super) async fn insert_queued_batch(
    pool: Pool,
    calls: Arc<[SubmitCall]>,
) -> Result<Vec<Result<Submission, DbError>>, DbError> {
    // One transaction: a batch that fails is written again row by row,
    // which is only right if none of it was committed.
    let mut connection = pool.get().await?;
    let client = connection.transaction().await?;
    let mut inserted = insert_new(&client, &calls).await?;
    // Every call but the one that wrote its row: a known id, or a repeat
    // within the batch of one written by an earlier call.
    let mut first_writer: HashMap<&str, usize> = HashMap::new();
    let known: Vec<usize> = (0..calls.len())
        .filter(|&n| {
            let id = calls[n].task.task_id.as_str();
            !inserted.contains_key(id) || *first_writer.entry(id).or_insert(n) != n
        })
        .collect();
    let conflicts = conflicting(&client, &calls, &known).await?;
    let known_ids: Vec<&str> = known
        .iter()
        .map(|&n| calls[n].task.task_id.as_str())
        .collect();
    let existing = records_by_id(&client, &known_ids).await?;
    client.commit().await?;
    let answers = calls
        .iter()
        .enumerate()
        .map(|(n, call)| {
            let id = call.task.task_id.as_str();
            if conflicts.contains(&n) {
                return Ok(Submission::Conflict);
            }
            if first_writer.get(id) == Some(&n) {
                if let Some(version) = inserted.remove(id) {
                    return Ok(Submission::New(RowVersion(version)));
                }
            }
            // A repeat of an id new in this batch sees it as it is, queued.
            Ok(Submission::Existing(existing.get(id).cloned().unwrap_or(
                TaskRecord {
                    state: TaskState::Queued,
                    result: None,
                    error: None,
                    worker_id: None,
                    duration_ms: None,
                },
            )))
        })
        .collect();
    Ok(answers)
}

/// Inserts the rows of ids not known yet; their ids and row versions.
async fn insert_new(
    client: &deadpool_postgres::Transaction<'_>,
    calls: &[SubmitCall],
) -> Result<HashMap<String, String>, DbError> {
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
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect())
}

/// Which of the calls numbered `known` name a row with another task type
/// or payload. PostgreSQL compares: `jsonb` equality ignores key order and
/// how a number is spelled.
async fn conflicting(
    client: &deadpool_postgres::Transaction<'_>,
    calls: &[SubmitCall],
    known: &[usize],
) -> Result<std::collections::HashSet<usize>, DbError> {
    if known.is_empty() {
        return Ok(Default::default());
    }
    let numbers: Vec<i32> = known.iter().map(|&n| n as i32).collect();
    let ids: Vec<&str> = known
        .iter()
        .map(|&n| calls[n].task.task_id.as_str())
        .collect();
    let types: Vec<&str> = known
        .iter()
        .map(|&n| calls[n].task.task_type.as_str())
        .collect();
    let payloads: Vec<&Value> = known.iter().map(|&n| &calls[n].task.payload).collect();
    let rows = client
        .query(
            "SELECT u.n FROM tasks t,
                    UNNEST($1::int[], $2::text[], $3::text[], $4::jsonb[]) AS u(n, id, task_type, payload)
             WHERE t.task_id = u.id AND (t.task_type <> u.task_type OR t.payload <> u.payload)",
            &[&numbers, &ids, &types, &payloads],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| row.get::<_, i32>(0) as usize)
        .collect())
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
    async fn another_payload_for_a_known_id_is_a_conflict_key_order_is_not() {
        let db = test_db().await;
        let mut task = test_task("echo");
        task.payload = serde_json::json!({"a": 1, "b": [1.0, 2]});
        db.insert_queued(&task).await.expect("insert");
        let mut reordered = task.clone();
        reordered.payload = serde_json::from_str(r#"{"b": [1, 2.0], "a": 1}"#).unwrap();
        let same = db.insert_queued(&reordered).await.expect("same");
        assert!(matches!(same, Submission::Existing(_)), "{same:?}");
        let mut other = task.clone();
        other.payload = serde_json::json!({"a": 2, "b": [1, 2]});
        let mut retyped = task.clone();
        retyped.task_type = "hash".into();
        // In one batch, together with a new id and its repeat.
        let fresh = test_task("echo");
        let mut fresh_other = fresh.clone();
        fresh_other.payload = serde_json::json!({"text": "otro"});
        let calls = [&other, &retyped, &fresh, &fresh_other, &fresh].map(|task| {
            let (db, task) = (db.clone(), task.clone());
            tokio::spawn(async move { db.insert_queued(&task).await.expect("insert") })
        });
        let answers: Vec<Submission> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|answer| answer.expect("task"))
            .collect();
        assert_eq!(answers[0], Submission::Conflict);
        assert_eq!(answers[1], Submission::Conflict);
        // Whichever of the new id's calls came first wrote the row; the
        // other payload conflicts with it.
        let news: Vec<usize> = (2..5)
            .filter(|&n| matches!(answers[n], Submission::New(_)))
            .collect();
        let conflicts = answers[2..]
            .iter()
            .filter(|a| **a == Submission::Conflict)
            .count();
        let expected = if news == [3] { 2 } else { 1 };
        assert_eq!((news.len(), conflicts), (1, expected), "{answers:?}");
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
