//! The outbox relay's statements: a submission's row is written before its
//! publish, so a distribuidor that dies between the two (or a publish whose
//! outcome is unknown) leaves a `queued` row that no message will run. The
//! distribuidor records each confirmed publish and beats a heartbeat; a
//! relay publishes again the rows nobody will.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use super::{Db, DbError};
use crate::task::{TaskKey, TaskMessage};

/// Records confirmed publishes. Whatever the row's state: a worker may
/// have claimed it before the mark lands, and a row that goes back to
/// `queued` for a retry must not look unpublished.
const MARK_PUBLISHED: &str =
    "UPDATE tasks SET published_at = now() WHERE task_id = ANY($1) AND published_at IS NULL";

/// How long a distribuidor counts as alive after its last heartbeat.
pub const OWNER_ALIVE: Duration = Duration::from_secs(15);

/// Which unpublished rows a relay may take.
#[derive(Debug, Clone)]
pub struct Orphans<'a> {
    /// The work queue they were recorded for (a relay republishes only its own).
    pub queue: &'a str,
    /// Rows younger than this are left alone (`TAREAS_ORPHAN_AFTER_SECS`).
    pub older_than: Duration,
    /// A row of a live owner is taken only once older than this (well past
    /// the confirm timeout: its owner is not waiting for it any more).
    pub owner_gave_up_after: Duration,
    /// At most this many per pass.
    pub limit: i64,
}

impl Db {
    /// RabbitMQ confirmed `task_id`'s publish (batched; best effort: a row
    /// left unmarked is only published once more).
    pub async fn mark_published(&self, task_id: &TaskKey) -> Result<(), DbError> {
        self.published.call(task_id.to_string()).await
    }

    /// This distribuidor is alive.
    pub async fn heartbeat(&self, instance: &str) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        client
            .execute(
                "INSERT INTO distribuidores (instance, seen_at) VALUES ($1, now())
                 ON CONFLICT (instance) DO UPDATE SET seen_at = now()",
                &[&instance],
            )
            .await?;
        Ok(())
    }

    /// Takes the orphaned rows (locked, so another relay skips them), hands
    /// each to `publish`, and records those it confirmed; returns how many.
    pub async fn relay_orphans<F, Fut>(
        &self,
        orphans: &Orphans<'_>,
        mut publish: F,
    ) -> Result<usize, DbError>
    where
        F: FnMut(TaskMessage) -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut connection = self.pool.get().await?;
        let transaction = connection.transaction().await?;
        let rows = transaction
            .query(
                "SELECT task_id, task_type, payload FROM tasks t
                 WHERE state = 'queued' AND published_at IS NULL AND worker_id IS NULL
                   AND queue = $1
                   AND created_at < now() - make_interval(secs => $2)
                   AND (owner IS NULL
                        OR created_at < now() - make_interval(secs => $3)
                        OR NOT EXISTS (SELECT 1 FROM distribuidores d
                                       WHERE d.instance = t.owner
                                         AND d.seen_at > now() - make_interval(secs => $4)))
                 ORDER BY created_at
                 LIMIT $5
                 FOR UPDATE SKIP LOCKED",
                &[
                    &orphans.queue,
                    &orphans.older_than.as_secs_f64(),
                    &orphans.owner_gave_up_after.as_secs_f64(),
                    &OWNER_ALIVE.as_secs_f64(),
                    &orphans.limit,
                ],
            )
            .await?;
        let mut published = Vec::new();
        for row in rows {
            let task_id: String = row.try_get(0)?;
            let Ok(id) = TaskKey::parse(&task_id) else {
                continue;
            };
            let task = TaskMessage {
                task_id: id,
                task_type: row.try_get(1)?,
                payload: row.try_get(2)?,
                // Its client never got an ack, and is not waiting here.
                notify: false,
            };
            if publish(task).await {
                published.push(task_id);
            }
        }
        transaction.execute(MARK_PUBLISHED, &[&published]).await?;
        transaction.commit().await?;
        Ok(published.len())
    }
}

/// One statement for many confirmed publishes.
pub(super) async fn mark_published_batch(
    pool: Pool,
    task_ids: Arc<[String]>,
) -> Result<Vec<Result<(), DbError>>, DbError> {
    let client = pool.get().await?;
    let ids: Vec<&str> = task_ids.iter().map(String::as_str).collect();
    client.execute(MARK_PUBLISHED, &[&ids]).await?;
    Ok(task_ids.iter().map(|_| Ok(())).collect())
}

#[cfg(test)]
mod tests {
    use super::super::{test_db, test_task};
    use super::*;

    fn orphans(queue: &str) -> Orphans<'_> {
        Orphans {
            queue,
            older_than: Duration::ZERO,
            owner_gave_up_after: Duration::from_secs(3600),
            limit: 100,
        }
    }

    #[tokio::test]
    async fn only_unconfirmed_rows_of_dead_owners_are_relayed_and_only_once() {
        let db = test_db().await;
        let queue = format!("outbox-{}", uuid::Uuid::new_v4());
        let (alive, dead) = (format!("{queue}-alive"), format!("{queue}-dead"));
        db.heartbeat(&alive).await.expect("heartbeat");
        let [live_row, dead_row, confirmed] = [1, 2, 3].map(|_| test_task("echo"));
        let origin = |owner: &str| super::super::Origin {
            client: "127.0.0.1".into(),
            queue: queue.clone(),
            owner: owner.into(),
        };
        for (task, owner) in [(&live_row, &alive), (&dead_row, &dead), (&confirmed, &dead)] {
            db.insert_queued_from(task, origin(owner))
                .await
                .expect("insert");
        }
        db.mark_published(&confirmed.task_id).await.expect("mark");
        let mut relayed = Vec::new();
        let count = db
            .relay_orphans(&orphans(&queue), |task| {
                relayed.push(task.task_id.clone());
                async { true }
            })
            .await
            .expect("relay");
        assert_eq!(count, 1);
        assert_eq!(relayed, vec![dead_row.task_id.clone()]);
        let again = db
            .relay_orphans(&orphans(&queue), |_| async { true })
            .await
            .expect("relay again");
        assert_eq!(again, 0, "a relayed row is published, not relayed twice");
    }
}
