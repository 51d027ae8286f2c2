//! The outbox relay: nothing stays `queued` for ever.
//!
//! A submission is recorded before it is published, and its publish is
//! recorded once RabbitMQ confirms it. A distribuidor killed between the two,
//! or a publish whose outcome is unknown (`uncertain`), leaves a row that no
//! message will run. Every distribuidor beats a heartbeat and, every few
//! seconds, publishes the rows of its work queue that are older than
//! `TAREAS_ORPHAN_AFTER_SECS`, have no confirmed publish, and whose owner is
//! gone (or is long past waiting for its confirm). The rows are locked
//! while they are published (`FOR UPDATE SKIP LOCKED`), so relays of several
//! replicas never take the same row; a publish twice over is harmless in
//! any case, as a task runs once whatever how often it is delivered.

use std::time::Duration;

use tareas_common::amqp::CONFIRM_TIMEOUT;
use tareas_common::db::{Db, Orphans, OWNER_ALIVE};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;

/// Rows one pass takes at most (they stay locked while it publishes them).
const BATCH: i64 = 100;

/// What the relay of one distribuidor works with.
pub struct Relay {
    pub db: Db,
    pub broker: Broker,
    /// This process, whose heartbeat says it is alive.
    pub instance: String,
    /// The work queue whose rows it relays.
    pub queue: String,
    /// `TAREAS_ORPHAN_AFTER_SECS`.
    pub orphan_after: Duration,
}

/// Beats and relays until `shutdown`.
pub async fn run(relay: Relay, shutdown: CancellationToken) {
    // Often enough to keep the heartbeat fresh and to find an orphan soon
    // after its time; never busier than once a second.
    let every = (relay.orphan_after / 2).clamp(Duration::from_secs(1), OWNER_ALIVE / 3);
    // The heartbeat beats on its own, so a long pass never makes this
    // process look dead to the other replicas.
    let beating = heartbeat(relay.db.clone(), relay.instance.clone(), shutdown.clone());
    tokio::spawn(beating);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // RabbitMQ away: the next tick tries again (the submissions' own
        // path logs the outage).
        if !relay.broker.is_connected() {
            continue;
        }
        match pass(&relay).await {
            Ok(0) => {}
            Ok(published) => tracing::info!(
                published,
                "published tasks recorded but never confirmed (their distribuidor died, or the outcome was uncertain)"
            ),
            Err(err) => tracing::debug!(cause = %err, "outbox relay pass failed; retrying"),
        }
    }
}

/// Says this process is alive, every few seconds, until `shutdown`.
async fn heartbeat(db: Db, instance: String, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(OWNER_ALIVE / 5);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // PostgreSQL away: the next beat tries again.
        let _ = db.heartbeat(&instance).await;
    }
}

async fn pass(relay: &Relay) -> Result<usize, tareas_common::db::DbError> {
    let orphans = Orphans {
        queue: &relay.queue,
        older_than: relay.orphan_after,
        // A live owner waits for a confirm at most CONFIRM_TIMEOUT.
        owner_gave_up_after: relay.orphan_after.max(3 * CONFIRM_TIMEOUT),
        limit: BATCH,
    };
    let broker = &relay.broker;
    relay
        .db
        .relay_orphans(&orphans, |task| async move {
            broker.publish(&task).await.is_ok()
        })
        .await
}
