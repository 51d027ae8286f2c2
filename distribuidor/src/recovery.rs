//! Results lost in transit while the RabbitMQ link was down.
//!
//! A worker stores a result in PostgreSQL before it sends it to this
//! distribuidor's reply queue. A result sent while the link (or RabbitMQ)
//! was down never arrives, and the client waiting for it would wait
//! forever. So each time the link comes up, after the reply queue is
//! consumed again, the tasks still awaited are looked up in PostgreSQL
//! and those already finished are pushed from there. A result that arrives
//! both ways is pushed once: the router forgets a task at its first result.
//!
//! When a reconnect had to give the reply queue another name (RabbitMQ
//! still held the old one, see [`crate::broker`]), results of the tasks
//! accepted before go on to the old name and never arrive: those tasks, the
//! orphans, are looked up every [`ORPHAN_SWEEP`] until each has finished.

use std::sync::Arc;
use std::time::Duration;

use tareas_common::backoff::{retry_until_ok, POSTGRES};
use tareas_common::db::Db;
use tareas_common::task::TaskKey;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::intake::report_from_record;
use crate::router::Router;

/// Most task ids looked up in one query.
const CHUNK: usize = 1000;

/// How often the orphans are looked up.
pub const ORPHAN_SWEEP: Duration = Duration::from_secs(2);

/// Sweeps after every connect of `broker`, and the orphans every
/// [`ORPHAN_SWEEP`], until `shutdown`.
pub async fn run(broker: Broker, router: Arc<Router>, db: Db, shutdown: CancellationToken) {
    let mut connects = broker.connects();
    let mut renames = broker.renames();
    let mut orphans: Vec<TaskKey> = Vec::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = connects.changed() => {
                if changed.is_err() {
                    return;
                }
                // Counted before the connect it belongs to, so several
                // reconnects seen as one change still show their renames.
                if broker.renames() != renames {
                    renames = broker.renames();
                    orphans = router.waiting();
                }
                let pushed = sweep(&router, &db, &shutdown).await;
                if pushed > 0 {
                    tracing::info!(
                        pushed,
                        "pushed results that finished while the RabbitMQ link was down"
                    );
                }
            }
            () = tokio::time::sleep(ORPHAN_SWEEP), if !orphans.is_empty() => {
                orphans.retain(|key| router.is_waiting(key));
                sweep_these(&router, &db, &orphans, &shutdown).await;
            }
        }
    }
}

/// Pushes the stored result of every awaited task that has finished;
/// returns how many were pushed.
pub async fn sweep(router: &Router, db: &Db, shutdown: &CancellationToken) -> usize {
    sweep_these(router, db, &router.waiting(), shutdown).await
}

/// [`sweep`] of the tasks `waiting` only.
async fn sweep_these(
    router: &Router,
    db: &Db,
    waiting: &[TaskKey],
    shutdown: &CancellationToken,
) -> usize {
    let mut pushed = 0;
    for chunk in waiting.chunks(CHUNK) {
        let ids: Vec<&str> = chunk.iter().map(|id| id.as_str()).collect();
        let Some(mut records) = retry_until_ok(&POSTGRES, shutdown, || db.records(&ids)).await
        else {
            return pushed;
        };
        for task_id in chunk {
            let Some(record) = records.remove(task_id.as_str()) else {
                continue;
            };
            if record.state.is_terminal() && router.deliver(report_from_record(task_id, record)) > 0
            {
                pushed += 1;
            }
        }
    }
    pushed
}
