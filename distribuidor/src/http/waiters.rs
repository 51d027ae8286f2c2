//! Long polls: `GET /tasks/<id>?wait=` waits for its task's notification
//! (any distribuidor's listener hears every task finish, through
//! PostgreSQL's `LISTEN tareas_finished`), with a bounded fallback: it
//! looks at the row again every few seconds in case a notification was
//! lost while the listening connection was down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// How often a waiting request looks at its row without a notification.
pub const FALLBACK: Duration = Duration::from_secs(5);

/// task key → the requests waiting for it.
#[derive(Default)]
pub struct Waiters {
    waiting: Mutex<HashMap<String, (Arc<Notify>, usize)>>,
}

/// One request's registration; removes itself when dropped.
pub struct Waiting<'a> {
    waiters: &'a Waiters,
    key: String,
    /// Woken when the task finishes, or when notifications may have been lost.
    pub notify: Arc<Notify>,
}

impl Waiters {
    /// Registers a request waiting for `key`.
    pub fn wait(&self, key: &str) -> Waiting<'_> {
        let mut waiting = self.lock();
        let entry = waiting
            .entry(key.to_owned())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Waiting {
            waiters: self,
            key: key.to_owned(),
            notify: entry.0.clone(),
        }
    }

    /// The task `key` finished: wakes its waiters.
    pub fn finished(&self, key: &str) {
        if let Some((notify, _)) = self.lock().get(key) {
            notify.notify_waiters();
        }
    }

    /// Notifications may have been lost: wakes every waiter to look again.
    pub fn wake_all(&self) {
        for (notify, _) in self.lock().values() {
            notify.notify_waiters();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Arc<Notify>, usize)>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.waiters.lock();
        if let Some(entry) = waiting.get_mut(&self.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                waiting.remove(&self.key);
            }
        }
    }
}
