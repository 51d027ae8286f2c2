//! When a transient failure is tried again: exponential backoff with
//! jitter, up to a number of attempts. The wait happens in RabbitMQ (a
//! retry queue with a TTL, see `tareas_common::topology`), so each distinct
//! delay is a queue; jitter is therefore drawn from five steps per level
//! (50 %, 62.5 %, 75 %, 87.5 %, 100 % of the level's delay).

use std::time::Duration;

/// The retry policy of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Runs of a task in all, the first included; after the last, the task
    /// is `failed` and its message goes to the dead-letter queue.
    pub max_attempts: u32,
    /// The wait before the second attempt; it doubles for each attempt after.
    pub base: Duration,
    /// No wait is longer than this.
    pub max: Duration,
}

impl RetryPolicy {
    /// Whether a task that just failed its `attempt`-th run (1-based) gets another.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The wait after the `attempt`-th run failed, in milliseconds, jittered
    /// by `jitter` in `[0, 1)`.
    pub fn delay_ms(&self, attempt: u32, jitter: f64) -> u64 {
        let exponent = attempt.saturating_sub(1).min(30);
        let level = self.base.saturating_mul(1 << exponent).min(self.max);
        let level_ms = u64::try_from(level.as_millis()).unwrap_or(u64::MAX).max(1);
        let step = (jitter.clamp(0.0, 0.999) * 5.0) as u64; // 0..=4
        (level_ms * (4 + step) / 8).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
        }
    }

    #[test]
    fn grows_exponentially_with_bounded_jitter() {
        let p = policy();
        assert_eq!(p.delay_ms(1, 0.99), 1000);
        assert_eq!(p.delay_ms(1, 0.0), 500);
        assert_eq!(p.delay_ms(2, 0.99), 2000);
        assert_eq!(p.delay_ms(3, 0.5), 4000 * 6 / 8);
        assert_eq!(p.delay_ms(9, 0.99), 10_000, "capped at max");
        let distinct: std::collections::HashSet<u64> = (0..100)
            .map(|i| p.delay_ms(2, f64::from(i) / 100.0))
            .collect();
        assert_eq!(distinct.len(), 5, "five jitter steps per level");
    }

    #[test]
    fn stops_at_max_attempts() {
        let p = policy();
        assert!(p.should_retry(4));
        assert!(!p.should_retry(5));
    }
}
