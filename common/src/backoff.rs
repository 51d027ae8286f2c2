//! Exponential backoff with full jitter, for reconnect loops: waits grow
//! from `min` to `max` and never spin.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The state of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    /// The first wait.
    min: Duration,
    /// No wait grows beyond this.
    max: Duration,
    /// The ceiling of the next wait, before jitter.
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, current: min }
    }

    /// The default for reconnecting to a dependency: 100 ms up to 5 s.
    pub fn reconnect() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The next wait: a random duration between half the ceiling and the
    /// ceiling, after which the ceiling doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        half + half.mul_f64(random_fraction())
    }

    /// Back to the first wait, after a success.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

/// Calls `attempt` until it succeeds or `cancel` fires (then `None`),
/// waiting with backoff in between. Logs the first failure once, with
/// `hint` saying how to fix it, and logs once when `what` is reachable again.
pub async fn retry_until_ok<T, E, F, Fut>(
    what: &str,
    hint: &str,
    cancel: &tokio_util::sync::CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::reconnect();
    let mut failures = 0u64;
    loop {
        let outcome = tokio::select! {
            () = cancel.cancelled() => return None,
            outcome = attempt() => outcome,
        };
        match outcome {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(dependency = what, failures, "{what} is reachable again");
                }
                return Some(value);
            }
            Err(err) => {
                if failures == 0 {
                    tracing::error!(dependency = what, cause = %err, "{what} is unavailable; {hint}; retrying with backoff");
                } else {
                    tracing::debug!(dependency = what, cause = %err, failures, "{what} still unavailable");
                }
                failures += 1;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

fn random_fraction() -> f64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(0);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_max_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = backoff.next_delay();
        assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
        for _ in 0..10 {
            assert!(backoff.next_delay() <= Duration::from_secs(1));
        }
        assert!(backoff.next_delay() >= Duration::from_millis(500));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
