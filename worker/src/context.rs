//! What every delivery of one worker shares: its configuration, its stores,
//! its run slots, and the channels of the current RabbitMQ connection. Its
//! own module, so that the consumer and the delivery both depend on it and
//! not on each other.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::{Channel, Connection};
use tareas_common::db::Db;
use tareas_common::s3::S3Store;
use tareas_common::topology::Topology;

use crate::registry::Registry;
use crate::retry::RetryPolicy;

/// Longest wait for any one AMQP operation (opening, settling, closing):
/// past it, the link is treated as broken rather than waited on forever.
pub const AMQP_TIMEOUT: Duration = Duration::from_secs(15);

/// Everything a delivery needs.
pub struct Context {
    pub registry: Registry,
    pub amqp_url: String,
    pub db: Db,
    pub s3: S3Store,
    pub topology: Topology,
    pub worker_id: String,
    /// Tasks running at once: the permits of `run_slots`.
    pub concurrency: usize,
    /// Deliveries held at once (RabbitMQ prefetch), running or being stored.
    pub prefetch: usize,
    /// A delivery holds one from its claim to the end of its run.
    pub run_slots: std::sync::Arc<tokio::sync::Semaphore>,
    pub time_limits: crate::time_limits::TimeLimits,
    pub retry: RetryPolicy,
    pub drain_limit: Duration,
    /// Touched while consuming; see [`crate::health`].
    pub health_file: std::path::PathBuf,
    /// Consuming now (a RabbitMQ session is open), for `/readyz`.
    pub linked: std::sync::atomic::AtomicBool,
    /// Finished tasks are kept this long (`ZERO`: for ever), looked for
    /// this often.
    pub result_ttl: Duration,
    pub retention_interval: Duration,
    /// Tasks this worker finished, succeeded and failed, for its `workers` row.
    pub done: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
}

impl Context {
    /// The RabbitMQ session opened (`true`) or ended.
    pub fn set_linked(&self, linked: bool) {
        self.linked
            .store(linked, std::sync::atomic::Ordering::Relaxed);
        let up = if linked { 1.0 } else { 0.0 };
        metrics::gauge!(tareas_common::metrics::RABBITMQ_UP).set(up);
    }

    /// Run slots in use now.
    pub fn busy_slots(&self) -> usize {
        self.concurrency
            .saturating_sub(self.run_slots.available_permits())
    }
}

/// One connection's channels.
#[derive(Clone)]
pub struct Channels {
    /// Consumes the work queue; acks, nacks and rejects go here.
    pub consume: Channel,
    /// Confirm mode: retry copies are published here and confirmed before
    /// the original is acked. Results to distribuidores go here too.
    pub publish: Channel,
    /// The connection, for declares that must not risk `publish` (a
    /// refused declare closes its channel).
    connection: Arc<Connection>,
    /// Retry delays whose queue this connection has declared.
    retry_queues: Arc<std::sync::Mutex<HashSet<u64>>>,
}

impl Channels {
    /// The channels of `connection`.
    pub fn new(connection: Arc<Connection>, consume: Channel, publish: Channel) -> Channels {
        Channels {
            consume,
            publish,
            connection,
            retry_queues: Arc::default(),
        }
    }

    /// The name of the retry queue for `delay_ms` of `topology`, declared
    /// on this connection the first time ([`Topology::declare_retry_queue`]).
    pub async fn retry_queue(
        &self,
        topology: &Topology,
        delay_ms: u64,
    ) -> Result<String, lapin::Error> {
        if self.retry_queue_set().contains(&delay_ms) {
            return Ok(topology.retry_queue(delay_ms));
        }
        let name = topology
            .declare_retry_queue(&self.connection, delay_ms)
            .await?;
        self.retry_queue_set().insert(delay_ms);
        Ok(name)
    }

    /// Declares the retry queue for `delay_ms` again on its next use (it
    /// returned a publish as unroutable: someone deleted it).
    pub fn forget_retry_queue(&self, delay_ms: u64) {
        self.retry_queue_set().remove(&delay_ms);
    }

    fn retry_queue_set(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.retry_queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
