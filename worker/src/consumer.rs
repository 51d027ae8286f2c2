//! The AMQP side of the worker: consumes the work queue with a prefetch
//! equal to the concurrency, runs each delivery through the executor and
//! the store, replies to the distribuidor that accepted the task, and acks
//! only after PostgreSQL and S3 both hold the result.
//!
//! While a store is down, the delivery is held and its write retried with
//! backoff; the prefetch then stops new deliveries. If the RabbitMQ
//! connection drops, unacked deliveries return to the queue by themselves.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;
use tareas_common::backoff::{retry_until_ok, POSTGRES, RABBITMQ, S3};
use tareas_common::db::{Claim, Db, Finish};
use tareas_common::task::{TaskMessage, TaskReport, TaskState};
use tareas_common::topology::Topology;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::executor;
use crate::registry::Registry;
use crate::store::s3::S3Store;

/// Everything a delivery needs.
pub struct Context {
    pub registry: Registry,
    pub amqp_url: String,
    pub db: Db,
    pub s3: S3Store,
    pub topology: Topology,
    pub worker_id: String,
    pub concurrency: usize,
    pub task_time_limit: Duration,
    pub drain_limit: Duration,
    /// Touched while consuming; see [`crate::health`].
    pub health_file: std::path::PathBuf,
}

/// Why a consume session ended.
enum Ended {
    Shutdown,
    ConnectionLost,
}

/// Consumes until `shutdown`, reconnecting whenever the connection drops.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    loop {
        let Some((connection, channel, consumer)) =
            retry_until_ok(&RABBITMQ, &shutdown, || open(&ctx)).await
        else {
            return;
        };
        tracing::info!(queue = %ctx.topology.queue, worker_id = %ctx.worker_id, concurrency = ctx.concurrency, "consuming");
        let heartbeat = crate::health::Heartbeat::start(ctx.health_file.clone());
        let abandon = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ended = consume(&ctx, &channel, consumer, &tracker, &abandon, &shutdown).await;
        drop(heartbeat);
        tracker.close();
        match ended {
            Ended::Shutdown => {
                let _ = channel.basic_cancel(ctx.worker_id.as_str().into(), BasicCancelOptions::default()).await;
                if tokio::time::timeout(ctx.drain_limit, tracker.wait()).await.is_err() {
                    tracing::warn!(in_flight = tracker.len(), "shutdown limit reached; handing unfinished tasks back");
                    abandon.cancel();
                    tracker.wait().await;
                }
                let _ = channel.close(200, "worker shutting down".into()).await;
                let _ = connection.close(200, "worker shutting down".into()).await;
                return;
            }
            Ended::ConnectionLost => {
                tracing::error!("lost the RabbitMQ connection; unacked tasks return to the queue; reconnecting");
                abandon.cancel();
                tracker.wait().await;
            }
        }
    }
}

async fn open(ctx: &Context) -> Result<(Connection, Channel, lapin::Consumer), lapin::Error> {
    let connection = Connection::connect(&ctx.amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    ctx.topology.declare(&channel).await?;
    let prefetch = u16::try_from(ctx.concurrency).unwrap_or(u16::MAX);
    channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let consumer = channel
        .basic_consume(
            ctx.topology.queue.as_str().into(),
            ctx.worker_id.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, consumer))
}

async fn consume(
    ctx: &Arc<Context>,
    channel: &Channel,
    mut consumer: lapin::Consumer,
    tracker: &TaskTracker,
    abandon: &CancellationToken,
    shutdown: &CancellationToken,
) -> Ended {
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                tracker.spawn(process(ctx.clone(), channel.clone(), delivery, abandon.clone()));
            }
            Some(Err(err)) => {
                tracing::warn!(cause = %err, "consumer failed");
                return Ended::ConnectionLost;
            }
            None => return Ended::ConnectionLost,
        }
    }
}

