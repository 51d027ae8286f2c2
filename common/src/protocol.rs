//! The wire protocol between a client and the distribuidor: UTF-8 JSON
//! objects; the distribuidor writes one per line. See `docs/protocol.md`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::task::{InvalidTaskId, TaskId, TaskReport, TaskState};

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Task(TaskRequest),
    Status {
        task_id: String,
    },
    Ping,
    /// Can this distribuidor accept tasks right now? (For healthchecks.)
    Health,
    /// Authenticates the connection; the first message when the
    /// distribuidor has tokens configured.
    Auth {
        token: String,
    },
}

/// `{"type":"task", ...}`: everything optional but what the task type needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<bool>,
}

/// A message from the distribuidor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// The task is durably queued: RabbitMQ confirmed it.
    Ack {
        task_id: TaskId,
        status: TaskState,
    },
    /// The task finished.
    Result(TaskReport),
    /// The answer to a status request.
    Status {
        task_id: String,
        state: StatusState,
        #[serde(default)]
        result: Option<Value>,
        #[serde(default)]
        error: Option<String>,
    },
    Pong,
    /// The answer to an auth request: who the connection now acts as.
    Auth {
        ok: bool,
        client: String,
    },
    /// The answer to a health request: `ready` when both dependencies answer.
    Health {
        ready: bool,
        rabbitmq: bool,
        postgres: bool,
    },
    Error(ErrorReply),
}

/// A task's state as a status request sees it: `unknown` when no such task
/// was ever acked, `expired` when retention removed it (`TAREAS_RESULT_TTL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Unknown,
    Expired,
}

impl From<TaskState> for StatusState {
    fn from(state: TaskState) -> Self {
        match state {
            TaskState::Queued => StatusState::Queued,
            TaskState::Running => StatusState::Running,
            TaskState::Succeeded => StatusState::Succeeded,
            TaskState::Failed => StatusState::Failed,
        }
    }
}

/// `{"type":"error","code":…,"message":…,"task_id":…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default)]
    pub task_id: Option<String>,
}

/// Every error a client can receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON. The distribuidor skips to the next newline.
    InvalidJson,
    /// JSON, but not a request: missing or unknown `type`, bad `task_id`, wrong field types.
    InvalidRequest,
    /// `task_type` names no task type this deployment runs.
    UnknownTaskType,
    /// The payload does not fit the task type.
    InvalidPayload,
    /// One message exceeded the size limit; the connection is closed.
    TooLarge,
    /// RabbitMQ or PostgreSQL is down: the task was NOT accepted. Retry later.
    Unavailable,
    /// The server is at its connection limit; the connection is closed.
    TooManyConnections,
    /// The connection was idle for too long; it is closed.
    IdleTimeout,
    /// A message took too long to arrive once started; the connection is closed.
    RequestTimeout,
    /// The client does not read its replies fast enough (output limit or
    /// write deadline); the connection is closed, results stay available by `status`.
    SlowConsumer,
    /// The work queue is at its maximum length: the task was NOT accepted.
    QueueFull,
    /// The client has its quota of tasks queued or running: the task was
    /// NOT accepted; the connection stays usable.
    QuotaExceeded,
    /// The outcome of the submission is unknown (a confirm that timed out,
    /// a link lost after the publish went out): the task may or may not
    /// run. Resubmitting the same `task_id` is safe.
    Uncertain,
    /// The distribuidor requires a token: the connection sent something
    /// else first, a wrong token, or nothing in time. It is closed.
    Unauthenticated,
    /// The client already submitted this `task_id` with another task type
    /// or payload: the task was NOT accepted; the connection stays usable.
    Conflict,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownTaskType => "unknown_task_type",
            ErrorCode::InvalidPayload => "invalid_payload",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Uncertain => "uncertain",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Conflict => "conflict",
        }
    }
}

impl Reply {
    pub fn error(code: ErrorCode, message: impl Into<String>, task_id: Option<String>) -> Reply {
        Reply::Error(ErrorReply {
            code,
            message: message.into(),
            task_id,
        })
    }

    /// The reply as one line of JSON, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self)
            .expect("a Reply always serializes: no maps with non-string keys");
        line.push(b'\n');
        line
    }
}

/// Why a frame is not a valid request.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
    /// The `task_id` of the offending request, when it had a readable one.
    pub task_id: Option<String>,
}

