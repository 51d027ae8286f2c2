//! One delivery, from message to ack: the worker's ack policy.
//!
//! 1. Wait for a run slot (one of `WORKER_CONCURRENCY`; a shutdown meanwhile
//!    hands the message back untouched), then claim the task in PostgreSQL
//!    (a duplicate of a running task is acked and dropped; a finished task
//!    is not run again). The slot is freed when the run ends, so storing
//!    this result overlaps the next task's run when the prefetch allows.
//! 2. Run it, unless it has used up its attempts (then it fails at once:
//!    it is a poison message that keeps killing its worker).
//! 3. A transient failure with attempts left: the row goes back to
//!    `queued`, a copy goes to a retry queue (confirmed), the original is acked.
//! 4. Otherwise store the outcome in PostgreSQL, then the row as JSON in S3;
//!    reply to the distribuidor; ack — or, for a task that failed its last
//!    attempt, reject it into the dead-letter queue.
//!
//! While a store is down its write is retried with backoff and the delivery
//! held; abandoned (shutdown past its limit, lost connection), the claim is
//! released and the message handed back with a nack.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::{BasicProperties, Channel};
use serde_json::Value;
use tareas_common::amqp::{self, Envelope, PublishError};
use tareas_common::backoff::{random_fraction, retry_until_ok, POSTGRES, S3};
use tareas_common::db::{Claim, Finish};
use tareas_common::task::{TaskMessage, TaskReport, TaskState};

use crate::consumer::{Channels, Context};
use crate::executor::{self, Outcome};

/// What became of one delivery.
enum Handled {
    /// The result is in PostgreSQL and S3: reply, then ack — or reject into
    /// the dead-letter queue when `dead_letter`.
    Stored {
        report: TaskReport,
        dead_letter: bool,
    },
    /// A transient failure with attempts left: wait `delay_ms` in a retry queue.
    Retry { delay_ms: u64 },
    /// Another copy of the message is running the task: ack this one.
    Duplicate,
    /// Given up (shutdown or lost connection) before both writes: hand it back.
    Abandoned,
    /// Shutdown came before a run slot did: hand it back, nothing to undo.
    NotStarted,
}

/// When a delivery must let go.
pub struct Stop {
    /// Shutdown began: do not start a task that has not started.
    pub starting: tokio_util::sync::CancellationToken,
    /// Give up whatever is in flight and hand it back.
    pub abandon: tokio_util::sync::CancellationToken,
}

/// Processes one delivery to its ack, nack or reject.
pub async fn process(ctx: Arc<Context>, channels: Channels, delivery: Delivery, stop: Stop) {
    let task: TaskMessage = match serde_json::from_slice(&delivery.data) {
        Ok(task) => task,
        Err(err) => {
            tracing::error!(cause = %err, "unreadable task message; dead-lettering it");
            let _ = tokio::time::timeout(
                crate::consumer::AMQP_TIMEOUT,
                delivery.reject(BasicRejectOptions { requeue: false }),
            )
            .await;
            return;
        }
    };
    let task_id = task.task_id.clone();
    let handled = handle(&ctx, &task, delivery.redelivered, &stop).await;
    let settle = async {
        match handled {
            Handled::Stored {
                report,
                dead_letter,
            } => {
                if task.notify {
                    if let Some(reply_to) = delivery.properties.reply_to() {
                        send_report(&channels.publish, reply_to.as_str(), &report).await;
                    }
                }
                if dead_letter {
                    tracing::warn!(task_id = %task_id, "task failed its last attempt; message moved to the dead-letter queue");
                    delivery.reject(BasicRejectOptions { requeue: false }).await
                } else {
                    delivery.ack(BasicAckOptions::default()).await
                }
            }
            Handled::Retry { delay_ms } => {
                match publish_retry(&ctx, &channels.publish, &task, &delivery, delay_ms).await {
                    Ok(()) => delivery.ack(BasicAckOptions::default()).await,
                    Err(err) => {
                        tracing::warn!(task_id = %task_id, cause = %err, "cannot schedule the retry; handing the task back");
                        hand_back(&ctx, &task, &delivery).await
                    }
                }
            }
            Handled::Duplicate => {
                tracing::debug!(task_id = %task_id, "duplicate message of a running task; dropping it");
                delivery.ack(BasicAckOptions::default()).await
            }
            Handled::Abandoned => {
                tracing::info!(task_id = %task_id, "handing the task back to RabbitMQ");
                hand_back(&ctx, &task, &delivery).await
            }
            Handled::NotStarted => {
                tracing::debug!(task_id = %task_id, "shutting down; handing back a task that had not started");
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
            }
        }
    };
    let settled = match tokio::time::timeout(crate::consumer::AMQP_TIMEOUT, settle).await {
        Ok(settled) => settled.map_err(|err| err.to_string()),
        Err(_) => Err("no answer from RabbitMQ in time".to_owned()),
    };
    if let Err(err) = settled {
        tracing::warn!(task_id = %task_id, cause = %err, "could not settle the message; RabbitMQ will redeliver it, and the rerun changes nothing");
    }
}

