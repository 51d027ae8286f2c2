//! The `workers` table: each worker renews its row every few seconds; the
//! dashboard reads them.

use super::{Db, DbError};

/// A worker as it reports itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkerRow {
    pub worker_id: String,
    pub host: String,
    pub concurrency: i32,
    /// Tasks finished (`succeeded`) and failed since it started.
    pub done: i64,
    pub failed: i64,
    /// Run slots in use at its last report.
    pub busy: i32,
    /// Seconds since it started, and since its last report.
    pub up_secs: f64,
    pub seen_secs_ago: f64,
}

/// After this long without a report, a worker is shown as gone.
pub const GONE_AFTER_SECS: f64 = 30.0;

impl WorkerRow {
    pub fn alive(&self) -> bool {
        self.seen_secs_ago < GONE_AFTER_SECS
    }
}

impl Db {
    /// Records that worker `row.worker_id` is alive now, with its counts;
    /// `started_unix` is when its process started (seconds since the epoch).
    /// Also removes rows of workers gone for a day.
    pub async fn worker_seen(&self, row: &WorkerRow, started_unix: f64) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO workers (worker_id, host, started_at, concurrency, last_seen, done, failed, busy)
                 VALUES ($1, $2, to_timestamp($3), $4, now(), $5, $6, $7)
                 ON CONFLICT (worker_id) DO UPDATE SET host = $2, started_at = to_timestamp($3),
                     concurrency = $4, last_seen = now(), done = $5, failed = $6, busy = $7",
                &[
                    &row.worker_id,
                    &row.host,
                    &started_unix,
                    &row.concurrency,
                    &row.done,
                    &row.failed,
                    &row.busy,
                ],
            )
            .await?;
        client
            .execute(
                "DELETE FROM workers WHERE last_seen < now() - interval '1 day'",
                &[],
            )
            .await?;
        Ok(())
    }

    /// Every recorded worker, alive first, then by id.
    pub async fn workers(&self) -> Result<Vec<WorkerRow>, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT worker_id, host, concurrency, done, failed, busy,
                        extract(epoch FROM now() - started_at)::float8,
                        extract(epoch FROM now() - last_seen)::float8
                 FROM workers ORDER BY last_seen < now() - interval '30 seconds', worker_id",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(WorkerRow {
                    worker_id: row.try_get(0)?,
                    host: row.try_get(1)?,
                    concurrency: row.try_get(2)?,
                    done: row.try_get(3)?,
                    failed: row.try_get(4)?,
                    busy: row.try_get(5)?,
                    up_secs: row.try_get(6)?,
                    seen_secs_ago: row.try_get(7)?,
                })
            })
            .collect()
    }
}
