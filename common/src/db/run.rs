//! The worker's statements: claim a delivered task (batched), give it back
//! or schedule its retry, record how it ended (batched), read its row.

use std::sync::Arc;

use deadpool_postgres::Pool;
use serde_json::Value;

use super::rows::{records_by_id, TaskRow};
use super::{Db, DbError};
use crate::task::{TaskMessage, TaskState};

/// What a worker may do with a delivered task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// It is this worker's to run: the row now says `running`; this is
    /// run number `attempt` (1-based).
    Started { attempt: u32 },
    /// Another delivery of the same task is running it: nothing to do.
    RunningElsewhere,
    /// It finished before: only make sure its result is stored and reported.
    Finished,
}

/// How a task ended, as the worker records it.
#[derive(Debug, Clone)]
pub struct Finish {
    pub task_id: String,
    pub state: TaskState,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub worker_id: String,
    pub duration_ms: u64,
}

/// A claim, as the batch writer takes it.
#[derive(Clone)]
pub(super) struct ClaimCall {
    task: TaskMessage,
    worker_id: String,
    redelivered: bool,
}

impl Db {
    /// Claims a delivered task for `worker_id`, marking it `running`
    /// (creating its row if a publisher other than the distribuidor sent it).
    ///
    /// A first delivery (`redelivered == false`) only claims a `queued`
    /// task: finding it `running` means a duplicate message whose twin is
    /// being run right now. A redelivery also takes over a `running` task,
    /// whose previous worker died or let go of it.
    pub async fn claim(
        &self,
        task: &TaskMessage,
        worker_id: &str,
        redelivered: bool,
    ) -> Result<Claim, DbError> {
        self.claims
            .call(ClaimCall {
                task: task.clone(),
                worker_id: worker_id.to_owned(),
                redelivered,
            })
            .await
    }

    /// Puts a task this worker was running back to `queued` after a
    /// transient failure, keeping the error, before it waits for a retry.
    pub async fn retry_later(
        &self,
        task_id: &str,
        worker_id: &str,
        error: &str,
    ) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE tasks SET state = 'queued', error = $3
                 WHERE task_id = $1 AND state = 'running' AND worker_id = $2",
                &[&task_id, &worker_id, &error],
            )
            .await?;
        Ok(())
    }

    /// Gives back a task this worker claimed but did not finish (shutdown,
    /// lost connection): `queued` again, and the run does not count.
    pub async fn release(&self, task_id: &str, worker_id: &str) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE tasks SET state = 'queued', attempts = GREATEST(attempts - 1, 0)
                 WHERE task_id = $1 AND state = 'running' AND worker_id = $2",
                &[&task_id, &worker_id],
            )
            .await?;
        Ok(())
    }

    /// Records how a task ended, unless it had ended already, and returns
    /// its row: the first finish wins, and every later call returns the
    /// same row.
    pub async fn finish(&self, finish: Finish) -> Result<TaskRow, DbError> {
        self.finishes.call(finish).await
    }

    /// The whole row of `task_id`, if there is one.
    pub async fn row(&self, task_id: &str) -> Result<Option<TaskRow>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT to_jsonb(tasks) FROM tasks WHERE task_id = $1",
                &[&task_id],
            )
            .await?;
        match row {
            Some(row) => TaskRow::from_json(task_id, row.try_get(0)?).map(Some),
            None => Ok(None),
        }
    }

    /// The whole row of `task_id` as the JSON document S3 holds of it.
    pub async fn document(&self, task_id: &str) -> Result<Option<Value>, DbError> {
        Ok(self
            .row(task_id)
            .await?
            .map(|row| serde_json::to_value(row).expect("a TaskRow always serializes")))
    }
}

