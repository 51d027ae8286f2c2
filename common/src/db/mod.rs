//! The `tasks` table: the pool, the batch writers, and every statement
//! Tareas runs against it, split by caller:
//!
//! - `migrate`: the schema, applied at start-up by every process.
//! - `submit`: the distribuidor's statements (record a submission, status).
//! - `run`: the worker's statements (claim, retry, release, finish).
//! - `outbox`: the distribuidor's relay of rows whose publish was never confirmed.
//! - `admin`: the operator's (`cliente dlq replay`).
//! - `api`: the HTTP API's listing, and finished-task notifications.
//! - `workers`: the workers' own rows, for the dashboard.
//! - `dashboard`: the overview's throughput and latency figures.
//! - `retention`: removing finished tasks past `TAREAS_RESULT_TTL`, with tombstones.
//! - `rows`: the typed rows they return.
//! - `batch`: the group-commit writer behind the hot writes.
//!
//! Writes are idempotent by `task_id`, and a row in a terminal state
//! (`succeeded`, `failed`) is never changed again: that is what makes a
//! redelivered message harmless. The hot writes (recording a submission,
//! claiming, finishing) go through batch writers: concurrent calls share
//! one statement and one commit.

mod admin;
mod api;
mod batch;
mod dashboard;
mod migrate;
mod outbox;
mod retention;
mod rows;
mod run;
mod submit;
mod workers;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime, Timeouts};
use tokio_postgres::NoTls;

pub use self::api::{Listing, Scope};
use self::batch::Batcher;
pub use self::dashboard::{Overview, BUCKET_SECS};
pub use self::outbox::{Orphans, OWNER_ALIVE};
pub use self::rows::{TaskRecord, TaskRow};
use self::run::ClaimCall;
pub use self::run::{Claim, Finish};
pub use self::submit::{Origin, RowVersion, Submission};
pub use self::workers::{WorkerRow, GONE_AFTER_SECS};

/// Most rows in one batched statement.
const MAX_BATCH: usize = 256;

/// Statements of one kind in flight at once. One: the next batch grows
/// while the current one commits, so batches get bigger exactly when the
/// database is slower. Measured against four on the bench: half the
/// commits and half PostgreSQL's CPU per task, ack latency p99 at 600/s
/// 17–18 ms instead of 35–86, throughput the same or better
/// (docs/performance.md).
const BATCHES_IN_FLIGHT: usize = 1;

/// A database failure.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("PostgreSQL connection unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("PostgreSQL query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("invalid DATABASE_URL: {0}")]
    Config(String),
    /// The batch this call was part of failed; the cause is shared by every
    /// call of the batch, and kept (a pool timeout is not a constraint error).
    #[error("PostgreSQL batch write failed: {0}")]
    Batch(#[source] Arc<DbError>),
    #[error("the batch writer stopped")]
    BatchWriterGone,
    #[error("task {task_id} has no row to finish")]
    NoRow { task_id: String },
    #[error("row for task {task_id} holds unknown state {state:?}")]
    Corrupt { task_id: String, state: String },
    #[error("row for task {task_id} cannot be read: {cause}")]
    Unreadable { task_id: String, cause: String },
}

impl DbError {
    /// The error itself, or the cause of the batch it failed with.
    pub fn root(&self) -> &DbError {
        match self {
            DbError::Batch(cause) => cause.root(),
            other => other,
        }
    }

    /// Whether PostgreSQL refused the data of a row (SQLSTATE class 22,
    /// data exception, or 23, integrity constraint violation), as opposed to
    /// being away: retrying the same row cannot help, and other rows of
    /// the same batch are not at fault.
    pub fn is_data_error(&self) -> bool {
        match self.root() {
            DbError::Query(err) => err
                .code()
                .is_some_and(|state| matches!(&state.code()[..2], "22" | "23")),
            DbError::Corrupt { .. } | DbError::Unreadable { .. } | DbError::NoRow { .. } => true,
            _ => false,
        }
    }
}

