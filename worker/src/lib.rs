//! The Tareas worker, as a library: build a [`Registry`] of handlers, then
//! [`Worker::run`] it. The `worker` binary registers the built-ins; a user
//! adds their own task types the same way (see `examples/custom_worker.rs`).
//!
//! # Layout
//! - [`config`]: flags and environment variables.
//! - [`registry`]: task_type → handler, and the handler error type.
//! - [`builtins`]: the built-in task types.
//! - [`health`]: the heartbeat file behind `worker --check-health`.
//! - [`observe`]: `/metrics`, `/healthz`, `/readyz` on `WORKER_METRICS_ADDR`, and the `workers` row.
//! - [`executor`]: runs one handler: blocking pool or polled in place, time limit, panics caught.
//! - [`context`]: what every delivery shares: stores, run slots, channels.
//! - [`consumer`]: the RabbitMQ session: prefetch, reconnects, drain on shutdown.
//! - [`delivery`]: one delivery to its ack: run slot, claim, run, retry, store, reply, dead-letter.
//! - [`retention`]: removes this queue's finished tasks past `TAREAS_RESULT_TTL`.
//! - [`retry`]: the retry policy: attempts, exponential backoff, jitter.
//! - [`time_limits`]: the time limit of each task type.

pub mod builtins;
pub mod config;
pub mod consumer;
pub mod context;
pub mod delivery;
pub mod executor;
pub mod health;
pub mod observe;
pub mod registry;
pub mod retention;
pub mod retry;
pub mod time_limits;

use std::sync::Arc;
use std::time::Duration;

use tareas_common::backoff::{retry_until_ok, POSTGRES, S3};
use tareas_common::db::Db;
use tareas_common::topology::Topology;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::config::WorkerConfig;
pub use crate::registry::{Registry, TaskError};
use crate::retry::RetryPolicy;
use tareas_common::s3::S3Store;

/// RabbitMQ's default `consumer_timeout` (3.10 and later), in seconds.
const RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_SECS: u64 = 30 * 60;

/// A worker ready to run.
pub struct Worker {
    context: context::Context,
}

impl Worker {
    /// Builds a worker that runs the handlers of `registry`. Fails only on
    /// configuration errors; dependencies are connected by [`Worker::run`].
    pub fn new(config: &WorkerConfig, registry: Registry) -> anyhow::Result<Worker> {
        let concurrency = config.concurrency();
        let prefetch = config.prefetch();
        let time_limits = config.time_limits();
        if time_limits.longest().as_secs() > RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_SECS {
            tracing::warn!(
                longest_time_limit_secs = time_limits.longest().as_secs(),
                "the task time limit exceeds RabbitMQ's default consumer timeout (30 min); raise \
                 consumer_timeout in rabbitmq.conf above it (deploy/rabbitmq.conf sets 1 h)"
            );
        }
        let context = context::Context {
            registry,
            amqp_url: config.broker.amqp_url.clone(),
            db: Db::new(&config.database.database_url, prefetch + 2)?,
            s3: S3Store::new(&config.s3),
            topology: Topology::from_args(&config.broker),
            worker_id: config.worker_id(),
            concurrency,
            prefetch,
            run_slots: Arc::new(tokio::sync::Semaphore::new(concurrency)),
            time_limits,
            retry: RetryPolicy {
                max_attempts: config.max_attempts.max(1),
                base: Duration::from_millis(config.retry_base_ms),
                max: Duration::from_millis(config.retry_max_ms),
            },
            drain_limit: Duration::from_secs(config.shutdown_timeout_secs),
            health_file: config.health_file.clone(),
            result_ttl: config.result_ttl,
            retention_interval: config.retention_interval,
            linked: Default::default(),
            done: Default::default(),
            failed: Default::default(),
        };
        Ok(Worker { context })
    }

    /// A worker running the built-in task types.
    pub fn with_builtins(config: &WorkerConfig) -> anyhow::Result<Worker> {
        let mut registry = Registry::new();
        builtins::register(&mut registry);
        Worker::new(config, registry)
    }

    pub fn worker_id(&self) -> &str {
        &self.context.worker_id
    }

    /// Prepares the schema and the bucket, then consumes until `shutdown`,
    /// draining in-flight tasks before it returns. Waits (logging once) for
    /// any dependency that is not there yet.
    pub async fn run(self, shutdown: CancellationToken) {
        self.run_observed(None, shutdown).await;
    }

    /// [`Worker::run`], serving `/metrics`, `/healthz` and `/readyz` on
    /// `metrics` meanwhile, and renewing its `workers` row.
    pub async fn run_observed(self, metrics: Option<TcpListener>, shutdown: CancellationToken) {
        let ctx = Arc::new(self.context);
        tareas_common::metrics::handle();
        if let Some(listener) = metrics {
            tokio::spawn(observe::serve(listener, ctx.clone(), shutdown.clone()));
        }
        tokio::spawn(observe::report(ctx.clone(), shutdown.clone()));
        tokio::spawn(retention::run(ctx.clone(), shutdown.clone()));
        if retry_until_ok(&POSTGRES, &shutdown, || ctx.db.migrate())
            .await
            .is_none()
        {
            return;
        }
        if retry_until_ok(&S3, &shutdown, || ctx.s3.ensure_bucket())
            .await
            .is_none()
        {
            return;
        }
        consumer::run(ctx, shutdown).await;
    }
}
