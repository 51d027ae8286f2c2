//! Everything the Tareas processes agree on.
//!
//! # Layout
//! - [`protocol`]: the JSON messages between a client and the distribuidor.
//! - [`task`]: task ids, task states, and the messages that travel through RabbitMQ.
//! - [`builtin`]: the catalogue of built-in task types and their payload validation.
//! - [`topology`]: queue and exchange names and their declarations.
//! - [`amqp`]: named connections, confirm channels, and the one persistent publish.
//! - [`db`]: the `tasks` table: migrations and every query against it.
//! - [`dlq`]: the dead-letter queue: list, replay (for `cliente dlq` and the dashboard).
//! - [`metrics`]: the Prometheus metric names and the process's recorder.
//! - `s3` (feature `s3`): the result bucket, `results/<task_id>.json`.
//! - [`config`]: command-line/environment pieces shared by the binaries.
//! - [`backoff`]: exponential backoff with jitter for reconnect loops.
//! - [`shutdown`]: SIGINT/SIGTERM as a cancellation token.
//! - [`telemetry`]: tracing set-up.
//! - [`tls`]: rustls configurations (distribuidor, clients, PostgreSQL).
//! - [`token`]: token digests and client names.

pub mod amqp;
pub mod backoff;
pub mod builtin;
pub mod config;
pub mod db;
pub mod dlq;
pub mod metrics;
pub mod protocol;
#[cfg(feature = "s3")]
pub mod s3;
pub mod shutdown;
pub mod task;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod topology;
