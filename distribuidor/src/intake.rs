//! What the distribuidor does with each request: validate a task, record it
//! as `queued`, publish it with a confirm, and only then ack; answer status
//! queries from PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;

use tareas_common::builtin::{self, PayloadError};
use tareas_common::db::{Db, Origin, RowVersion, Submission, TaskRecord};
use tareas_common::protocol::{ErrorCode, Reply, RequestError, StatusState, TaskRequest};
use tareas_common::task::{TaskId, TaskKey, TaskMessage, TaskReport, TaskState};

use tareas_common::backoff::POSTGRES;
use tareas_common::metrics as names;

use crate::broker::Broker;
use crate::router::{ConnectionId, ResultSender, Router};
use tareas_common::amqp::PublishError;

/// What every connection shares.
pub struct Shared {
    /// The `tasks` table.
    pub db: Db,
    /// The link to RabbitMQ.
    pub broker: Broker,
    /// Where results for this instance's clients are routed.
    pub router: Arc<Router>,
    /// Task types accepted besides the built-ins.
    pub extra_task_types: HashSet<String>,
    /// Caps on built-in payloads.
    pub payload_limits: builtin::PayloadLimits,
    /// Tasks one client may have queued or running.
    pub quota: crate::quota::Quota,
    /// The bytes all connections together may hold.
    pub memory: Arc<crate::memory::Memory>,
    /// This process, as the rows it records name their owner.
    pub instance: String,
    /// The client tokens; none: anonymous clients are served.
    pub tokens: crate::auth::Tokens,
    /// The operators' tokens (the dashboard).
    pub operators: crate::auth::Tokens,
}

/// The replies to one request, in order, the task whose result the
/// connection now waits for, if any, and the submission it settles (the
/// task whose ack, or refusal, it carries).
pub struct Handled {
    pub replies: Vec<Reply>,
    pub subscribed: Option<TaskKey>,
    pub settles: Option<TaskKey>,
}

impl Handled {
    /// A reply that settles no submission.
    pub fn reply(reply: Reply) -> Handled {
        Handled {
            replies: vec![reply],
            subscribed: None,
            settles: None,
        }
    }
}

impl Shared {
    /// Turns a task request of client `scope` into the message to queue,
    /// or says why not. Runs before anything is written anywhere.
    pub fn prepare(&self, request: TaskRequest, scope: &str) -> Result<TaskMessage, RequestError> {
        metrics::counter!(names::RECEIVED).increment(1);
        let prepared = self.validate(request, scope);
        if let Err(err) = &prepared {
            metrics::counter!(names::REFUSED, "code" => err.code.as_str()).increment(1);
        }
        prepared
    }

    fn validate(&self, request: TaskRequest, scope: &str) -> Result<TaskMessage, RequestError> {
        let task_id = match &request.task_id {
            Some(raw) => TaskId::parse(raw)?,
            None => TaskId::generate(),
        };
        let refuse = |err: PayloadError| {
            let code = match err {
                PayloadError::UnknownTaskType(_) => ErrorCode::UnknownTaskType,
                PayloadError::Invalid { .. } => ErrorCode::InvalidPayload,
            };
            RequestError {
                code,
                message: err.to_string(),
                task_id: Some(task_id.to_string()),
            }
        };
        let (task_type, payload) =
            builtin::normalize(request.task_type, request.payload).map_err(refuse)?;
        builtin::check_storable(&task_type, &payload).map_err(refuse)?;
        if builtin::is_builtin(&task_type) {
            builtin::validate(&task_type, &payload, &self.payload_limits).map_err(refuse)?;
        } else if !self.extra_task_types.contains(&task_type) {
            return Err(refuse(PayloadError::UnknownTaskType(task_type)));
        }
        Ok(TaskMessage {
            task_id: TaskKey::new(scope, &task_id),
            task_type,
            payload,
            notify: request.notify.unwrap_or(true),
        })
    }

