//! The dashboard's reads: finished tasks per 30 s over the last 15 minutes
//! by outcome, and end-to-end percentiles of the last 5 minutes.

use super::{Db, DbError};

/// Width of one bucket of the throughput chart, seconds.
pub const BUCKET_SECS: i64 = 30;

/// What the overview shows of the `tasks` table.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overview {
    /// (bucket start, seconds since the epoch; succeeded; failed), oldest
    /// first, every bucket of the last 15 minutes (empty ones too).
    pub buckets: Vec<(i64, i64, i64)>,
    /// End to end (received → finished), seconds, over the last 5 minutes.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    /// Tasks queued and running now.
    pub queued: i64,
    pub running: i64,
}

impl Db {
    /// The overview's figures for work queue `queue`.
    pub async fn overview(&self, queue: &str) -> Result<Overview, DbError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "WITH latest AS (
                     SELECT (floor(extract(epoch FROM now())::float8 / $1::int8) * $1::int8)::int8 AS b)
                 SELECT s.bucket,
                        count(t.*) FILTER (WHERE t.state = 'succeeded'),
                        count(t.*) FILTER (WHERE t.state = 'failed')
                 FROM latest, generate_series(latest.b - 29 * $1::int8, latest.b, $1::int8) AS s(bucket)
                 LEFT JOIN tasks t ON t.finished_at >= to_timestamp(s.bucket)
                                  AND t.finished_at < to_timestamp(s.bucket + $1::int8)
                                  AND t.queue = $2
                 GROUP BY s.bucket ORDER BY s.bucket",
                &[&BUCKET_SECS, &queue],
            )
            .await?;
        let buckets = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)))
            .collect::<Result<Vec<_>, DbError>>()?;
        let latency = client
            .query_one(
                "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))::float8,
                        percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at))::float8
                 FROM tasks WHERE finished_at > now() - interval '5 minutes' AND queue = $1",
                &[&queue],
            )
            .await?;
        let counts = client
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = 'running')
                 FROM tasks WHERE state IN ('queued', 'running') AND queue = $1",
                &[&queue],
            )
            .await?;
        Ok(Overview {
            buckets,
            p50: latency.try_get(0)?,
            p99: latency.try_get(1)?,
            queued: counts.try_get(0)?,
            running: counts.try_get(1)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_db;

    #[tokio::test]
    async fn the_overview_has_every_bucket_of_fifteen_minutes() {
        let db = test_db().await;
        let overview = db.overview("a-queue-nobody-uses").await.expect("overview");
        assert_eq!(overview.buckets.len(), 30);
        assert!(overview
            .buckets
            .windows(2)
            .all(|w| w[1].0 - w[0].0 == super::BUCKET_SECS));
        assert_eq!(
            (overview.queued, overview.running, overview.p50),
            (0, 0, None)
        );
    }
}