impl RequestError {
    fn new(code: ErrorCode, message: impl Into<String>, task_id: Option<String>) -> Self {
        RequestError {
            code,
            message: message.into(),
            task_id,
        }
    }

    pub fn into_reply(self) -> Reply {
        Reply::error(self.code, self.message, self.task_id)
    }
}

impl From<InvalidTaskId> for RequestError {
    fn from(err: InvalidTaskId) -> Self {
        RequestError::new(ErrorCode::InvalidRequest, err.to_string(), None)
    }
}

impl Request {
    /// Parses one frame: `invalid_json` when it is not JSON, `invalid_request`
    /// when it is JSON but not a request.
    pub fn parse(frame: &[u8]) -> Result<Request, RequestError> {
        let value: Value = serde_json::from_slice(frame).map_err(|err| {
            RequestError::new(
                ErrorCode::InvalidJson,
                format!("not valid JSON ({err}); send one JSON object per message"),
                None,
            )
        })?;
        let Value::Object(object) = value else {
            return Err(RequestError::new(
                ErrorCode::InvalidRequest,
                "a request must be a JSON object with a \"type\" field",
                None,
            ));
        };
        let task_id = readable_task_id(&object);
        let kind = match object.get("type") {
            Some(Value::String(kind)) => kind.clone(),
            Some(_) => {
                return Err(RequestError::new(
                    ErrorCode::InvalidRequest,
                    "\"type\" must be a string",
                    task_id,
                ))
            }
            None => return Err(RequestError::new(
                ErrorCode::InvalidRequest,
                "missing \"type\": expected \"task\", \"status\", \"ping\", \"health\" or \"auth\"",
                task_id,
            )),
        };
        if !matches!(
            kind.as_str(),
            "task" | "status" | "ping" | "health" | "auth"
        ) {
            return Err(RequestError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "unknown type {kind:?}: expected \"task\", \"status\", \"ping\", \"health\" or \"auth\""
                ),
                task_id,
            ));
        }
        serde_json::from_value(Value::Object(object)).map_err(|err| {
            RequestError::new(
                ErrorCode::InvalidRequest,
                format!("malformed {kind} request: {err}"),
                task_id,
            )
        })
    }
}

fn readable_task_id(object: &Map<String, Value>) -> Option<String> {
    match object.get("task_id") {
        Some(Value::String(id)) => {
            Some(id.chars().take(crate::task::MAX_TASK_ID_LEN + 8).collect())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_the_three_requests() {
        let task =
            Request::parse(br#"{"type":"task","task_type":"hash","payload":{"text":"hola"}}"#)
                .unwrap();
        assert_eq!(
            task,
            Request::Task(TaskRequest {
                task_type: Some("hash".into()),
                payload: Some(json!({"text":"hola"})),
                ..TaskRequest::default()
            })
        );
        assert_eq!(
            Request::parse(br#"{"type":"ping"}"#).unwrap(),
            Request::Ping
        );
        assert_eq!(
            Request::parse(br#"{"type":"status","task_id":"x"}"#).unwrap(),
            Request::Status {
                task_id: "x".into()
            }
        );
    }

    #[test]
    fn classifies_bad_requests() {
        let code = |frame: &[u8]| Request::parse(frame).unwrap_err().code;
        assert_eq!(code(b"{nope"), ErrorCode::InvalidJson);
        assert_eq!(code(b"[1,2]"), ErrorCode::InvalidRequest);
        assert_eq!(code(br#"{"task_id":"a"}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(br#"{"type":"launch"}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(br#"{"type":7}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(br#"{"type":"status"}"#), ErrorCode::InvalidRequest);
        assert_eq!(
            code(br#"{"type":"task","notify":"yes"}"#),
            ErrorCode::InvalidRequest
        );
        let err = Request::parse(br#"{"type":"launch","task_id":"t1"}"#).unwrap_err();
        assert_eq!(err.task_id.as_deref(), Some("t1"));
    }

    #[test]
    fn replies_are_single_lines() {
        let reply = Reply::error(ErrorCode::TooLarge, "too\nlarge", None);
        let line = reply.to_line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let back: Reply = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, reply);
        let pong: Value = serde_json::from_slice(&Reply::Pong.to_line()).unwrap();
        assert_eq!(pong, json!({"type":"pong"}));
    }
}