    /// Queues a prepared task and returns the ack, or `unavailable`.
    ///
    /// A task id seen before is acked again without a second run: a
    /// finished one gets its stored result pushed, a running one is left
    /// alone, and a queued one is published again (its first publish may
    /// never have been confirmed; the worker's writes make a duplicate
    /// message harmless).
    #[tracing::instrument(name = "submit", skip_all, fields(task_id = %task.task_id, trace_id))]
    pub async fn submit(
        &self,
        task: TaskMessage,
        connection: ConnectionId,
        client: &str,
        results: &ResultSender,
    ) -> Handled {
        let task_id = task.task_id.clone();
        if task.notify {
            self.router.subscribe(&task_id, connection, results);
        }
        let ack = Reply::Ack {
            task_id: task_id.id(),
            status: TaskState::Queued,
        };
        match self.queue(&task, client).await {
            Ok(Queued::Published(_) | Queued::Running) => Handled {
                replies: vec![ack],
                subscribed: task.notify.then(|| task_id.clone()),
                settles: Some(task_id),
            },
            Ok(Queued::Finished(record)) => {
                self.router.unsubscribe(&task_id, connection);
                let mut replies = vec![ack];
                if task.notify {
                    let report = report_from_record(&task_id, record).for_its_client();
                    replies.push(Reply::Result(report));
                }
                Handled {
                    replies,
                    subscribed: None,
                    settles: Some(task_id),
                }
            }
            Err(refusal) => {
                self.router.unsubscribe(&task_id, connection);
                let reply = refusal.reply(&task_id.id());
                Handled {
                    settles: Some(task_id),
                    ..Handled::reply(reply)
                }
            }
        }
    }

    /// Queues a prepared task of a client that waits on no connection (the
    /// HTTP API): the same path and promise as [`Shared::submit`]'s ack, or
    /// the refusal's error reply.
    pub async fn submit_detached(&self, task: &TaskMessage, client: &str) -> Result<(), Reply> {
        match self.queue(task, client).await {
            Ok(_) => Ok(()),
            Err(refusal) => Err(refusal.reply(&task.task_id.id())),
        }
    }

    /// Records the task, then publishes it if it needs to be: the order
    /// that lets the ack promise both.
    async fn queue(&self, task: &TaskMessage, client: &str) -> Result<Queued, Refusal> {
        let started = std::time::Instant::now();
        let queued = self.admit_and_queue(task, client).await;
        match &queued {
            Ok(_) => {
                metrics::counter!(names::ACKED).increment(1);
                metrics::histogram!(names::ACK_LATENCY).record(started.elapsed().as_secs_f64());
            }
            Err(refusal) => {
                let code = refusal.code().as_str();
                metrics::counter!(names::REFUSED, "code" => code).increment(1);
            }
        }
        queued
    }

    async fn admit_and_queue(&self, task: &TaskMessage, client: &str) -> Result<Queued, Refusal> {
        match self.quota.admit(&self.db, client).await {
            Ok(true) => {}
            Ok(false) => return Err(Refusal::QuotaExceeded(self.quota.limit())),
            Err(err) => {
                POSTGRES.failed(&err);
                return Err(Refusal::Unavailable("PostgreSQL is unavailable"));
            }
        }
        let queued = self.record_and_publish(task, client).await;
        if !matches!(queued, Ok(Queued::Published(true))) {
            // No new outstanding task of this client's: its place goes back.
            self.quota.release(client);
        }
        queued
    }

