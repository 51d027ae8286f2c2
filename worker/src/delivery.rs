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
use std::time::{Duration, Instant, SystemTime};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, BasicRejectOptions};
use lapin::{BasicProperties, Channel};
use tareas_common::amqp::{self, Envelope, PublishError};
use tareas_common::backoff::{random_fraction, retry_until_ok, POSTGRES, S3};
use tareas_common::db::{Claim, DbError, Finish, TaskRow};
use tareas_common::metrics as names;
use tareas_common::task::{TaskMessage, TaskReport, TaskState};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::context::{Channels, Context, AMQP_TIMEOUT};
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
    /// PostgreSQL refuses this task's data (say, a NUL in its payload): no
    /// retry can store it, so it goes to the dead-letter queue, with why.
    Unstorable(String),
}

/// Why a step did not finish.
enum Stopped {
    /// Shutdown passed its limit, or the connection was lost, while a store
    /// was down: the delivery is handed back.
    Abandoned,
    /// PostgreSQL refused the row's data; see [`Handled::Unstorable`].
    Unstorable(String),
}

/// What running a claimed task led to.
enum Ran {
    /// Record this outcome; dead-letter the message after when `dead_letter`.
    Done { outcome: Outcome, dead_letter: bool },
    /// A transient failure with attempts left, recorded: retry after `delay_ms`.
    Retry { delay_ms: u64 },
}

/// When a delivery must let go.
pub struct Stop {
    /// Shutdown began: do not start a task that has not started.
    pub starting: CancellationToken,
    /// Give up whatever is in flight and hand it back.
    pub abandon: CancellationToken,
}

/// Processes one delivery to its ack, nack or reject, inside a span naming
/// the task, so that every log line of the delivery carries it.
pub async fn process(ctx: Arc<Context>, channels: Channels, delivery: Delivery, stop: Stop) {
    let task: TaskMessage = match serde_json::from_slice(&delivery.data) {
        Ok(task) => task,
        Err(err) => {
            tracing::error!(cause = %err, "unreadable task message; dead-lettering it");
            let reject = delivery.reject(BasicRejectOptions { requeue: false });
            let _ = tokio::time::timeout(AMQP_TIMEOUT, reject).await;
            return;
        }
    };
    let span = tracing::info_span!(
        "delivery",
        task_id = %task.task_id,
        task_type = %task.task_type,
        redelivered = delivery.redelivered,
        attempt = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    let traceparent = amqp::traceparent_of(&delivery.properties);
    if let Some(traceparent) = &traceparent {
        tareas_common::telemetry::continue_trace(&span, traceparent);
        if let Some(trace_id) = amqp::trace_id(traceparent) {
            span.record("trace_id", trace_id);
        }
    }
    let _unacked = names::InProgress::start(names::UNACKED);
    async move {
        let handled = match handle(&ctx, &task, delivery.redelivered, &stop).await {
            Ok(handled) => handled,
            Err(Stopped::Abandoned) => Handled::Abandoned,
            Err(Stopped::Unstorable(why)) => Handled::Unstorable(why),
        };
        let settled = tokio::time::timeout(
            AMQP_TIMEOUT,
            settle(&ctx, &channels, &task, &delivery, handled),
        );
        let cause = match settled.await {
            Ok(Ok(_)) => None,
            Ok(Err(err)) => Some(err.to_string()),
            Err(_) => Some("no answer from RabbitMQ in time".to_owned()),
        };
        if let Some(cause) = cause {
            tracing::warn!(%cause, "could not settle the message; RabbitMQ will redeliver it, and the rerun changes nothing");
        }
    }
    .instrument(span)
    .await;
}

/// Tells RabbitMQ what became of the delivery (after the reply, if any).
async fn settle(
    ctx: &Context,
    channels: &Channels,
    task: &TaskMessage,
    delivery: &Delivery,
    handled: Handled,
) -> Result<bool, lapin::Error> {
    match handled {
        Handled::Stored {
            report,
            dead_letter,
        } => {
            if let (true, Some(reply_to)) = (task.notify, delivery.properties.reply_to()) {
                send_report(&channels.publish, reply_to.as_str(), &report).await;
            }
            if dead_letter {
                dead_lettered(task);
                tracing::warn!(
                    "task failed its last attempt; message moved to the dead-letter queue"
                );
                delivery.reject(BasicRejectOptions { requeue: false }).await
            } else {
                delivery.ack(BasicAckOptions::default()).await
            }
        }
        Handled::Retry { delay_ms } => {
            match publish_retry(ctx, channels, task, delivery, delay_ms).await {
                Ok(()) => delivery.ack(BasicAckOptions::default()).await,
                Err(err) => {
                    tracing::warn!(cause = %err, "cannot schedule the retry; handing the task back");
                    hand_back(ctx, task, delivery).await
                }
            }
        }
        Handled::Duplicate => {
            tracing::debug!("duplicate message of a running task; dropping it");
            delivery.ack(BasicAckOptions::default()).await
        }
        Handled::Abandoned => {
            tracing::info!("handing the task back to RabbitMQ");
            hand_back(ctx, task, delivery).await
        }
        Handled::NotStarted => {
            tracing::debug!("shutting down; handing back a task that had not started");
            delivery.nack(requeue()).await
        }
        Handled::Unstorable(why) => {
            dead_lettered(task);
            tracing::error!(cause = %why, "PostgreSQL refuses this task's data; message moved to the dead-letter queue");
            delivery.reject(BasicRejectOptions { requeue: false }).await
        }
    }
}

/// The ack policy's steps: run slot → claim → run → record → S3.
async fn handle(
    ctx: &Context,
    task: &TaskMessage,
    redelivered: bool,
    stop: &Stop,
) -> Result<Handled, Stopped> {
    let abandon = &stop.abandon;
    let Some(slot) = run_slot(ctx, stop).await else {
        return Ok(Handled::NotStarted);
    };
    let started = Instant::now();
    let claim = persist_row(abandon, || ctx.db.claim(task, &ctx.worker_id, redelivered)).await?;
    let (row, dead_letter) = match claim {
        Claim::RunningElsewhere => return Ok(Handled::Duplicate),
        Claim::Finished => {
            // Finished before (a redelivery): store and report what is recorded.
            drop(slot);
            let row = persist_row(abandon, || ctx.db.row(task.task_id.as_str())).await?;
            (row.ok_or(Stopped::Abandoned)?, false)
        }
        Claim::Started { attempt } => {
            tracing::Span::current().record("attempt", attempt);
            let task_type = task.task_type.clone();
            metrics::counter!(names::STARTED, "task_type" => task_type).increment(1);
            match run(ctx, task, attempt, slot, abandon).await? {
                Ran::Retry { delay_ms } => return Ok(Handled::Retry { delay_ms }),
                Ran::Done {
                    outcome,
                    dead_letter,
                } => {
                    let row = record(ctx, task, outcome, abandon).await?;
                    finished(ctx, &row);
                    (row, dead_letter)
                }
            }
        }
    };
    let recorded = started.elapsed();
    let document = tareas_common::s3::Document::from(row.document());
    let storing = Instant::now();
    retry_until_ok(&S3, abandon, || {
        ctx.s3.put_result(task.task_id.as_str(), document.clone())
    })
    .await
    .ok_or(Stopped::Abandoned)?;
    metrics::histogram!(names::STORE_TIME, "store" => "s3").record(storing.elapsed().as_secs_f64());
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH);
    if let (Some(created), Ok(now)) = (names::unix_seconds(&row.created_at), now) {
        metrics::histogram!(names::END_TO_END).record(now.as_secs_f64() - created);
    }
    tracing::debug!(
        until_postgres_ms = recorded.as_secs_f64() * 1e3,
        s3_ms = (started.elapsed() - recorded).as_secs_f64() * 1e3,
        "result stored"
    );
    Ok(Handled::Stored {
        report: row.report(),
        dead_letter,
    })
}

