//! The `tasks` table: migrations and every query Tareas runs against it.
//!
//! Writes are idempotent by `task_id`, and a row in a terminal state
//! (`succeeded`, `failed`) is never changed again: that is what makes a
//! redelivered message harmless.
//!
//! The hot writes (recording a submission, claiming, finishing) go through
//! batch writers (`batch.rs`): concurrent calls share one statement and one commit.

mod batch;

use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use serde_json::Value;
use tokio_postgres::NoTls;

use self::batch::Batcher;
use crate::task::{TaskMessage, TaskState};

/// Most rows in one batched statement.
const MAX_BATCH: usize = 256;

/// Statements of one kind in flight at once. One: the next batch grows
/// while the current one commits, so batches get bigger exactly when the
/// database is slower. Measured against four on the bench: half the
/// commits and half PostgreSQL's CPU per task, ack latency p99 at 600/s
/// 17–18 ms instead of 35–86, throughput the same or better
/// (docs/performance.md).
const BATCHES_IN_FLIGHT: usize = 1;

/// The migrations, in order. Each runs once per database, inside one
/// transaction holding an advisory lock, so processes starting together
/// do not race.
const MIGRATIONS: &[(i32, &str)] = &[(1, include_str!("../../migrations/0001_tasks.sql"))];

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
    #[error("PostgreSQL batch write failed: {0}")]
    Batch(String),
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
    /// A new row, state `queued`, in this version.
    New(RowVersion),
    /// The task id was already known; its row as it stands.
    Existing(TaskRecord),
}

/// The version of a row one submission wrote (PostgreSQL's `xmin`): if its
/// publish is refused, that submission removes the row only while it is
/// still this version, never after another submission republished it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowVersion(String);

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
struct ClaimCall {
    task: TaskMessage,
    worker_id: String,
    redelivered: bool,
}

/// A pool of PostgreSQL connections and the batch writers on it; cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    submissions: Batcher<TaskMessage, Submission>,
    claims: Batcher<ClaimCall, Claim>,
    finishes: Batcher<Finish, Value>,
}

impl Db {
    /// A pool of at most `max_size` connections, connecting lazily, with
    /// batch writers using one each. Call within a tokio runtime.
    pub fn new(url: &str, max_size: usize) -> Result<Db, DbError> {
        let mut config = deadpool_postgres::Config::new();
        config.url = Some(url.to_owned());
        config.connect_timeout = Some(Duration::from_secs(3));
        config.manager = Some(ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        });
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
        let parallel = BATCHES_IN_FLIGHT;
        let submissions = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, parallel, move |tasks| {
                insert_queued_batch(pool.clone(), tasks)
            })
        };
        let claims = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, parallel, move |calls| {
                claim_batch(pool.clone(), calls)
            })
        };
        let finishes = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, parallel, move |finishes| {
                finish_batch(pool.clone(), finishes)
            })
        };
        Ok(Db {
            pool,
            submissions,
            claims,
            finishes,
        })
    }

    /// Applies the migrations that this database has not seen yet.
    pub async fn migrate(&self) -> Result<(), DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        // "relation already exists, skipping" on every start is noise.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS tareas_migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
        for (version, sql) in MIGRATIONS {
            let applied = tx
                .query_opt(
                    "SELECT 1 FROM tareas_migrations WHERE version = $1",
                    &[version],
                )
                .await?;
            if applied.is_none() {
                tx.batch_execute(sql).await?;
                tx.execute(
                    "INSERT INTO tareas_migrations (version) VALUES ($1)",
                    &[version],
                )
                .await?;
                tracing::info!(version, "applied database migration");
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records a submitted task as `queued`, unless its id is known already.
    pub async fn insert_queued(&self, task: &TaskMessage) -> Result<Submission, DbError> {
        self.submissions.call(task.clone()).await
    }

    /// Whether PostgreSQL answers a query now.
    pub async fn ping(&self) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
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
    pub async fn records(
        &self,
        task_ids: &[&str],
    ) -> Result<std::collections::HashMap<String, TaskRecord>, DbError> {
        let client = self.pool.get().await?;
        records_by_id(&client, task_ids).await
    }

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

    /// Removes the row of a submission that RabbitMQ certainly did not take
    /// (the client got `unavailable`), so no `queued` row outlives it —
    /// unless another submission of the same id published it meanwhile
    /// ([`Db::keep_queued`] changed its version).
    pub async fn forget_unpublished(
        &self,
        task_id: &str,
        version: &RowVersion,
    ) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "DELETE FROM tasks
                 WHERE task_id = $1 AND state = 'queued' AND attempts = 0 AND xmin::text = $2",
                &[&task_id, &version.0],
            )
            .await?;
        Ok(())
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
    pub async fn finish(&self, finish: Finish) -> Result<Value, DbError> {
        self.finishes.call(finish).await
    }

    /// The whole row of `task_id` as a JSON document (what S3 stores).
    pub async fn document(&self, task_id: &str) -> Result<Option<Value>, DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT to_jsonb(tasks) FROM tasks WHERE task_id = $1",
                &[&task_id],
            )
            .await?;
        Ok(match row {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }
}

