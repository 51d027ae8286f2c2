//! The schema: migrations applied once per database, by whichever process
//! starts first.

use super::{Db, DbError};

/// The migrations, in order. Each runs once per database, inside one
/// transaction holding an advisory lock, so processes starting together
/// do not race.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../../migrations/0001_tasks.sql")),
    (2, include_str!("../../migrations/0002_client_queue.sql")),
    (3, include_str!("../../migrations/0003_outbox.sql")),
    (4, include_str!("../../migrations/0004_http_api.sql")),
    (5, include_str!("../../migrations/0005_workers.sql")),
    (6, include_str!("../../migrations/0006_retention.sql")),
];

/// Key of the advisory lock held while migrating.
const MIGRATION_LOCK: i64 = 0x7461_7265_6173;

impl Db {
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
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn migrating_twice_changes_nothing() {
        let db = super::super::test_db().await;
        db.migrate().await.expect("second migration is a no-op");
        let client = db.pool.get().await.expect("connection");
        let applied: i64 = client
            .query_one("SELECT count(*) FROM tareas_migrations", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(applied, super::MIGRATIONS.len() as i64);
    }
}