    async fn record_and_publish(
        &self,
        task: &TaskMessage,
        client: &str,
    ) -> Result<Queued, Refusal> {
        let started = std::time::Instant::now();
        let origin = Origin {
            client: client.to_owned(),
            queue: self.quota.queue().to_owned(),
            owner: self.instance.clone(),
        };
        let recording = self.db.insert_queued_from(task, origin);
        let recorded = match recording.await {
            Ok(recorded) => {
                POSTGRES.succeeded();
                recorded
            }
            Err(err) if err.is_data_error() => {
                tracing::warn!(cause = %err, "PostgreSQL refuses the task's data");
                return Err(Refusal::Unstorable);
            }
            Err(err) => {
                POSTGRES.failed(&err);
                return Err(Refusal::Unavailable("PostgreSQL is unavailable"));
            }
        };
        let inserted = started.elapsed();
        let publish = match recorded {
            Submission::New(version) => Publish::NewRow(version),
            Submission::Existing(record) if record.state.is_terminal() => {
                return Ok(Queued::Finished(record))
            }
            Submission::Existing(record) if record.state == TaskState::Queued => {
                Publish::QueuedAgain
            }
            // Running: the message that runs it is in RabbitMQ already.
            Submission::Existing(_) => return Ok(Queued::Running),
            Submission::Conflict => return Err(Refusal::Conflict),
        };
        let new_row = matches!(publish, Publish::NewRow(_));
        self.publish(task, publish).await?;
        tracing::debug!(
            insert_ms = inserted.as_secs_f64() * 1e3,
            publish_ms = (started.elapsed() - inserted).as_secs_f64() * 1e3,
            "task queued"
        );
        Ok(Queued::Published(new_row))
    }

    /// Publishes a recorded task. A refused publish of a new row removes
    /// the row (certainly not queued: no `queued` row may outlive it); a
    /// republished queued row is renewed, so a refused twin cannot remove it.
    async fn publish(&self, task: &TaskMessage, publish: Publish) -> Result<(), Refusal> {
        let task_id = task.task_id.as_str();
        if let Err(err) = self.broker.publish(task).await {
            if !matches!(err, PublishError::Disconnected) {
                tracing::warn!(cause = %err, "publish failed; the client is told");
            }
            // A refusal promises the task will NOT run: its row must go
            // first, or the outbox relay would publish it later. A queued
            // row of an earlier submission stays: that task may run.
            let Publish::NewRow(version) = &publish else {
                return Err(Refusal::Uncertain);
            };
            if !err.certainly_not_queued() {
                return Err(Refusal::Uncertain);
            }
            match self.db.forget_unpublished(task_id, version).await {
                Ok(true) => {}
                // Another submission of the id published it meanwhile.
                Ok(false) => return Err(Refusal::Uncertain),
                Err(err) => {
                    tracing::debug!(cause = %err, "could not remove the unpublished row");
                    return Err(Refusal::Uncertain);
                }
            }
            if matches!(err, PublishError::Nacked) && self.broker.queue_is_full().await {
                return Err(Refusal::QueueFull);
            }
            return Err(Refusal::Unavailable(err.client_message()));
        }
        // Best effort, off the ack's path: a row left unmarked is only
        // published once more by the relay.
        let (db, id) = (self.db.clone(), task.task_id.clone());
        tokio::spawn(async move { db.mark_published(&id).await });
        if let Publish::QueuedAgain = publish {
            if let Err(err) = self.db.keep_queued(task).await {
                tracing::debug!(cause = %err, "could not keep the queued row");
            }
        }
        Ok(())
    }

    /// Answers `{"type":"health"}`: ready when RabbitMQ is connected and
    /// PostgreSQL answers within a second.
    pub async fn health(&self) -> Reply {
        let rabbitmq = self.broker.is_connected();
        let postgres = matches!(
            tokio::time::timeout(std::time::Duration::from_secs(1), self.db.ping()).await,
            Ok(Ok(()))
        );
        Reply::Health {
            ready: rabbitmq && postgres,
            rabbitmq,
            postgres,
        }
    }

    /// Answers `{"type":"status"}` of client `scope`: its own tasks only.
    pub async fn status(&self, scope: &str, raw_task_id: String) -> Reply {
        let key = match TaskKey::for_client(scope, &raw_task_id) {
            Ok(key) => key,
            Err(err) => return Reply::error(ErrorCode::InvalidRequest, err.to_string(), None),
        };
        let status = match self.db.status(key.as_str()).await {
            Ok(None) => self
                .db
                .is_expired(key.as_str())
                .await
                .map(|expired| (None, expired)),
            found => found.map(|record| (record, false)),
        };
        match status {
            Ok((Some(record), _)) => Reply::Status {
                task_id: raw_task_id,
                state: StatusState::from(record.state),
                result: record.result,
                error: record.error,
            },
            Ok((None, expired)) => Reply::Status {
                task_id: raw_task_id,
                state: match expired {
                    true => StatusState::Expired,
                    false => StatusState::Unknown,
                },
                result: None,
                error: None,
            },
            Err(err) => {
                POSTGRES.failed(&err);
                Reply::error(
                    ErrorCode::Unavailable,
                    "PostgreSQL is unavailable; retry later".to_owned(),
                    Some(raw_task_id),
                )
            }
        }
    }
}

