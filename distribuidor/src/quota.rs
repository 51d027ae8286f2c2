//! The per-client quota: how many tasks one client (one peer address) may
//! have queued or running on the work queue, `TAREAS_MAX_OUTSTANDING_PER_CLIENT`.
//!
//! The count comes from PostgreSQL (the `client` and `queue` of each row),
//! so it holds across distribuidor replicas and restarts. Each process keeps
//! it for a second and counts its own admissions on top, so a client that
//! pipelines cannot slip past the limit between two reads; across replicas
//! the count is as fresh as that second.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tareas_common::db::{Db, DbError};

/// How long a count read from PostgreSQL is used before it is read again.
const FRESH_FOR: Duration = Duration::from_secs(1);

/// Entries kept before the stale ones are dropped.
const MAX_CLIENTS: usize = 10_000;

/// The quota of one work queue.
pub struct Quota {
    /// Most tasks queued or running per client; 0: no limit.
    limit: u64,
    queue: String,
    counts: Mutex<HashMap<String, Count>>,
}

/// A client's count: as PostgreSQL said at `read_at`, plus admissions since.
struct Count {
    outstanding: u64,
    read_at: Instant,
}

impl Quota {
    pub fn new(limit: u64, queue: impl Into<String>) -> Quota {
        Quota {
            limit,
            queue: queue.into(),
            counts: Mutex::new(HashMap::new()),
        }
    }

    /// The work queue this quota counts.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Takes one place for `client` if it has one: `Ok(false)` when it is
    /// at its limit. A place taken for a task that is then not recorded as
    /// new is given back with [`Quota::release`].
    pub async fn admit(&self, db: &Db, client: &str) -> Result<bool, DbError> {
        if self.limit == 0 {
            return Ok(true);
        }
        let fresh = self
            .lock()
            .get(client)
            .is_some_and(|count| count.read_at.elapsed() < FRESH_FOR);
        if !fresh {
            let asked = Instant::now();
            let outstanding = db.outstanding(client, &self.queue).await?;
            let mut counts = self.lock();
            if counts.len() >= MAX_CLIENTS {
                counts.retain(|_, count| count.read_at.elapsed() < FRESH_FOR);
            }
            // A count read (and added to) since this one was asked for wins:
            // concurrent requests of one client must not reset each other.
            let newer = counts
                .get(client)
                .is_some_and(|count| count.read_at >= asked);
            if !newer {
                let read_at = Instant::now();
                counts.insert(
                    client.to_owned(),
                    Count {
                        outstanding,
                        read_at,
                    },
                );
            }
        }
        let mut counts = self.lock();
        let Some(count) = counts.get_mut(client) else {
            return Ok(true);
        };
        if count.outstanding >= self.limit {
            return Ok(false);
        }
        count.outstanding += 1;
        Ok(true)
    }

    /// Gives back a place [`Quota::admit`] took.
    pub fn release(&self, client: &str) {
        if let Some(count) = self.lock().get_mut(client) {
            count.outstanding = count.outstanding.saturating_sub(1);
        }
    }

    /// The limit, for messages.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Count>> {
        // A panic while holding this lock cannot leave a count inconsistent.
        self.counts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
