//! The `tasks` table: migrations and every query Tareas runs against it.
//!
//! Writes are idempotent by `task_id`, and a row in a terminal state
//! (`succeeded`, `failed`) is never changed again: that is what makes a
//! redelivered message harmless.

use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use serde_json::Value;
use tokio_postgres::NoTls;

use crate::task::{TaskMessage, TaskState};

/// The migrations, in order. Each runs once per database, inside one
/// transaction holding an advisory lock, so processes starting together
/// do not race.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../migrations/0001_tasks.sql"))];

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x7461_7265_6173;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL connection unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("invalid DATABASE_URL: {0}")]
    Config(String),
    #[error("row for task {task_id} holds unknown state {state:?}")]
    Corrupt { task_id: String, state: String },
}

/// What a task's row says, as a status request needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRecord {
    pub state: TaskState,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    pub duration_ms: Option<u64>,
}

/// What became of a submission.
#[derive(Debug, Clone, PartialEq)]
pub enum Submission {
    /// A new row, state `queued`.
    New,
    /// The task id was already known; its row as it stands.
    Existing(TaskRecord),
}

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
pub struct Finish<'a> {
    pub state: TaskState,
    pub result: Option<&'a Value>,
    pub error: Option<&'a str>,
    pub worker_id: &'a str,
    pub duration_ms: u64,
}

/// A pool of PostgreSQL connections; cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
}

impl Db {
    /// A pool of at most `max_size` connections. Connects lazily.
    pub fn new(url: &str, max_size: usize) -> Result<Db, DbError> {
        let mut config = deadpool_postgres::Config::new();
        config.url = Some(url.to_owned());
        config.connect_timeout = Some(Duration::from_secs(3));
        config.manager = Some(ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let mut pool = PoolConfig::new(max_size.max(1));
        pool.timeouts = Timeouts {
            wait: Some(Duration::from_secs(5)),
            create: Some(Duration::from_secs(5)),
            recycle: Some(Duration::from_secs(5)),
        };
        config.pool = Some(pool);
        let pool = config
            .create_pool(Some(Runtime::Tokio1), NoTls)
            .map_err(|err| DbError::Config(err.to_string()))?;
        Ok(Db { pool })
    }

    /// Applies the migrations that this database has not seen yet.
    pub async fn migrate(&self) -> Result<(), DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS tareas_migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        for (version, sql) in MIGRATIONS {
            let applied = tx.query_opt("SELECT 1 FROM tareas_migrations WHERE version = $1", &[version]).await?;
            if applied.is_none() {
                tx.batch_execute(sql).await?;
                tx.execute("INSERT INTO tareas_migrations (version) VALUES ($1)", &[version]).await?;
                tracing::info!(version, "applied database migration");
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records a submitted task as `queued`, unless its id is known already.
    pub async fn insert_queued(&self, task: &TaskMessage) -> Result<Submission, DbError> {
        let client = self.pool.get().await?;
        let inserted = client
            .execute(
                "INSERT INTO tasks (task_id, task_type, payload, state) VALUES ($1, $2, $3, 'queued')
                 ON CONFLICT (task_id) DO NOTHING",
                &[&task.task_id.as_str(), &task.task_type, &task.payload],
            )
            .await?;
        if inserted == 1 {
            return Ok(Submission::New);
        }
        drop(client);
        match self.status(task.task_id.as_str()).await? {
            Some(record) => Ok(Submission::Existing(record)),
            // Deleted between the two statements: only an operator does that.
            None => Ok(Submission::New),
        }
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
        let Some(row) = row else { return Ok(None) };
        let state: String = row.try_get(0)?;
        let state = state
            .parse()
            .map_err(|_| DbError::Corrupt { task_id: task_id.to_owned(), state: state.clone() })?;
        let duration_ms: Option<i64> = row.try_get(4)?;
        Ok(Some(TaskRecord {
            state,
            result: row.try_get(1)?,
            error: row.try_get(2)?,
            worker_id: row.try_get(3)?,
            duration_ms: duration_ms.and_then(|ms| u64::try_from(ms).ok()),
        }))
    }

    /// Claims a delivered task for `worker_id`, marking it `running`
    /// (creating its row if a publisher other than the distribuidor sent it).
    ///
    /// A first delivery (`redelivered == false`) only claims a `queued`
    /// task: finding it `running` means a duplicate message whose twin is
    /// being run right now. A redelivery also takes over a `running` task,
    /// whose previous worker died or let go of it.
    pub async fn claim(&self, task: &TaskMessage, worker_id: &str, redelivered: bool) -> Result<Claim, DbError> {
        let client = self.pool.get().await?;
        let claimable = if redelivered { vec!["queued", "running"] } else { vec!["queued"] };
        let claimed = client
            .query_opt(
                "INSERT INTO tasks (task_id, task_type, payload, state, worker_id, attempts, started_at)
                 VALUES ($1, $2, $3, 'running', $4, 1, now())
                 ON CONFLICT (task_id) DO UPDATE
                 SET state = 'running', worker_id = EXCLUDED.worker_id,
                     attempts = tasks.attempts + 1, started_at = now()
                 WHERE tasks.state = ANY($5)
                 RETURNING attempts",
                &[&task.task_id.as_str(), &task.task_type, &task.payload, &worker_id, &claimable],
            )
            .await?;
        if let Some(row) = claimed {
            let attempt: i32 = row.try_get(0)?;
            return Ok(Claim::Started { attempt: u32::try_from(attempt).unwrap_or(1) });
        }
        drop(client);
        Ok(match self.status(task.task_id.as_str()).await?.map(|record| record.state) {
            Some(state) if state.is_terminal() => Claim::Finished,
            Some(_) => Claim::RunningElsewhere,
            None => Claim::RunningElsewhere,
        })
    }

    /// Puts a task this worker was running back to `queued` after a
    /// transient failure, keeping the error, before it waits for a retry.
    pub async fn retry_later(&self, task_id: &str, worker_id: &str, error: &str) -> Result<(), DbError> {
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

    /// Records how a task ended, unless it had ended already, and returns
    /// the row as a JSON document: the first finish wins, and every later
    /// call returns the same document.
    pub async fn finish(&self, task_id: &str, finish: &Finish<'_>) -> Result<Value, DbError> {
        let client = self.pool.get().await?;
        let duration_ms = i64::try_from(finish.duration_ms).unwrap_or(i64::MAX);
        let row = client
            .query_one(
                "WITH done AS (
                     UPDATE tasks SET state = $2, result = $3, error = $4, worker_id = $5,
                                      duration_ms = $6, finished_at = now()
                     WHERE task_id = $1 AND state IN ('queued', 'running')
                     RETURNING *)
                 SELECT to_jsonb(done) FROM done
                 UNION ALL
                 SELECT to_jsonb(tasks) FROM tasks
                 WHERE task_id = $1 AND NOT EXISTS (SELECT 1 FROM done)",
                &[
                    &task_id,
                    &finish.state.as_str(),
                    &finish.result,
                    &finish.error,
                    &finish.worker_id,
                    &duration_ms,
                ],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// The whole row of `task_id` as a JSON document (what S3 stores).
    pub async fn document(&self, task_id: &str) -> Result<Option<Value>, DbError> {
        let client = self.pool.get().await?;
        let row = client.query_opt("SELECT to_jsonb(tasks) FROM tasks WHERE task_id = $1", &[&task_id]).await?;
        Ok(match row {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }
}
