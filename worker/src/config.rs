//! The worker's configuration: flags with environment twins.

use clap::Parser;
use tareas_common::config::{BrokerArgs, DatabaseArgs, LogArgs, S3Args};

/// Tareas worker: runs queued tasks and stores their results.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct WorkerConfig {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub s3: S3Args,
    /// Address of `/metrics`, `/healthz` and `/readyz`; empty: none. Give
    /// each worker on one machine its own port.
    #[arg(long, env = "WORKER_METRICS_ADDR", default_value = "0.0.0.0:9464")]
    pub metrics_addr: String,
    /// How long finished tasks (rows and S3 objects) of this queue are
    /// kept: `7d`, `12h`, `30s`; `0` keeps everything.
    #[arg(long, env = "TAREAS_RESULT_TTL", default_value = "7d", value_parser = tareas_common::config::duration)]
    pub result_ttl: std::time::Duration,
    /// How often retention looks for tasks past `TAREAS_RESULT_TTL`.
    #[arg(long, env = "TAREAS_RETENTION_INTERVAL", default_value = "1m", value_parser = tareas_common::config::duration)]
    pub retention_interval: std::time::Duration,
    /// Tasks run at once by this process.
    /// Default: the number of CPU cores.
    #[arg(long, env = "WORKER_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Messages this process holds unacknowledged (the RabbitMQ prefetch):
    /// the tasks running plus those whose results are being stored. Above
    /// the concurrency, storing one result overlaps running the next task,
    /// like Celery's prefetch multiplier. Default: 1.5 × the concurrency;
    /// minimum: the concurrency.
    #[arg(long, env = "WORKER_PREFETCH")]
    pub prefetch: Option<usize>,
    /// Name reported in results and stored in `tasks.worker_id`.
    /// Default: `<hostname>-<pid>`.
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Seconds a task may run before it is failed with a time-limit error
    /// (the default for every task type).
    #[arg(long, env = "TAREAS_TASK_TIME_LIMIT_SECS", default_value_t = 300)]
    pub task_time_limit_secs: u64,
    /// Per-type time limits that override the default, e.g. `compute=900,sleep=70`.
    #[arg(long, env = "TAREAS_TASK_TIME_LIMITS", value_delimiter = ',')]
    pub task_time_limits: Vec<crate::time_limits::Override>,
    /// Runs of a task in all; a transient failure on the last one fails the
    /// task and moves its message to the dead-letter queue.
    #[arg(long, env = "TAREAS_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// Wait before the second attempt, in ms; doubles for each attempt after (with jitter).
    #[arg(long, env = "TAREAS_RETRY_BASE_MS", default_value_t = 1000)]
    pub retry_base_ms: u64,
    /// Longest wait between attempts, in ms.
    #[arg(long, env = "TAREAS_RETRY_MAX_MS", default_value_t = 60_000)]
    pub retry_max_ms: u64,
    /// Seconds in-flight tasks get to finish after SIGTERM; the rest are handed back to RabbitMQ.
    #[arg(long, env = "TAREAS_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
    /// Heartbeat file, fresh while the worker is consuming (for container healthchecks).
    #[arg(
        long,
        env = "WORKER_HEALTH_FILE",
        default_value = "/tmp/tareas-worker.health"
    )]
    pub health_file: std::path::PathBuf,
    /// Exit 0 if the worker on this host is consuming (its heartbeat is fresh), 1 otherwise.
    #[arg(long)]
    pub check_health: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

impl WorkerConfig {
    /// The defaults, as if no flag or environment variable were set.
    pub fn defaults() -> WorkerConfig {
        tareas_common::config::parse_from(["worker"])
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from))
            .max(1)
    }

    /// The RabbitMQ prefetch: by default 1.5 × the concurrency, never below
    /// it (slots would idle).
    pub fn prefetch(&self) -> usize {
        let concurrency = self.concurrency();
        self.prefetch
            .unwrap_or(concurrency + concurrency.div_ceil(2))
            .clamp(concurrency, usize::from(u16::MAX))
    }

    /// The time limit of every task type.
    pub fn time_limits(&self) -> crate::time_limits::TimeLimits {
        crate::time_limits::TimeLimits {
            default: std::time::Duration::from_secs(self.task_time_limit_secs),
            overrides: self
                .task_time_limits
                .iter()
                .map(|o| (o.task_type.clone(), o.limit))
                .collect(),
        }
    }

    /// Where `/metrics` is served; `None`: nowhere (an empty address).
    pub fn metrics_addr(&self) -> anyhow::Result<Option<std::net::SocketAddr>> {
        tareas_common::config::optional_addr("WORKER_METRICS_ADDR", &self.metrics_addr)
    }

    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|name| name.trim().to_owned())
                .unwrap_or_else(|_| "worker".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}
