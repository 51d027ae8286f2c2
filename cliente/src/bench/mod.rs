//! `cliente bench`: load a running Tareas with tasks and measure it, and,
//! with `--baseline`, measure the bare limits of its three dependencies in
//! the same run, so that every figure is a ratio to something measured here
//! and now.
//!
//! - [`load`]: the load generator: connections, window, rate, retries.
//! - [`baseline`]: RabbitMQ, PostgreSQL and S3 alone.
//! - [`latency`]: the latency histogram and its percentiles.
//! - [`report`]: the printed table, the JSON file.

pub mod baseline;
pub mod latency;
pub mod load;
pub mod report;

use std::time::Duration;

use clap::Args;
use serde_json::Value;
use tareas_common::config::{BrokerArgs, DatabaseArgs, S3Args};

pub use report::Report;

/// `cliente bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Tasks to send.
    #[arg(long, default_value_t = 10_000)]
    pub tasks: usize,
    /// Task type to send.
    #[arg(long, default_value = "hash")]
    pub task_type: String,
    /// Payload as JSON (default: a short text, or the type's sample payload).
    #[arg(long)]
    pub payload: Option<String>,
    /// Client connections, each with its own window.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Most unacknowledged tasks in flight per connection.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Offer tasks at this many per second in all, instead of as fast as the window allows.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measure submission only: ask for no results (`notify: false`) and do not wait for them.
    #[arg(long)]
    pub acks_only: bool,
    /// Resubmit (same task_id) tasks refused as `unavailable` or
    /// `uncertain`, until acked; with --acks-only, also connect again when
    /// the distribuidor drops the connection and resend what was not acked.
    #[arg(long)]
    pub retry_unavailable: bool,
    /// Prefix of the generated task ids (default: `bench-<random>`).
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// Write every acked task id to this file, one per line.
    #[arg(long)]
    pub record_acked: Option<std::path::PathBuf>,
    /// Also measure the bare dependencies: RabbitMQ, PostgreSQL, S3.
    #[arg(long)]
    pub baseline: bool,
    /// Before the load, measure RabbitMQ's own publish-to-confirm latency
    /// at --rate (the floor of the ack latency): messages of the task's size
    /// published one by one to a scratch quorum queue, nothing else running.
    #[arg(long, requires = "rate")]
    pub confirm_baseline: bool,
    /// Messages/rows/objects per baseline measurement (default: --tasks, at most 20000).
    #[arg(long)]
    pub baseline_tasks: Option<usize>,
    /// Concurrency of the S3 baseline: the worker's (WORKER_CONCURRENCY) in one process.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 8)]
    pub s3_concurrency: usize,
    /// Write the figures as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Seconds to wait for all acks and results before giving up.
    #[arg(long, default_value_t = 600)]
    pub bench_timeout: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub s3: S3Args,
}

impl BenchArgs {
    /// The payload each task carries.
    pub fn payload(&self) -> anyhow::Result<Value> {
        match &self.payload {
            Some(raw) => Ok(serde_json::from_str(raw)
                .map_err(|err| anyhow::anyhow!("--payload is not JSON: {err}"))?),
            None if self.task_type == "hash" => Ok(serde_json::json!({"text": "tareas bench"})),
            None => Ok(tareas_common::builtin::sample_payload(&self.task_type)),
        }
    }
}

/// Runs the bench (and the baseline when asked) against `addr`.
pub async fn run(addr: &str, args: &BenchArgs) -> anyhow::Result<Report> {
    let count = args.baseline_tasks.unwrap_or(args.tasks.min(20_000)).max(1);
    let baseline = if args.baseline {
        Some(baseline::measure(args, count).await?)
    } else {
        None
    };
    let confirm_baseline = match args.rate {
        Some(rate) if args.confirm_baseline => {
            Some(baseline::rabbitmq_confirm_latency(args, count, rate).await?)
        }
        _ => None,
    };
    let load = load::run(addr, args, Duration::from_secs(args.bench_timeout)).await?;
    Ok(Report::new(args, load, baseline, confirm_baseline))
}
