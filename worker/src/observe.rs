//! What an operator sees of a worker: `/metrics` (Prometheus), `/healthz`
//! (the process is up) and `/readyz` (consuming, and PostgreSQL answers) on
//! `WORKER_METRICS_ADDR`, and its row in the `workers` table, renewed
//! every few seconds.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use tareas_common::db::WorkerRow;
use tareas_common::metrics as names;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::context::Context;

/// How often the `workers` row is renewed.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Serves the worker's HTTP port until `shutdown`.
pub async fn serve(listener: TcpListener, ctx: Arc<Context>, shutdown: CancellationToken) {
    let router = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(ctx);
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(err) = served {
        tracing::error!(cause = %err, "the metrics listener failed");
    }
}

async fn metrics(
    axum::extract::State(ctx): axum::extract::State<Arc<Context>>,
) -> impl IntoResponse {
    metrics::gauge!(names::BUSY_SLOTS).set(ctx.busy_slots() as f64);
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], names::render())
}

/// 200 while consuming and PostgreSQL answers within a second, else 503.
async fn readyz(
    axum::extract::State(ctx): axum::extract::State<Arc<Context>>,
) -> impl IntoResponse {
    let rabbitmq = ctx.linked.load(Ordering::Relaxed);
    let postgres = matches!(
        tokio::time::timeout(Duration::from_secs(1), ctx.db.ping()).await,
        Ok(Ok(()))
    );
    let status = match rabbitmq && postgres {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = serde_json::json!({"ready": rabbitmq && postgres, "rabbitmq": rabbitmq, "postgres": postgres});
    (status, axum::Json(body))
}

/// Renews the worker's `workers` row (and keeps the histograms drained)
/// until `shutdown`.
pub async fn report(ctx: Arc<Context>, shutdown: CancellationToken) {
    let started = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    // The kernel's host name: the container's, under compose.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let mut tick = tokio::time::interval(REPORT_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        names::upkeep();
        let row = WorkerRow {
            worker_id: ctx.worker_id.clone(),
            host: host.clone(),
            concurrency: i32::try_from(ctx.concurrency).unwrap_or(i32::MAX),
            done: i64::try_from(ctx.done.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            failed: i64::try_from(ctx.failed.load(Ordering::Relaxed)).unwrap_or(i64::MAX),
            busy: i32::try_from(ctx.busy_slots()).unwrap_or(i32::MAX),
            up_secs: 0.0,
            seen_secs_ago: 0.0,
        };
        if let Err(err) = ctx.db.worker_seen(&row, started).await {
            tracing::debug!(cause = %err, "could not renew the workers row");
        }
    }
}