/// One delivery, from message to ack.
async fn process(ctx: Arc<Context>, channel: Channel, delivery: Delivery, abandon: CancellationToken) {
    let task: TaskMessage = match serde_json::from_slice(&delivery.data) {
        Ok(task) => task,
        Err(err) => {
            tracing::error!(cause = %err, "unreadable task message; dead-lettering it");
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    let report = match handle(&ctx, &task, delivery.redelivered, &abandon).await {
        Handled::Stored(report) => report,
        Handled::Duplicate => {
            tracing::debug!(task_id = %task.task_id, "duplicate message of a running task; dropping it");
            let _ = delivery.ack(BasicAckOptions::default()).await;
            return;
        }
        Handled::Abandoned => {
            tracing::info!(task_id = %task.task_id, "handing the task back to RabbitMQ");
            let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
            return;
        }
    };
    if task.notify {
        if let Some(reply_to) = delivery.properties.reply_to() {
            send_report(&channel, reply_to.as_str(), &report).await;
        }
    }
    if let Err(err) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(task_id = %task.task_id, cause = %err, "ack failed; RabbitMQ will redeliver, the rerun changes nothing");
    }
}

/// What became of one delivery.
enum Handled {
    /// The result is in PostgreSQL and S3: reply and ack.
    Stored(TaskReport),
    /// Another copy of the message is running the task: ack this one.
    Duplicate,
    /// Given up (shutdown or lost connection) before both writes: hand it back.
    Abandoned,
}

async fn handle(ctx: &Context, task: &TaskMessage, redelivered: bool, abandon: &CancellationToken) -> Handled {
    match store_result(ctx, task, redelivered, abandon).await {
        Some(Some(report)) => Handled::Stored(report),
        Some(None) => Handled::Duplicate,
        None => Handled::Abandoned,
    }
}

/// Runs the task unless it already finished or runs elsewhere, and stores
/// its result in PostgreSQL then S3. `None` when abandoned before both
/// writes succeeded; `Some(None)` for a duplicate.
async fn store_result(
    ctx: &Context,
    task: &TaskMessage,
    redelivered: bool,
    abandon: &CancellationToken,
) -> Option<Option<TaskReport>> {
    let task_id = task.task_id.as_str();
    let claim =
        retry_until_ok(&POSTGRES, abandon, || ctx.db.claim(task, &ctx.worker_id, redelivered)).await?;
    let document = if claim == Claim::RunningElsewhere {
        return Some(None);
    } else if claim == Claim::Started {
        let outcome = tokio::select! {
            () = abandon.cancelled() => return None,
            outcome = executor::execute(&ctx.registry, task, ctx.task_time_limit) => outcome,
        };
        if let Some(error) = &outcome.error {
            tracing::info!(task_id, task_type = %task.task_type, %error, "task failed");
        }
        let finish = Finish {
            state: outcome.state,
            result: outcome.result.as_ref(),
            error: outcome.error.as_deref(),
            worker_id: &ctx.worker_id,
            duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
        };
        retry_until_ok(&POSTGRES, abandon, || ctx.db.finish(task_id, &finish)).await?
    } else {
        // Finished before (a redelivery): store and report what is recorded.
        retry_until_ok(&POSTGRES, abandon, || ctx.db.document(task_id)).await??
    };
    let bytes = serde_json::to_vec(&document).unwrap_or_default();
    retry_until_ok(&S3, abandon, || ctx.s3.put_result(task_id, bytes.clone())).await?;
    Some(report_from_document(task, &document))
}

/// The report of a finished row.
fn report_from_document(task: &TaskMessage, document: &Value) -> Option<TaskReport> {
    let status: TaskState = document.get("state")?.as_str()?.parse().ok()?;
    let non_null = |key: &str| document.get(key).filter(|value| !value.is_null()).cloned();
    Some(TaskReport {
        task_id: task.task_id.clone(),
        status,
        result: non_null("result"),
        error: non_null("error").and_then(|e| e.as_str().map(str::to_owned)),
        worker_id: non_null("worker_id").and_then(|w| w.as_str().map(str::to_owned)),
        duration_ms: non_null("duration_ms").and_then(|d| d.as_u64()),
    })
}

/// Sends a report to a distribuidor's reply queue. Best effort: the result
/// is already stored, and a client can always ask for it by status.
async fn send_report(channel: &Channel, reply_to: &str, report: &TaskReport) {
    let body = serde_json::to_vec(report).unwrap_or_default();
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id(report.task_id.as_str().into());
    if let Err(err) = channel
        .basic_publish("".into(), reply_to.into(), BasicPublishOptions::default(), &body, properties)
        .await
    {
        tracing::warn!(task_id = %report.task_id, cause = %err, "could not send the result back; it is stored");
    }
}
