//! Routes finished-task reports to the connections waiting for them.
//!
//! A connection subscribes to a task before publishing it, so a result can
//! never arrive before its subscriber. Delivery never blocks: each result
//! is serialized once, as the line the client receives, and queued for the
//! connection, which counts the bytes it holds. A push that would take a
//! connection past its byte budget (`TAREAS_MAX_CONNECTION_OUTPUT_BYTES`)
//! is not queued: the connection is marked a slow consumer and closes with
//! `slow_consumer`, so one client that does not read cannot make the
//! distribuidor hold its results, and none is dropped without a word (every
//! result stays available through `status`). The bytes also count
//! against the pool all connections share ([`Memory`]): when it is full, a
//! connection that already holds results is closed the same way, while one
//! that holds none (a client that reads) still gets its next result.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tareas_common::protocol::Reply;
use tareas_common::task::{TaskKey, TaskReport};
use tokio::sync::{mpsc, Notify};

use crate::memory::Memory;

/// Identifies one client connection.
pub type ConnectionId = u64;

/// A result on its way to one connection: its task, and the line to write.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub task_id: TaskKey,
    pub line: Bytes,
}

/// Where results for one connection go; cheap to clone.
#[derive(Clone)]
pub struct ResultSender {
    tx: mpsc::UnboundedSender<Pushed>,
    budget: Arc<Budget>,
}

/// The bytes one connection holds for its client, and its limit.
pub struct Budget {
    /// Bytes of pushed results queued and not yet written.
    queued: AtomicUsize,
    max: usize,
    /// A push did not fit: the connection must close as a slow consumer.
    overflowed: AtomicBool,
    overflow: Notify,
    /// The pool the bytes also count against.
    memory: Arc<Memory>,
}

