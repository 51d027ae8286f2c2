//! Task handlers by `task_type`. A handler turns a payload into a result
//! or a [`TaskError`]; the registry is how users add their own task types.
//!
//! ```no_run
//! use serde_json::json;
//! use tareas_worker::registry::{Registry, TaskError};
//!
//! let mut registry = Registry::new();
//! // CPU-bound work runs on the blocking pool, never on the async runtime.
//! registry.register_blocking("upper", |payload| {
//!     let text = payload["text"].as_str().ok_or_else(|| TaskError::permanent("payload needs \"text\""))?;
//!     Ok(json!({ "text": text.to_uppercase() }))
//! });
//! // I/O-bound work is async.
//! registry.register_async("wait", |_payload| async {
//!     tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//!     Ok(json!({}))
//! });
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

/// Whether retrying could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The task can never succeed (bad payload, a refusal): fail it at once.
    Permanent,
    /// The task might succeed later (a remote service was down).
    Transient,
}

/// A handler's failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    pub kind: ErrorKind,
    pub message: String,
}

impl TaskError {
    pub fn permanent(message: impl Into<String>) -> TaskError {
        TaskError {
            kind: ErrorKind::Permanent,
            message: message.into(),
        }
    }

    pub fn transient(message: impl Into<String>) -> TaskError {
        TaskError {
            kind: ErrorKind::Transient,
            message: message.into(),
        }
    }
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

/// What a handler returns.
pub type TaskResult = Result<Value, TaskError>;

/// A boxed async handler.
pub type AsyncHandler =
    Arc<dyn Fn(Value) -> Pin<Box<dyn Future<Output = TaskResult> + Send>> + Send + Sync>;

/// How a registered handler runs.
#[derive(Clone)]
pub enum Handler {
    /// Runs on tokio's blocking pool: CPU-bound or blocking code.
    Blocking(Arc<dyn Fn(Value) -> TaskResult + Send + Sync>),
    /// Polled within the delivery's own task: async I/O, or work of a few
    /// microseconds (no hand-off to another thread costs more than that).
    Async(AsyncHandler),
}

/// task_type → handler.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers a synchronous handler, run on the blocking pool.
    pub fn register_blocking<F>(&mut self, task_type: &str, handler: F) -> &mut Registry
    where
        F: Fn(Value) -> TaskResult + Send + Sync + 'static,
    {
        self.handlers
            .insert(task_type.to_owned(), Handler::Blocking(Arc::new(handler)));
        self
    }

    /// Registers an async handler, polled within the delivery's task;
    /// dropped (cancelled) when it overruns its time limit.
    pub fn register_async<F, Fut>(&mut self, task_type: &str, handler: F) -> &mut Registry
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = TaskResult> + Send + 'static,
    {
        let handler = move |payload| -> Pin<Box<dyn Future<Output = TaskResult> + Send>> {
            Box::pin(handler(payload))
        };
        self.handlers
            .insert(task_type.to_owned(), Handler::Async(Arc::new(handler)));
        self
    }

    pub fn get(&self, task_type: &str) -> Option<&Handler> {
        self.handlers.get(task_type)
    }

    /// The registered task types, sorted.
    pub fn task_types(&self) -> Vec<&str> {
        let mut types: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        types.sort_unstable();
        types
    }
}
