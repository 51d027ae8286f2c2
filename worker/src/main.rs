//! `worker`: parse the configuration, start logging, run the built-ins.

use std::process::ExitCode;

use tareas_common::config::redacted;
use tareas_worker::{Worker, WorkerConfig};

/// mimalloc: the hot paths allocate many small, short-lived buffers (JSON,
/// AMQP frames, HTTP requests) across threads; see docs/performance.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config: WorkerConfig = tareas_common::config::parse();
    if config.check_health {
        return match tareas_worker::health::check_config(&config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("worker unhealthy: {why}");
                ExitCode::FAILURE
            }
        };
    }
    let _telemetry = tareas_common::telemetry::init(&config.log, "worker");
    let shutdown = tareas_common::shutdown::on_signal();
    let worker = match Worker::with_builtins(&config) {
        Ok(worker) => worker,
        Err(err) => {
            eprintln!("worker: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    // A worker that cannot be observed does not run: its address is taken
    // (another worker on this machine?) or wrong.
    let metrics = match bind_metrics(&config).await {
        Ok(metrics) => metrics,
        Err(err) => {
            eprintln!("worker: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        worker_id = worker.worker_id(),
        queue = %config.broker.queue,
        amqp = %redacted(&config.broker.amqp_url),
        database = %redacted(&config.database.database_url),
        s3 = %config.s3.s3_endpoint,
        "worker starting"
    );
    worker.run_observed(metrics, shutdown).await;
    tracing::info!("worker stopped");
    ExitCode::SUCCESS
}

async fn bind_metrics(config: &WorkerConfig) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = config.metrics_addr()? else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|err| {
        anyhow::anyhow!(
            "cannot serve metrics on {addr} (WORKER_METRICS_ADDR): {err}; give each worker on \
             this machine its own address, or set it empty to serve none"
        )
    })?;
    tracing::info!(addr = %listener.local_addr()?, "metrics, healthz and readyz served");
    Ok(Some(listener))
}
