//! Task ids and keys, task states, and the two messages that travel through
//! RabbitMQ: [`TaskMessage`] (distribuidor → worker) and [`TaskReport`]
//! (worker → distribuidor).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::token::{check_client_name, ANONYMOUS};

/// Longest task id a client may choose.
pub const MAX_TASK_ID_LEN: usize = 128;

/// A validated task id: 1–128 characters of `[A-Za-z0-9._:-]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskId(String);

/// Why a string is not a [`TaskId`].
#[derive(Debug, thiserror::Error)]
#[error("task_id must be 1-{MAX_TASK_ID_LEN} characters of [A-Za-z0-9._:-], got {0:?}")]
pub struct InvalidTaskId(pub String);

impl TaskId {
    /// A fresh random id (a UUID v4), used when the client chose none.
    pub fn generate() -> TaskId {
        TaskId(uuid::Uuid::new_v4().to_string())
    }

    /// Checks `raw` against the task id rules.
    pub fn parse(raw: &str) -> Result<TaskId, InvalidTaskId> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-');
        if raw.is_empty() || raw.len() > MAX_TASK_ID_LEN || !raw.chars().all(valid_char) {
            let shown: String = raw.chars().take(MAX_TASK_ID_LEN + 8).collect();
            return Err(InvalidTaskId(shown));
        }
        Ok(TaskId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TaskId {
    type Error = InvalidTaskId;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        TaskId::parse(&raw)
    }
}

impl From<TaskId> for String {
    fn from(id: TaskId) -> String {
        id.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A task as the system names it: a client's [`TaskId`] within that
/// client's scope, `<client>/<task_id>`, or the bare id in the scope
/// anonymous clients share. It is the `task_id` of the `tasks` table, of the
/// messages in RabbitMQ and of the S3 key; a client only ever sees its id
/// ([`TaskKey::id`]): ids never contain `/`, so no client can name a key of
/// another's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TaskKey(String);

impl TaskKey {
    /// `id` in the scope of client `client` (a valid client name, or
    /// [`ANONYMOUS`]).
    pub fn new(client: &str, id: &TaskId) -> TaskKey {
        if client == ANONYMOUS {
            return TaskKey(id.0.clone());
        }
        debug_assert!(check_client_name(client).is_ok(), "{client:?}");
        TaskKey(format!("{client}/{id}"))
    }

    /// The task `raw` (as a client sends it, unchecked) of client `client`.
    pub fn for_client(client: &str, raw: &str) -> Result<TaskKey, InvalidTaskId> {
        Ok(TaskKey::new(client, &TaskId::parse(raw)?))
    }

    /// Checks a key as stored: `<client>/<task_id>` or a bare task id.
    pub fn parse(raw: &str) -> Result<TaskKey, InvalidTaskId> {
        let invalid = || InvalidTaskId(raw.to_owned());
        match raw.split_once('/') {
            None => Ok(TaskKey::from(TaskId::parse(raw).map_err(|_| invalid())?)),
            Some((client, id)) => {
                check_client_name(client).map_err(|_| invalid())?;
                Ok(TaskKey::new(
                    client,
                    &TaskId::parse(id).map_err(|_| invalid())?,
                ))
            }
        }
    }

    /// The client whose task it is ([`ANONYMOUS`] for the shared scope).
    pub fn client(&self) -> &str {
        self.0
            .split_once('/')
            .map_or(ANONYMOUS, |(client, _)| client)
    }

    /// The task id as its client named it.
    pub fn id(&self) -> TaskId {
        let id = self.0.split_once('/').map_or(self.0.as_str(), |(_, id)| id);
        TaskId(id.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<TaskId> for TaskKey {
    /// The id in the anonymous scope.
    fn from(id: TaskId) -> TaskKey {
        TaskKey(id.0)
    }
}

impl TryFrom<String> for TaskKey {
    type Error = InvalidTaskId;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        TaskKey::parse(&raw)
    }
}

impl From<TaskKey> for String {
    fn from(key: TaskKey) -> String {
        key.0
    }
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a task is in its life. `Succeeded` and `Failed` are terminal: a task
/// never leaves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Queued,
    Running,
    Succeeded,
    Failed,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Failed)
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "queued" => Ok(TaskState::Queued),
            "running" => Ok(TaskState::Running),
            "succeeded" => Ok(TaskState::Succeeded),
            "failed" => Ok(TaskState::Failed),
            other => Err(format!("unknown task state {other:?}")),
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of a message on the `tareas` queue. The reply address travels
/// in the AMQP `reply_to` property, not here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    pub task_id: TaskKey,
    pub task_type: String,
    pub payload: Value,
    /// Whether the submitting client wants the result pushed back.
    #[serde(default = "default_true")]
    pub notify: bool,
}

fn default_true() -> bool {
    true
}

/// A finished task as the worker reports it back to the distribuidor that
/// accepted it; also the `result` reply the client receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    pub task_id: TaskKey,
    /// `succeeded` or `failed`.
    pub status: TaskState,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub worker_id: Option<String>,
    pub duration_ms: Option<u64>,
}

impl TaskReport {
    /// The report as its client receives it: its id, not its key.
    pub fn for_its_client(mut self) -> TaskReport {
        self.task_id = TaskKey::from(self.task_id.id());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_id_rules() {
        assert!(TaskId::parse("abc-1.2_3:x").is_ok());
        assert!(TaskId::parse(&"a".repeat(128)).is_ok());
        assert!(TaskId::parse(&"a".repeat(129)).is_err());
        assert!(TaskId::parse("").is_err());
        assert!(TaskId::parse("con espacio").is_err());
        assert!(TaskId::parse("ñ").is_err());
        assert_eq!(TaskId::generate().as_str().len(), 36);
    }

    #[test]
    fn a_key_scopes_an_id_to_its_client() {
        let id = TaskId::parse("pedido-42").unwrap();
        let alice = TaskKey::new("alice", &id);
        assert_eq!(alice.as_str(), "alice/pedido-42");
        assert_eq!((alice.client(), alice.id()), ("alice", id.clone()));
        let shared = TaskKey::new(ANONYMOUS, &id);
        assert_eq!(shared.as_str(), "pedido-42");
        assert_eq!(shared.client(), ANONYMOUS);
        assert_ne!(alice, shared);
        assert_eq!(TaskKey::parse("alice/pedido-42").unwrap(), alice);
        assert_eq!(TaskKey::parse("pedido-42").unwrap(), shared);
        for bad in ["a/b/c", "/x", "x/", "anonymous/x", "bad name/x", ""] {
            assert!(TaskKey::parse(bad).is_err(), "{bad}");
        }
        let report = TaskReport {
            task_id: alice,
            status: TaskState::Succeeded,
            result: None,
            error: None,
            worker_id: None,
            duration_ms: None,
        };
        assert_eq!(report.for_its_client().task_id, shared);
    }

    #[test]
    fn state_round_trips() {
        for s in [
            TaskState::Queued,
            TaskState::Running,
            TaskState::Succeeded,
            TaskState::Failed,
        ] {
            assert_eq!(s.as_str().parse::<TaskState>(), Ok(s));
        }
        assert!(TaskState::Succeeded.is_terminal());
        assert!(!TaskState::Running.is_terminal());
    }
}