/// One statement per kind of delivery for many claims; ids already taken or
/// repeated within the batch are looked up.
pub(super) async fn claim_batch(
    pool: Pool,
    calls: Arc<[ClaimCall]>,
) -> Result<Vec<Result<Claim, DbError>>, DbError> {
    // One transaction: a batch that fails is written again row by row,
    // which is only right if none of it was committed.
    let mut connection = pool.get().await?;
    let client = connection.transaction().await?;
    let mut answers: Vec<Option<Claim>> = calls.iter().map(|_| None).collect();
    for redelivered in [false, true] {
        claim_group(&client, &calls, redelivered, &mut answers).await?;
    }
    let unclaimed: Vec<&str> = calls
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| answer.is_none())
        .map(|(call, _)| call.task.task_id.as_str())
        .collect();
    let rows = records_by_id(&client, &unclaimed).await?;
    client.commit().await?;
    Ok(calls
        .iter()
        .zip(answers)
        .map(|(call, answer)| {
            Ok(answer.unwrap_or_else(|| {
                let terminal = rows
                    .get(call.task.task_id.as_str())
                    .is_some_and(|record| record.state.is_terminal());
                if terminal {
                    Claim::Finished
                } else {
                    Claim::RunningElsewhere
                }
            }))
        })
        .collect())
}

/// Claims, in one statement, the calls of one kind (first deliveries, or
/// redeliveries) that no earlier call of the batch claimed; fills their answers.
async fn claim_group(
    client: &impl deadpool_postgres::GenericClient,
    calls: &[ClaimCall],
    redelivered: bool,
    answers: &mut [Option<Claim>],
) -> Result<(), DbError> {
    let mut seen = std::collections::HashSet::new();
    // ON CONFLICT DO UPDATE may touch a row once per statement: repeats wait.
    let group: Vec<usize> = (0..calls.len())
        .filter(|&i| {
            calls[i].redelivered == redelivered && seen.insert(calls[i].task.task_id.as_str())
        })
        .collect();
    if group.is_empty() {
        return Ok(());
    }
    let column = |field: fn(&ClaimCall) -> &str| -> Vec<&str> {
        group.iter().map(|&i| field(&calls[i])).collect()
    };
    let ids = column(|call| call.task.task_id.as_str());
    let types = column(|call| call.task.task_type.as_str());
    let workers = column(|call| call.worker_id.as_str());
    let payloads: Vec<&Value> = group.iter().map(|&i| &calls[i].task.payload).collect();
    let claimable = if redelivered {
        vec!["queued", "running"]
    } else {
        vec!["queued"]
    };
    let statement = client
        .prepare_cached(
            "INSERT INTO tasks (task_id, task_type, payload, state, worker_id, attempts, started_at)
             SELECT id, task_type, payload, 'running', worker_id, 1, now()
             FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::text[]) AS u(id, task_type, payload, worker_id)
             ON CONFLICT (task_id) DO UPDATE
             SET state = 'running', worker_id = EXCLUDED.worker_id,
                 attempts = tasks.attempts + 1, started_at = now()
             WHERE tasks.state = ANY($5)
             RETURNING task_id, attempts",
        )
        .await?;
    let rows = client
        .query(&statement, &[&ids, &types, &payloads, &workers, &claimable])
        .await?;
    for row in rows {
        let id: String = row.try_get(0)?;
        let attempt: i32 = row.try_get(1)?;
        if let Some(&i) = group
            .iter()
            .find(|&&i| calls[i].task.task_id.as_str() == id)
        {
            answers[i] = Some(Claim::Started {
                attempt: u32::try_from(attempt).unwrap_or(1),
            });
        }
    }
    Ok(())
}

