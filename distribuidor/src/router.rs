//! Routes finished-task reports to the connections waiting for them.
//!
//! A connection subscribes to a task before publishing it, so a result can
//! never arrive before its subscriber. Delivery never blocks: a connection
//! whose queue of pushes is full misses the push (the result stays
//! available through a status request), and one slow client cannot hold up
//! the others.

use std::collections::HashMap;
use std::sync::Mutex;

use tareas_common::task::{TaskId, TaskReport};
use tokio::sync::mpsc;

/// Identifies one client connection.
pub type ConnectionId = u64;

/// Where results for one connection go.
pub type ResultSender = mpsc::Sender<TaskReport>;

/// task id → the connections that want its result.
#[derive(Default)]
pub struct Router {
    subscribers: Mutex<HashMap<TaskId, Vec<(ConnectionId, ResultSender)>>>,
}

impl Router {
    pub fn new() -> Router {
        Router::default()
    }

    /// `connection` wants the result of `task_id`, sent to `sender`.
    pub fn subscribe(&self, task_id: &TaskId, connection: ConnectionId, sender: &ResultSender) {
        let mut subscribers = self.lock();
        let entry = subscribers.entry(task_id.clone()).or_default();
        if !entry.iter().any(|(id, _)| *id == connection) {
            entry.push((connection, sender.clone()));
        }
    }

    /// `connection` no longer wants `task_id` (it closed, or the task was refused).
    pub fn unsubscribe(&self, task_id: &TaskId, connection: ConnectionId) {
        let mut subscribers = self.lock();
        if let Some(entry) = subscribers.get_mut(task_id) {
            entry.retain(|(id, _)| *id != connection);
            if entry.is_empty() {
                subscribers.remove(task_id);
            }
        }
    }

    /// Hands `report` to every subscriber of its task; returns how many got it.
    pub fn deliver(&self, report: TaskReport) -> usize {
        let entry = {
            let mut subscribers = self.lock();
            let entry = subscribers.remove(&report.task_id);
            shrink(&mut subscribers);
            entry
        };
        let Some(entry) = entry else {
            return 0;
        };
        let mut delivered = 0;
        for (connection, sender) in entry {
            match sender.try_send(report.clone()) {
                Ok(()) => delivered += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(connection, task_id = %report.task_id, "client is not reading its results; push dropped, the result stays available by status");
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        delivered
    }

    /// The tasks that have subscribers.
    pub fn waiting(&self) -> Vec<TaskId> {
        self.lock().keys().cloned().collect()
    }

    /// How many tasks have subscribers (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<TaskId, Vec<(ConnectionId, ResultSender)>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Gives memory back after a burst: a map never stays four times larger
/// than what it holds.
pub fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tareas_common::task::TaskState;

    fn report(id: &TaskId) -> TaskReport {
        TaskReport {
            task_id: id.clone(),
            status: TaskState::Succeeded,
            result: None,
            error: None,
            worker_id: None,
            duration_ms: None,
        }
    }

    #[test]
    fn delivers_once_to_each_subscriber() {
        let router = Router::new();
        let id = TaskId::generate();
        let (a, mut a_rx) = mpsc::channel(4);
        let (b, mut b_rx) = mpsc::channel(4);
        router.subscribe(&id, 1, &a);
        router.subscribe(&id, 1, &a);
        router.subscribe(&id, 2, &b);
        assert_eq!(router.deliver(report(&id)), 2);
        assert_eq!(router.deliver(report(&id)), 0);
        assert!(a_rx.try_recv().is_ok() && a_rx.try_recv().is_err());
        assert!(b_rx.try_recv().is_ok());
        assert!(router.is_empty());
    }

    #[test]
    fn a_full_client_does_not_block() {
        let router = Router::new();
        let (tx, _rx) = mpsc::channel(1);
        let first = TaskId::generate();
        let second = TaskId::generate();
        router.subscribe(&first, 1, &tx);
        router.subscribe(&second, 1, &tx);
        assert_eq!(router.deliver(report(&first)), 1);
        assert_eq!(router.deliver(report(&second)), 0);
        router.subscribe(&first, 1, &tx);
        router.unsubscribe(&first, 1);
        assert!(router.is_empty());
    }
}
