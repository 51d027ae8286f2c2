//! The bytes all connections together may hold for their clients
//! (`TAREAS_MAX_BUFFERED_BYTES`): read buffers, requests in progress, and
//! results queued and not yet written.
//!
//! Each connection has its own limits as well; this pool is what keeps
//! many connections (up to `TAREAS_MAX_CONNECTIONS`) within one stated
//! bound. The rule when it is full is the one that protects the clients
//! that behave: a connection that holds nothing from the pool may always
//! take its next read chunk or its next result (a client that reads its
//! replies holds nothing between them), while one that already holds bytes
//! waits (its reads stop, and its message deadline keeps running) or, for
//! a result, is closed as a slow consumer.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The shared pool; one per distribuidor.
pub struct Memory {
    used: AtomicUsize,
    max: usize,
    /// A connection waits for bytes to be given back.
    starved: AtomicBool,
    freed: Notify,
}

impl Memory {
    pub fn new(max: usize) -> Memory {
        Memory {
            used: AtomicUsize::new(0),
            max,
            starved: AtomicBool::new(false),
            freed: Notify::new(),
        }
    }

    /// Takes `bytes` for a holder that has `held` already: within the pool,
    /// or beyond it when the holder holds nothing (so a client that reads
    /// always makes progress). `false`: the holder must wait or give up.
    pub fn take(&self, bytes: usize, held: usize) -> bool {
        let before = self.used.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.max && held > 0 {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Counts `bytes` already held (settling a charge after the fact).
    pub fn charge(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Gives `bytes` back and wakes the connections waiting for room.
    pub fn release(&self, bytes: usize) {
        if bytes == 0 {
            return;
        }
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        if self.starved.swap(false, Ordering::AcqRel) {
            self.freed.notify_waiters();
        }
    }

    /// Waits until the pool has room for `bytes` (now, or once some are given back).
    pub async fn freed(&self, bytes: usize) {
        let notified = self.freed.notified();
        self.starved.store(true, Ordering::Release);
        if self.used() + bytes <= self.max {
            return;
        }
        notified.await;
    }

    /// Bytes held by all connections now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_with_nothing_always_gets_its_next_bytes_and_others_wait() {
        let memory = Memory::new(100);
        assert!(memory.take(80, 0));
        assert!(!memory.take(30, 80), "a holder past the pool waits");
        assert!(memory.take(30, 0), "one that holds nothing goes on");
        assert_eq!(memory.used(), 110);
        memory.release(110);
        assert!(memory.take(100, 10));
        assert_eq!(memory.used(), 100);
    }

    #[tokio::test]
    async fn a_release_wakes_a_waiter() {
        let memory = std::sync::Arc::new(Memory::new(10));
        assert!(memory.take(10, 0));
        let waiter = tokio::spawn({
            let memory = memory.clone();
            async move { memory.freed(5).await }
        });
        tokio::task::yield_now().await;
        while !memory.starved.load(Ordering::Acquire) {
            tokio::task::yield_now().await;
        }
        memory.release(10);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
    }
}