/// Waits for one of the worker's run slots; `None` if shutdown came first.
async fn run_slot(ctx: &Context, stop: &Stop) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        () = stop.starting.cancelled() => None,
        () = stop.abandon.cancelled() => None,
        slot = ctx.run_slots.clone().acquire_owned() => slot.ok(),
    }
}

/// Runs claimed run number `attempt`, holding `slot` until the handler ends,
/// and decides what to record: the outcome, or a retry. A task past its
/// attempts is not run again: it is a poison message that kept killing its worker.
async fn run(
    ctx: &Context,
    task: &TaskMessage,
    attempt: u32,
    slot: OwnedSemaphorePermit,
    abandon: &CancellationToken,
) -> Result<Ran, Stopped> {
    if attempt > ctx.retry.max_attempts {
        return Ok(Ran::Done {
            outcome: gave_up(attempt - 1),
            dead_letter: true,
        });
    }
    let limit = ctx.time_limits.for_type(&task.task_type);
    let outcome = tokio::select! {
        () = abandon.cancelled() => return Err(Stopped::Abandoned),
        outcome = executor::execute(&ctx.registry, task, limit, slot) => outcome,
    };
    tracing::debug!(run_ms = outcome.duration.as_secs_f64() * 1e3, "task ran");
    let task_type = task.task_type.clone();
    metrics::histogram!(names::RUN_TIME, "task_type" => task_type)
        .record(outcome.duration.as_secs_f64());
    let Some(error) = outcome.error.clone() else {
        return Ok(Ran::Done {
            outcome,
            dead_letter: false,
        });
    };
    if !outcome.retryable {
        tracing::info!(%error, "task failed");
        return Ok(Ran::Done {
            outcome,
            dead_letter: false,
        });
    }
    if !ctx.retry.should_retry(attempt) {
        let error = format!("failed after {attempt} attempts: {error}");
        return Ok(Ran::Done {
            outcome: Outcome {
                error: Some(error),
                ..outcome
            },
            dead_letter: true,
        });
    }
    tracing::info!(%error, "task failed; will retry");
    metrics::counter!(names::RETRIED, "task_type" => task.task_type.clone()).increment(1);
    let task_id = task.task_id.as_str();
    persist_row(abandon, || {
        ctx.db.retry_later(task_id, &ctx.worker_id, &error)
    })
    .await?;
    Ok(Ran::Retry {
        delay_ms: ctx.retry.delay_ms(attempt, random_fraction()),
    })
}

