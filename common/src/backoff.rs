//! Exponential backoff with jitter for reconnect loops (waits grow from
//! `min` to `max` and never spin), and [`Dependency`]: outages logged once.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
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
        Backoff {
            min,
            max,
            current: min,
        }
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

/// A dependency (RabbitMQ, PostgreSQL, S3) whose outages are logged once:
/// one error when it goes away, with how to fix it, and one line when it is
/// back, however many callers notice in between.
#[derive(Debug)]
pub struct Dependency {
    /// What it is, for logs: "PostgreSQL".
    pub name: &'static str,
    /// How to fix it, for logs.
    pub hint: &'static str,
    /// Whether the last call failed.
    down: AtomicBool,
}

impl Dependency {
    pub const fn new(name: &'static str, hint: &'static str) -> Dependency {
        Dependency {
            name,
            hint,
            down: AtomicBool::new(false),
        }
    }

    /// A call failed.
    pub fn failed(&self, err: &dyn std::fmt::Display) {
        if self.down.swap(true, Ordering::Relaxed) {
            tracing::debug!(dependency = self.name, cause = %err, "{} still unavailable", self.name);
        } else {
            tracing::error!(dependency = self.name, cause = %err, "{} is unavailable; {}; retrying with backoff", self.name, self.hint);
        }
    }

    /// A call succeeded.
    pub fn succeeded(&self) {
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed) {
            tracing::info!(dependency = self.name, "{} is reachable again", self.name);
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }
}

/// RabbitMQ, as every process sees it.
pub static RABBITMQ: Dependency = Dependency::new(
    "RabbitMQ",
    "check AMQP_URL; locally start it with `scripts/services`",
);
/// PostgreSQL, as every process sees it.
pub static POSTGRES: Dependency = Dependency::new(
    "PostgreSQL",
    "check DATABASE_URL; locally start it with `scripts/services` (PostgreSQL 15 on 127.0.0.1:5432)",
);
/// The S3 server, as every process sees it.
pub static S3: Dependency = Dependency::new(
    "S3",
    "check S3_ENDPOINT and the AWS_* credentials; locally start the S3 server with `scripts/services`",
);

/// Calls `attempt` until it succeeds or `cancel` fires (then `None`),
/// waiting with backoff in between, and reports each outcome to `dependency`.
pub async fn retry_until_ok<T, E, F, Fut>(
    dependency: &Dependency,
    cancel: &tokio_util::sync::CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = Backoff::reconnect();
    loop {
        let outcome = tokio::select! {
            () = cancel.cancelled() => return None,
            outcome = attempt() => outcome,
        };
        match outcome {
            Ok(value) => {
                dependency.succeeded();
                return Some(value);
            }
            Err(err) => dependency.failed(&err),
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// A random number in `[0, 1)`, for jitter.
pub fn random_fraction() -> f64 {
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
