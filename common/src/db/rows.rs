//! The typed rows the statements return: what a status request needs of a
//! task ([`TaskRecord`]), and the whole row ([`TaskRow`]), which is also the
//! result document stored in S3.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::DbError;
use crate::task::{TaskKey, TaskReport, TaskState};

/// What a task's row says, as a status request needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub state: TaskState,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    pub duration_ms: Option<u64>,
}

/// A whole `tasks` row. Read through `to_jsonb(tasks)`, so that timestamps
/// keep PostgreSQL's own text form; serialized, it is the result document
/// in S3, the same bytes for the same row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRow {
    pub task_id: TaskKey,
    pub task_type: String,
    pub payload: Value,
    pub state: TaskState,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    /// Runs started, including the one running now.
    pub attempts: u32,
    pub duration_ms: Option<u64>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl TaskRow {
    /// The row from its `to_jsonb(tasks)` form.
    pub(super) fn from_json(task_id: &str, json: Value) -> Result<TaskRow, DbError> {
        serde_json::from_value(json).map_err(|err| DbError::Unreadable {
            task_id: task_id.to_owned(),
            cause: err.to_string(),
        })
    }

    /// The result document stored in S3: the row as JSON.
    pub fn document(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a TaskRow always serializes")
    }

    /// The result as the worker reports it to the distribuidor.
    pub fn report(&self) -> TaskReport {
        TaskReport {
            task_id: self.task_id.clone(),
            status: self.state,
            result: self.result.clone(),
            error: self.error.clone(),
            worker_id: self.worker_id.clone(),
            duration_ms: self.duration_ms,
        }
    }
}

/// The rows of `ids` (one query), by task id.
pub(super) async fn records_by_id(
    client: &impl deadpool_postgres::GenericClient,
    ids: &[&str],
) -> Result<std::collections::HashMap<String, TaskRecord>, DbError> {
    let mut records = std::collections::HashMap::new();
    if ids.is_empty() {
        return Ok(records);
    }
    let rows = client
        .query(
            "SELECT state, result, error, worker_id, duration_ms, task_id FROM tasks WHERE task_id = ANY($1)",
            &[&ids],
        )
        .await?;
    for row in rows {
        let id: String = row.try_get(5)?;
        let record = record(&id, &row)?;
        records.insert(id, record);
    }
    Ok(records)
}

/// A status row as a [`TaskRecord`].
pub(super) fn record(task_id: &str, row: &tokio_postgres::Row) -> Result<TaskRecord, DbError> {
    let state: String = row.try_get(0)?;
    let state = state.parse().map_err(|_| DbError::Corrupt {
        task_id: task_id.to_owned(),
        state: state.clone(),
    })?;
    let duration_ms: Option<i64> = row.try_get(4)?;
    Ok(TaskRecord {
        state,
        result: row.try_get(1)?,
        error: row.try_get(2)?,
        worker_id: row.try_get(3)?,
        duration_ms: duration_ms.and_then(|ms| u64::try_from(ms).ok()),
    })
}