/// One statement for many finishes; rows finished before are read back.
pub(super) async fn finish_batch(
    pool: Pool,
    finishes: Arc<[Finish]>,
) -> Result<Vec<Result<TaskRow, DbError>>, DbError> {
    // One transaction: a batch that fails is written again row by row,
    // which is only right if none of it was committed.
    let mut connection = pool.get().await?;
    let client = connection.transaction().await?;
    let ids: Vec<&str> = finishes.iter().map(|f| f.task_id.as_str()).collect();
    let states: Vec<&str> = finishes.iter().map(|f| f.state.as_str()).collect();
    let results: Vec<Option<&Value>> = finishes.iter().map(|f| f.result.as_ref()).collect();
    let errors: Vec<Option<&str>> = finishes.iter().map(|f| f.error.as_deref()).collect();
    let workers: Vec<&str> = finishes.iter().map(|f| f.worker_id.as_str()).collect();
    let durations: Vec<i64> = finishes
        .iter()
        .map(|f| i64::try_from(f.duration_ms).unwrap_or(i64::MAX))
        .collect();
    let statement = client
        .prepare_cached(
            "WITH input AS (
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::jsonb[], $4::text[], $5::text[], $6::int8[])
                 AS u(task_id, state, result, error, worker_id, duration_ms)),
             done AS (
                 UPDATE tasks SET state = input.state, result = input.result, error = input.error,
                                  worker_id = input.worker_id, duration_ms = input.duration_ms, finished_at = now()
                 FROM input
                 WHERE tasks.task_id = input.task_id AND tasks.state IN ('queued', 'running')
                 RETURNING tasks.*)
             SELECT task_id, to_jsonb(done) FROM done",
        )
        .await?;
    let rows = client
        .query(
            &statement,
            &[&ids, &states, &results, &errors, &workers, &durations],
        )
        .await?;
    let mut documents: std::collections::HashMap<String, Value> = rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, Value>(1)))
        .collect();
    let missing: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !documents.contains_key(*id))
        .collect();
    if !missing.is_empty() {
        for row in client
            .query(
                "SELECT task_id, to_jsonb(tasks) FROM tasks WHERE task_id = ANY($1)",
                &[&missing],
            )
            .await?
        {
            documents.insert(row.get(0), row.get(1));
        }
    }
    client.commit().await?;
    Ok(ids
        .iter()
        .map(|id| match documents.remove(*id) {
            Some(json) => TaskRow::from_json(id, json),
            None => Err(DbError::NoRow {
                task_id: (*id).to_owned(),
            }),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::{test_db, test_task};
    use super::*;

    fn finish(task: &TaskMessage, state: TaskState, worker: &str) -> Finish {
        Finish {
            task_id: task.task_id.to_string(),
            state,
            result: Some(serde_json::json!({"n": 1})),
            error: None,
            worker_id: worker.to_owned(),
            duration_ms: 3,
        }
    }

    #[tokio::test]
    async fn a_first_delivery_claims_once_and_a_redelivery_takes_over() {
        let db = test_db().await;
        let task = test_task("echo");
        db.insert_queued(&task).await.expect("insert");
        let first = db.claim(&task, "w1", false).await.expect("claim");
        assert_eq!(first, Claim::Started { attempt: 1 });
        let twin = db.claim(&task, "w2", false).await.expect("claim twin");
        assert_eq!(twin, Claim::RunningElsewhere);
        let redelivery = db.claim(&task, "w2", true).await.expect("claim again");
        assert_eq!(redelivery, Claim::Started { attempt: 2 });
        // Given back, the run does not count.
        db.release(task.task_id.as_str(), "w2")
            .await
            .expect("release");
        let row = db
            .row(task.task_id.as_str())
            .await
            .expect("row")
            .expect("exists");
        assert_eq!((row.state, row.attempts), (TaskState::Queued, 1));
    }

    #[tokio::test]
    async fn a_finished_row_never_changes_again_whatever_statement_comes_late() {
        let db = test_db().await;
        let task = test_task("echo");
        let id = task.task_id.as_str();
        let submitted = db.insert_queued(&task).await.expect("insert");
        let crate::db::Submission::New(version) = submitted else {
            panic!("a new id: {submitted:?}");
        };
        db.claim(&task, "w1", false).await.expect("claim");
        let done = db.finish(finish(&task, TaskState::Succeeded, "w1")).await;
        let done = done.expect("finish");
        // Every statement that can reach a row late, one by one: a twin
        // delivery, a redelivery, the first worker's retry or release after
        // another finished, a second finish, the distribuidor's undo, renew
        // and publish mark, a resubmission, an operator's replay.
        let late_claim = db.claim(&task, "w2", false).await.expect("claim");
        assert_eq!(late_claim, Claim::Finished);
        let redelivery = db.claim(&task, "w2", true).await.expect("claim");
        assert_eq!(redelivery, Claim::Finished);
        db.retry_later(id, "w1", "late").await.expect("retry");
        db.release(id, "w1").await.expect("release");
        let again = db.finish(finish(&task, TaskState::Failed, "w2")).await;
        assert_eq!(again.expect("finish again"), done);
        db.forget_unpublished(id, &version).await.expect("forget");
        db.keep_queued(&task).await.expect("keep");
        db.mark_published(&task.task_id).await.expect("mark");
        let resubmitted = db.insert_queued(&task).await.expect("resubmit");
        assert!(
            matches!(&resubmitted, crate::db::Submission::Existing(r) if r.state == TaskState::Succeeded),
            "{resubmitted:?}"
        );
        assert!(!db.reset_for_replay(id).await.expect("replay"));
        let row = db.row(id).await.expect("row").expect("exists");
        assert_eq!(
            row, done,
            "the finished row is as the first finish wrote it"
        );
    }

    #[tokio::test]
    async fn the_first_finish_wins_and_the_row_is_typed() {
        let db = test_db().await;
        let task = test_task("echo");
        // A claim creates the row of a task that no distribuidor recorded.
        assert_eq!(
            db.claim(&task, "w1", false).await.expect("claim"),
            Claim::Started { attempt: 1 }
        );
        let row = db.finish(finish(&task, TaskState::Succeeded, "w1")).await;
        let row = row.expect("finish");
        assert_eq!(row.state, TaskState::Succeeded);
        assert_eq!(row.worker_id.as_deref(), Some("w1"));
        assert_eq!(row.duration_ms, Some(3));
        assert!(row.finished_at.is_some());
        let later = db.finish(finish(&task, TaskState::Failed, "w2")).await;
        assert_eq!(later.expect("finish again"), row, "the first finish wins");
        let claim = db.claim(&task, "w3", true).await.expect("claim");
        assert_eq!(claim, Claim::Finished);
        let document = db.document(task.task_id.as_str()).await.expect("document");
        let stored: TaskRow = serde_json::from_slice(&row.document()).expect("parse");
        assert_eq!(stored, row);
        assert_eq!(document.expect("exists")["state"], "succeeded");
    }

    #[tokio::test]
    async fn a_retry_requeues_the_row_with_its_error() {
        let db = test_db().await;
        let task = test_task("echo");
        db.insert_queued(&task).await.expect("insert");
        db.claim(&task, "w1", false).await.expect("claim");
        let id = task.task_id.as_str();
        db.retry_later(id, "w1", "flaky").await.expect("retry");
        let row = db.row(id).await.expect("row").expect("exists");
        assert_eq!(row.state, TaskState::Queued);
        assert_eq!(row.error.as_deref(), Some("flaky"));
    }

    #[tokio::test]
    async fn a_refused_row_in_a_later_statement_undoes_nothing_of_the_batch() {
        let db = test_db().await;
        // First deliveries go in the batch's first statement, redeliveries in
        // its second: the NUL one fails that one, the first must not count.
        let mut tasks: Vec<(TaskMessage, bool)> =
            (0..30).map(|_| (test_task("echo"), false)).collect();
        let mut poison = test_task("echo");
        poison.payload = serde_json::json!({"text": "a\u{0}b"});
        tasks.insert(15, (poison, true));
        let calls = tasks.iter().map(|(task, redelivered)| {
            let (db, task, redelivered) = (db.clone(), task.clone(), *redelivered);
            tokio::spawn(async move { db.claim(&task, "w1", redelivered).await })
        });
        let answers = futures::future::join_all(calls).await;
        for (i, answer) in answers.into_iter().enumerate() {
            match answer.expect("task") {
                Ok(claim) => assert_eq!(claim, Claim::Started { attempt: 1 }, "call {i}"),
                Err(err) => {
                    assert_eq!(i, 15, "only the NUL claim fails: {err}");
                    assert!(err.is_data_error(), "{err:?}");
                }
            }
        }
    }

    #[tokio::test]
    async fn finishing_a_task_without_a_row_fails_only_that_call() {
        let db = test_db().await;
        let ghost = test_task("echo");
        let err = db.finish(finish(&ghost, TaskState::Succeeded, "w1")).await;
        assert!(matches!(err, Err(DbError::NoRow { .. })), "{err:?}");
    }
}