/// What a submission publishes, from what PostgreSQL said of its id.
enum Publish {
    /// A new row, in this version.
    NewRow(RowVersion),
    /// A resubmission of a task still `queued`: published again.
    QueuedAgain,
}

/// Where a submitted task stands once the distribuidor is done with it.
enum Queued {
    /// Recorded and confirmed by RabbitMQ (now or by an earlier submission
    /// that is republished): ack, and wait for the result. `true` for a
    /// new row (one more outstanding task of its client).
    Published(bool),
    /// A resubmission of a task that is running: ack, and wait.
    Running,
    /// A resubmission of a finished task: ack, and push what is recorded.
    Finished(TaskRecord),
}

/// Why a submission was not accepted.
enum Refusal {
    /// A dependency is away or refused it: `unavailable`, naming which,
    /// never its own error text (that goes to the log).
    Unavailable(&'static str),
    /// PostgreSQL refuses the task's data: `invalid_payload`.
    Unstorable,
    /// The work queue is at `TAREAS_QUEUE_MAX_LENGTH`: `queue_full`.
    QueueFull,
    /// The client has this many tasks queued or running: `quota_exceeded`.
    QuotaExceeded(u64),
    /// The client used this id for another task type or payload: `conflict`.
    Conflict,
    /// The publish may or may not have reached the queue: `uncertain`.
    Uncertain,
}

impl Refusal {
    fn code(&self) -> ErrorCode {
        match self {
            Refusal::Unavailable(_) => ErrorCode::Unavailable,
            Refusal::Unstorable => ErrorCode::InvalidPayload,
            Refusal::QueueFull => ErrorCode::QueueFull,
            Refusal::QuotaExceeded(_) => ErrorCode::QuotaExceeded,
            Refusal::Conflict => ErrorCode::Conflict,
            Refusal::Uncertain => ErrorCode::Uncertain,
        }
    }

    fn reply(&self, task_id: &TaskId) -> Reply {
        let message = match self {
            Refusal::Unavailable(what) => {
                format!("{what}; the task was NOT accepted, retry later")
            }
            Refusal::Unstorable => {
                "the task's data cannot be stored; the task was NOT accepted".to_owned()
            }
            Refusal::QuotaExceeded(limit) => format!(
                "this client has {limit} tasks queued or running \
                 (TAREAS_MAX_OUTSTANDING_PER_CLIENT); the task was NOT accepted, \
                 retry when some have finished"
            ),
            Refusal::Conflict => "this task_id was already submitted with another task_type \
                                  or payload; the task was NOT accepted. Choose a new task_id \
                                  (or resend the first task's exact fields to get its result)"
                .to_owned(),
            Refusal::Uncertain => "RabbitMQ's answer was lost; the task may or may not run. \
                                   Resubmitting the same task_id is safe"
                .to_owned(),
            Refusal::QueueFull => "the work queue is full (TAREAS_QUEUE_MAX_LENGTH); the task \
                                   was NOT accepted, retry later"
                .to_owned(),
        };
        Reply::error(self.code(), message, Some(task_id.to_string()))
    }
}

pub(crate) fn report_from_record(task_id: &TaskKey, record: TaskRecord) -> TaskReport {
    TaskReport {
        task_id: task_id.clone(),
        status: record.state,
        result: record.result,
        error: record.error,
        worker_id: record.worker_id,
        duration_ms: record.duration_ms,
    }
}