async fn handle(ctx: &Context, task: &TaskMessage, redelivered: bool, stop: &Stop) -> Handled {
    let abandon = &stop.abandon;
    let task_id = task.task_id.as_str();
    let mut slot = tokio::select! {
        biased;
        () = stop.starting.cancelled() => return Handled::NotStarted,
        () = abandon.cancelled() => return Handled::NotStarted,
        slot = ctx.run_slots.acquire() => Some(slot),
    };
    let started = std::time::Instant::now();
    let Some(claim) = retry_until_ok(&POSTGRES, abandon, || {
        ctx.db.claim(task, &ctx.worker_id, redelivered)
    })
    .await
    else {
        return Handled::Abandoned;
    };
    let claimed = started.elapsed();
    if !matches!(claim, Claim::Started { attempt } if attempt <= ctx.retry.max_attempts) {
        drop(slot.take()); // nothing to run
    }
    let mut ran = Duration::ZERO;
    let (document, dead_letter) = match claim {
        Claim::RunningElsewhere => return Handled::Duplicate,
        Claim::Finished => {
            // Finished before (a redelivery): store and report what is recorded.
            match retry_until_ok(&POSTGRES, abandon, || ctx.db.document(task_id)).await {
                Some(Some(document)) => (document, false),
                Some(None) | None => return Handled::Abandoned,
            }
        }
        Claim::Started { attempt } => {
            let (outcome, dead_letter) = if attempt > ctx.retry.max_attempts {
                (gave_up(attempt - 1), true)
            } else {
                let outcome = tokio::select! {
                    () = abandon.cancelled() => return Handled::Abandoned,
                    outcome = executor::execute(&ctx.registry, task, ctx.time_limits.for_type(&task.task_type)) => outcome,
                };
                ran = outcome.duration;
                drop(slot.take());
                match (&outcome.error, outcome.retryable) {
                    (Some(error), true) if ctx.retry.should_retry(attempt) => {
                        tracing::info!(task_id, attempt, %error, "task failed; will retry");
                        let stored = retry_until_ok(&POSTGRES, abandon, || {
                            ctx.db.retry_later(task_id, &ctx.worker_id, error)
                        });
                        if stored.await.is_none() {
                            return Handled::Abandoned;
                        }
                        return Handled::Retry {
                            delay_ms: ctx.retry.delay_ms(attempt, random_fraction()),
                        };
                    }
                    (Some(error), true) => {
                        let error = format!("failed after {attempt} attempts: {error}");
                        (
                            Outcome {
                                error: Some(error),
                                ..outcome
                            },
                            true,
                        )
                    }
                    (Some(error), false) => {
                        tracing::info!(task_id, task_type = %task.task_type, %error, "task failed");
                        (outcome, false)
                    }
                    (None, _) => (outcome, false),
                }
            };
            let finish = Finish {
                task_id: task_id.to_owned(),
                state: outcome.state,
                result: outcome.result,
                error: outcome.error,
                worker_id: ctx.worker_id.clone(),
                duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
            };
            match retry_until_ok(&POSTGRES, abandon, || ctx.db.finish(finish.clone())).await {
                Some(document) => (document, dead_letter),
                None => return Handled::Abandoned,
            }
        }
    };
    let stored_in_postgres = started.elapsed();
    let bytes = serde_json::to_vec(&document).unwrap_or_default();
    if retry_until_ok(&S3, abandon, || ctx.s3.put_result(task_id, bytes.clone()))
        .await
        .is_none()
    {
        return Handled::Abandoned;
    }
    tracing::debug!(
        task_id,
        claim_ms = claimed.as_secs_f64() * 1e3,
        run_ms = ran.as_secs_f64() * 1e3,
        until_postgres_ms = stored_in_postgres.as_secs_f64() * 1e3,
        s3_ms = (started.elapsed() - stored_in_postgres).as_secs_f64() * 1e3,
        "result stored"
    );
    match report_from_document(task, &document) {
        Some(report) => Handled::Stored {
            report,
            dead_letter,
        },
        None => Handled::Abandoned,
    }
}

/// The outcome recorded for a task that used up its attempts without ever
/// finishing one (each run killed its worker, or was handed back).
fn gave_up(attempts: u32) -> Outcome {
    Outcome {
        state: TaskState::Failed,
        result: None,
        error: Some(format!(
            "gave up after {attempts} attempts that never finished (the task may crash its worker); see the dead-letter queue"
        )),
        retryable: false,
        duration: Duration::ZERO,
    }
}

/// Publishes a copy of `delivery` to the retry queue for `delay_ms`, by
/// the one rule ([`amqp::publish_persistent`]).
async fn publish_retry(
    ctx: &Context,
    channel: &Channel,
    task: &TaskMessage,
    delivery: &Delivery,
    delay_ms: u64,
) -> Result<(), PublishError> {
    let queue = ctx.topology.declare_retry_queue(channel, delay_ms).await?;
    let envelope = Envelope::forwarded(task.task_id.as_str(), &delivery.properties);
    amqp::publish_persistent(channel, &queue, &delivery.data, envelope).await
}

/// Releases the claim and returns the message to the queue.
async fn hand_back(
    ctx: &Context,
    task: &TaskMessage,
    delivery: &Delivery,
) -> Result<bool, lapin::Error> {
    release(ctx, task).await;
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    delivery.nack(requeue).await
}

/// Best effort: the claim does not count when the task is handed back.
async fn release(ctx: &Context, task: &TaskMessage) {
    let released = tokio::time::timeout(
        Duration::from_secs(2),
        ctx.db.release(task.task_id.as_str(), &ctx.worker_id),
    );
    if let Ok(Err(err)) = released.await {
        tracing::debug!(task_id = %task.task_id, cause = %err, "could not release the claim");
    }
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
    let body = serde_json::to_vec(report).expect("a TaskReport always serializes");
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_correlation_id(report.task_id.as_str().into());
    let publish = channel.basic_publish(
        "".into(),
        reply_to.into(),
        BasicPublishOptions::default(),
        &body,
        properties,
    );
    let cause = match tokio::time::timeout(amqp::CONFIRM_TIMEOUT, publish).await {
        Ok(Ok(_)) => return,
        Ok(Err(err)) => err.to_string(),
        Err(_) => "RabbitMQ did not take it in time".to_owned(),
    };
    tracing::warn!(task_id = %report.task_id, %cause, "could not send the result back; it is stored");
}