/// One statement for many submissions; ids already known are looked up.
async fn insert_queued_batch(
    pool: Pool,
    tasks: Vec<TaskMessage>,
) -> Result<Vec<Result<Submission, DbError>>, DbError> {
    let client = pool.get().await?;
    let ids: Vec<&str> = tasks.iter().map(|t| t.task_id.as_str()).collect();
    let types: Vec<&str> = tasks.iter().map(|t| t.task_type.as_str()).collect();
    let payloads: Vec<&Value> = tasks.iter().map(|t| &t.payload).collect();
    let statement = client
        .prepare_cached(
            "INSERT INTO tasks (task_id, task_type, payload, state)
             SELECT id, task_type, payload, 'queued' FROM UNNEST($1::text[], $2::text[], $3::jsonb[]) AS u(id, task_type, payload)
             ON CONFLICT (task_id) DO NOTHING
             RETURNING task_id, xmin::text",
        )
        .await?;
    let rows = client.query(&statement, &[&ids, &types, &payloads]).await?;
    let mut inserted: std::collections::HashMap<String, String> = rows
        .iter()
        .map(|row| (row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect();
    let known: Vec<&str> = ids
        .iter()
        .copied()
        .filter(|id| !inserted.contains_key(*id))
        .collect();
    let existing = records_by_id(&client, &known).await?;
    let answers = tasks
        .iter()
        .map(|task| {
            let id = task.task_id.as_str();
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

/// One statement per kind of delivery for many claims; ids already taken or
/// repeated within the batch are looked up.
async fn claim_batch(
    pool: Pool,
    calls: Vec<ClaimCall>,
) -> Result<Vec<Result<Claim, DbError>>, DbError> {
    let client = pool.get().await?;
    let mut answers: Vec<Option<Result<Claim, DbError>>> = calls.iter().map(|_| None).collect();
    for redelivered in [false, true] {
        let mut seen = std::collections::HashSet::new();
        // ON CONFLICT DO UPDATE may touch a row once per statement: repeats wait.
        let group: Vec<usize> = (0..calls.len())
            .filter(|&i| {
                calls[i].redelivered == redelivered && seen.insert(calls[i].task.task_id.as_str())
            })
            .collect();
        if group.is_empty() {
            continue;
        }
        let ids: Vec<&str> = group
            .iter()
            .map(|&i| calls[i].task.task_id.as_str())
            .collect();
        let types: Vec<&str> = group
            .iter()
            .map(|&i| calls[i].task.task_type.as_str())
            .collect();
        let payloads: Vec<&Value> = group.iter().map(|&i| &calls[i].task.payload).collect();
        let workers: Vec<&str> = group.iter().map(|&i| calls[i].worker_id.as_str()).collect();
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
                answers[i] = Some(Ok(Claim::Started {
                    attempt: u32::try_from(attempt).unwrap_or(1),
                }));
            }
        }
    }
    let unclaimed: Vec<&str> = calls
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| answer.is_none())
        .map(|(call, _)| call.task.task_id.as_str())
        .collect();
    let rows = records_by_id(&client, &unclaimed).await?;
    Ok(calls
        .iter()
        .zip(answers)
        .map(|(call, answer)| {
            answer.unwrap_or_else(|| {
                let terminal = rows
                    .get(call.task.task_id.as_str())
                    .is_some_and(|record| record.state.is_terminal());
                Ok(if terminal {
                    Claim::Finished
                } else {
                    Claim::RunningElsewhere
                })
            })
        })
        .collect())
}

/// One statement for many finishes; rows finished before are read back.
async fn finish_batch(
    pool: Pool,
    finishes: Vec<Finish>,
) -> Result<Vec<Result<Value, DbError>>, DbError> {
    let client = pool.get().await?;
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
    Ok(ids
        .iter()
        .map(|id| {
            documents
                .get(*id)
                .cloned()
                .ok_or_else(|| DbError::Batch(format!("task {id} has no row to finish")))
        })
        .collect())
}

/// The rows of `ids` (one query), by task id.
async fn records_by_id(
    client: &deadpool_postgres::Client,
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
fn record(task_id: &str, row: &tokio_postgres::Row) -> Result<TaskRecord, DbError> {
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