/// Records how the task ended; returns its row as PostgreSQL holds it (the
/// first finish wins, so a rerun gets the first outcome back). A result
/// PostgreSQL refuses (a NUL from a custom handler) is recorded as a failure.
async fn record(
    ctx: &Context,
    task: &TaskMessage,
    outcome: Outcome,
    abandon: &CancellationToken,
) -> Result<TaskRow, Stopped> {
    let finish = Finish {
        task_id: task.task_id.to_string(),
        state: outcome.state,
        result: outcome.result,
        error: outcome.error,
        worker_id: ctx.worker_id.clone(),
        duration_ms: u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
    };
    let storing = Instant::now();
    let recorded = persist_row(abandon, || ctx.db.finish(finish.clone())).await;
    let elapsed = storing.elapsed().as_secs_f64();
    metrics::histogram!(names::STORE_TIME, "store" => "postgres").record(elapsed);
    match recorded {
        Err(Stopped::Unstorable(cause)) => {
            tracing::warn!(%cause, "PostgreSQL refuses the task's result; recording a failure");
            let failed = Finish {
                state: TaskState::Failed,
                result: None,
                error: Some("the task's result cannot be stored (a NUL character?)".into()),
                ..finish
            };
            persist_row(abandon, || ctx.db.finish(failed.clone())).await
        }
        recorded => recorded,
    }
}

/// A PostgreSQL step on this task's row, retried with backoff while
/// PostgreSQL is away. A data error is this row's own and permanent:
/// retrying cannot help, so it stops the delivery.
async fn persist_row<T, F, Fut>(abandon: &CancellationToken, mut step: F) -> Result<T, Stopped>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, DbError>>,
{
    let outcome = retry_until_ok(&POSTGRES, abandon, || {
        let attempt = step();
        async move {
            match attempt.await {
                Ok(value) => Ok(Ok(value)),
                Err(err) if err.is_data_error() => Ok(Err(err)),
                Err(err) => Err(err),
            }
        }
    });
    match outcome.await {
        None => Err(Stopped::Abandoned),
        Some(Ok(value)) => Ok(value),
        Some(Err(err)) => Err(Stopped::Unstorable(err.to_string())),
    }
}

/// Counts a task this delivery ran to its end, as the row records it (the
/// first finish wins): the counters, the worker's totals, its queue wait.
fn finished(ctx: &Context, row: &TaskRow) {
    let outcome = match row.state {
        TaskState::Succeeded => "succeeded",
        _ => "failed",
    };
    let labels = [
        ("task_type", row.task_type.clone()),
        ("outcome", outcome.to_owned()),
    ];
    metrics::counter!(names::FINISHED, &labels).increment(1);
    let total = match row.state {
        TaskState::Succeeded => &ctx.done,
        _ => &ctx.failed,
    };
    total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if let Some(started_at) = &row.started_at {
        if let Some(wait) = names::seconds_between(&row.created_at, started_at) {
            metrics::histogram!(names::QUEUE_WAIT).record(wait);
        }
    }
}

fn dead_lettered(task: &TaskMessage) {
    let task_type = task.task_type.clone();
    metrics::counter!(names::DEAD_LETTERED, "task_type" => task_type).increment(1);
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
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
    channels: &Channels,
    task: &TaskMessage,
    delivery: &Delivery,
    delay_ms: u64,
) -> Result<(), PublishError> {
    let queue = channels.retry_queue(&ctx.topology, delay_ms).await?;
    let envelope = Envelope::forwarded(task.task_id.as_str(), &delivery.properties);
    let published =
        amqp::publish_persistent(&channels.publish, &queue, &delivery.data, envelope).await;
    if let Err(PublishError::Unroutable(_)) = published {
        channels.forget_retry_queue(delay_ms);
    }
    published
}

/// Releases the claim and returns the message to the queue.
async fn hand_back(
    ctx: &Context,
    task: &TaskMessage,
    delivery: &Delivery,
) -> Result<bool, lapin::Error> {
    release(ctx, task).await;
    delivery.nack(requeue()).await
}

/// Best effort: the claim does not count when the task is handed back.
async fn release(ctx: &Context, task: &TaskMessage) {
    let released = tokio::time::timeout(
        Duration::from_secs(2),
        ctx.db.release(task.task_id.as_str(), &ctx.worker_id),
    );
    if let Ok(Err(err)) = released.await {
        tracing::debug!(cause = %err, "could not release the claim");
    }
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
    tracing::warn!(%cause, "could not send the result back; it is stored");
}