impl Budget {
    /// A result of `bytes` was written (or dropped with the connection).
    pub fn release(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::Relaxed);
        self.memory.release(bytes);
    }

    /// Waits until a push did not fit.
    pub async fn overflowed(&self) {
        loop {
            let notified = self.overflow.notified();
            if self.overflowed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn take(&self, bytes: usize) -> bool {
        let before = self.queued.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.max || !self.memory.take(bytes, before) {
            self.queued.fetch_sub(bytes, Ordering::Relaxed);
            self.overflowed.store(true, Ordering::Release);
            self.overflow.notify_waiters();
            return false;
        }
        true
    }
}

impl Drop for Budget {
    /// Results still queued are dropped with the connection's queue.
    fn drop(&mut self) {
        self.memory.release(*self.queued.get_mut());
    }
}

/// A connection's end of its result queue: the receiver and its budget.
pub fn result_queue(
    max_bytes: usize,
    memory: Arc<Memory>,
) -> (ResultSender, mpsc::UnboundedReceiver<Pushed>, Arc<Budget>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let budget = Arc::new(Budget {
        queued: AtomicUsize::new(0),
        max: max_bytes,
        overflowed: AtomicBool::new(false),
        overflow: Notify::new(),
        memory,
    });
    let sender = ResultSender {
        tx,
        budget: budget.clone(),
    };
    (sender, rx, budget)
}

impl ResultSender {
    /// Queues `pushed` within the budget; `false` if it did not fit (the
    /// connection is then closing) or the connection is gone.
    fn push(&self, pushed: Pushed) -> bool {
        let bytes = pushed.line.len();
        if !self.budget.take(bytes) {
            return false;
        }
        if self.tx.send(pushed).is_err() {
            self.budget.release(bytes);
            return false;
        }
        true
    }
}

/// task id → the connections that want its result.
#[derive(Default)]
pub struct Router {
    subscribers: Mutex<HashMap<TaskKey, Vec<(ConnectionId, ResultSender)>>>,
}

impl Router {
    pub fn new() -> Router {
        Router::default()
    }

    /// `connection` wants the result of `task_id`, sent to `sender`.
    pub fn subscribe(&self, task_id: &TaskKey, connection: ConnectionId, sender: &ResultSender) {
        let mut subscribers = self.lock();
        let entry = subscribers.entry(task_id.clone()).or_default();
        if !entry.iter().any(|(id, _)| *id == connection) {
            entry.push((connection, sender.clone()));
        }
    }

    /// `connection` no longer wants `task_id` (it closed, or the task was refused).
    pub fn unsubscribe(&self, task_id: &TaskKey, connection: ConnectionId) {
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
        let task_id = report.task_id.clone();
        let line = Bytes::from(Reply::Result(report.for_its_client()).to_line());
        let mut delivered = 0;
        for (connection, sender) in entry {
            let pushed = Pushed {
                task_id: task_id.clone(),
                line: line.clone(),
            };
            if sender.push(pushed) {
                delivered += 1;
            } else {
                tracing::debug!(connection, task_id = %task_id, "push over the connection's output budget; it closes as a slow consumer");
            }
        }
        delivered
    }

    /// The tasks that have subscribers.
    pub fn waiting(&self) -> Vec<TaskKey> {
        self.lock().keys().cloned().collect()
    }

    /// Whether `task_id` has subscribers.
    pub fn is_waiting(&self, task_id: &TaskKey) -> bool {
        self.lock().contains_key(task_id)
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
    ) -> std::sync::MutexGuard<'_, HashMap<TaskKey, Vec<(ConnectionId, ResultSender)>>> {
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
    use tareas_common::task::{TaskId, TaskState};

    fn report(id: &TaskKey) -> TaskReport {
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
        let id = TaskKey::from(TaskId::generate());
        let memory = Arc::new(Memory::new(1 << 20));
        let (a, mut a_rx, _) = result_queue(1 << 20, memory.clone());
        let (b, mut b_rx, _) = result_queue(1 << 20, memory);
        router.subscribe(&id, 1, &a);
        router.subscribe(&id, 1, &a);
        router.subscribe(&id, 2, &b);
        assert_eq!(router.deliver(report(&id)), 2);
        assert_eq!(router.deliver(report(&id)), 0);
        assert!(a_rx.try_recv().is_ok() && a_rx.try_recv().is_err());
        assert!(b_rx.try_recv().is_ok());
        assert!(router.is_empty());
    }

    #[tokio::test]
    async fn a_push_past_the_budget_marks_a_slow_consumer_and_never_blocks() {
        let router = Router::new();
        let line_len = Reply::Result(report(&TaskKey::parse("a").unwrap()))
            .to_line()
            .len();
        let memory = Arc::new(Memory::new(1 << 20));
        let (tx, mut rx, budget) = result_queue(line_len + line_len / 2, memory.clone());
        let first = TaskKey::parse("a").unwrap();
        let second = TaskKey::parse("b").unwrap();
        router.subscribe(&first, 1, &tx);
        router.subscribe(&second, 1, &tx);
        assert_eq!(router.deliver(report(&first)), 1);
        assert_eq!(router.deliver(report(&second)), 0, "over the budget");
        tokio::time::timeout(std::time::Duration::from_secs(1), budget.overflowed())
            .await
            .expect("the connection learns it overflowed");
        let pushed = rx.try_recv().expect("the first is queued");
        assert_eq!(memory.used(), line_len);
        budget.release(pushed.line.len());
        assert_eq!(memory.used(), 0);
        router.subscribe(&first, 1, &tx);
        router.unsubscribe(&first, 1);
        assert!(router.is_empty());
    }

    #[tokio::test]
    async fn a_full_pool_closes_a_holder_and_still_serves_a_reader() {
        let router = Router::new();
        let ids: Vec<TaskKey> = ["a", "b", "c"].map(|id| TaskKey::parse(id).unwrap()).into();
        let line_len = Reply::Result(report(&ids[0])).to_line().len();
        // Room in the pool for one line; each connection could hold ten.
        let memory = Arc::new(Memory::new(line_len));
        let (holder, _holder_rx, holder_budget) = result_queue(10 * line_len, memory.clone());
        let (reader, mut reader_rx, _) = result_queue(10 * line_len, memory.clone());
        router.subscribe(&ids[0], 1, &holder);
        router.subscribe(&ids[1], 1, &holder);
        router.subscribe(&ids[2], 2, &reader);
        assert_eq!(router.deliver(report(&ids[0])), 1, "fits in the pool");
        assert_eq!(router.deliver(report(&ids[1])), 0, "the pool is full");
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            holder_budget.overflowed(),
        )
        .await
        .expect("the holder closes as a slow consumer");
        assert_eq!(
            router.deliver(report(&ids[2])),
            1,
            "the reader holds nothing"
        );
        assert!(reader_rx.try_recv().is_ok());
        assert_eq!(memory.used(), 2 * line_len, "neither line is written yet");
        drop((holder, holder_budget, reader));
        assert_eq!(memory.used(), 0, "closed connections give their bytes back");
    }
}