/// A pool of PostgreSQL connections and the batch writers on it; cheap to clone.
#[derive(Clone)]
pub struct Db {
    pool: Pool,
    /// For connections outside the pool (`LISTEN`).
    url: Arc<str>,
    submissions: Batcher<submit::SubmitCall, Submission>,
    claims: Batcher<ClaimCall, Claim>,
    finishes: Batcher<Finish, TaskRow>,
    published: Batcher<String, ()>,
}

impl Db {
    /// A pool of at most `max_size` connections, connecting lazily, with
    /// batch writers using one each. Call within a tokio runtime.
    pub fn new(url: &str, max_size: usize) -> Result<Db, DbError> {
        let pool = pool(url, max_size)?;
        let submissions = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, BATCHES_IN_FLIGHT, move |calls| {
                submit::insert_queued_batch(pool.clone(), calls)
            })
        };
        let claims = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, BATCHES_IN_FLIGHT, move |calls| {
                run::claim_batch(pool.clone(), calls)
            })
        };
        let finishes = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, BATCHES_IN_FLIGHT, move |finishes| {
                run::finish_batch(pool.clone(), finishes)
            })
        };
        let published = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, BATCHES_IN_FLIGHT, move |ids| {
                outbox::mark_published_batch(pool.clone(), ids)
            })
        };
        Ok(Db {
            pool,
            url: url.into(),
            submissions,
            claims,
            finishes,
            published,
        })
    }

    /// Whether PostgreSQL answers a query now.
    pub async fn ping(&self) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }
}

/// The pool behind [`Db::new`]: lazy connections, short timeouts, so that a
/// PostgreSQL that went away makes calls fail fast instead of hang.
fn pool(url: &str, max_size: usize) -> Result<Pool, DbError> {
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
    let created = if requires_tls(url) {
        config.create_pool(Some(Runtime::Tokio1), crate::tls::postgres())
    } else {
        config.create_pool(Some(Runtime::Tokio1), NoTls)
    };
    created.map_err(|err| DbError::Config(err.to_string()))
}

/// `sslmode=require` in `url`: connect with TLS or not at all. Without it
/// (`prefer`, tokio-postgres' default, or `disable`) the connection is
/// plain, as it always was.
pub fn requires_tls(url: &str) -> bool {
    url.parse::<tokio_postgres::Config>()
        .is_ok_and(|config| config.get_ssl_mode() == tokio_postgres::config::SslMode::Require)
}

/// The local database of `scripts/services`, migrated, for the tests of
/// each statement beside it.
#[cfg(test)]
pub(crate) async fn test_db() -> Db {
    let db = Db::new("postgres://postgres@127.0.0.1:5432/tareas", 4).expect("url");
    db.migrate().await.expect(
        "PostgreSQL on 127.0.0.1:5432 with database tareas: start it with `scripts/services`",
    );
    db
}

/// A task message with a fresh id, for tests.
#[cfg(test)]
pub(crate) fn test_task(task_type: &str) -> crate::task::TaskMessage {
    crate::task::TaskMessage {
        task_id: crate::task::TaskId::generate().into(),
        task_type: task_type.to_owned(),
        payload: serde_json::json!({"text": "hola"}),
        notify: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sslmode_require_connects_with_tls() {
        let url = "postgres://postgres@127.0.0.1:5432/tareas?sslmode=require";
        assert!(requires_tls(url) && !requires_tls("postgres://postgres@127.0.0.1/tareas"));
        let db = Db::new(url, 1).expect("url");
        let client = db.pool.get().await.expect(
            "PostgreSQL on 127.0.0.1:5432 with ssl = on (Debian's default, snakeoil certificate)",
        );
        let row = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("pg_stat_ssl");
        assert!(row.get::<_, bool>(0), "the session is encrypted");
    }
}
