//! Runs one task's handler: off the async runtime when it is blocking,
//! within a time limit, with panics caught. Knows nothing of AMQP.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use serde_json::Value;
use tareas_common::task::{TaskMessage, TaskState};
use tokio::sync::OwnedSemaphorePermit;

use crate::registry::{ErrorKind, Handler, Registry, TaskError, TaskResult};

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// `Succeeded` or `Failed`.
    pub state: TaskState,
    pub result: Option<Value>,
    pub error: Option<String>,
    /// For failures: whether another attempt could succeed.
    pub retryable: bool,
    pub duration: Duration,
}

tokio::task_local! {
    /// The run slot of the task being executed. Work sent to the blocking
    /// pool holds a share of it, so a handler past its time limit keeps its
    /// slot until its thread really returns: never more than
    /// `WORKER_CONCURRENCY` handlers run at once.
    static SLOT: Arc<OwnedSemaphorePermit>;
}

/// Runs `task` with the handler its type names, holding `slot` (one of the
/// worker's run slots) until the handler's work has ended.
pub async fn execute(
    registry: &Registry,
    task: &TaskMessage,
    time_limit: Duration,
    slot: OwnedSemaphorePermit,
) -> Outcome {
    SLOT.scope(Arc::new(slot), execute_in_slot(registry, task, time_limit))
        .await
}

async fn execute_in_slot(registry: &Registry, task: &TaskMessage, time_limit: Duration) -> Outcome {
    let started = Instant::now();
    let outcome = match registry.get(&task.task_type) {
        None => Err(TaskError::permanent(format!(
            "no handler for task_type {:?} in this worker (it runs: {})",
            task.task_type,
            registry.task_types().join(", ")
        ))),
        Some(handler) => run(handler, task.payload.clone(), time_limit).await,
    };
    let duration = started.elapsed();
    match outcome {
        Ok(result) => Outcome {
            state: TaskState::Succeeded,
            result: Some(result),
            error: None,
            retryable: false,
            duration,
        },
        Err(err) => Outcome {
            state: TaskState::Failed,
            result: None,
            retryable: err.kind == ErrorKind::Transient,
            // PostgreSQL's text holds no NUL: a handler's error with one
            // could otherwise be stored neither as a retry nor as a failure.
            error: Some(err.message.replace('\0', "\u{fffd}")),
            duration,
        },
    }
}

async fn run(handler: &Handler, payload: Value, time_limit: Duration) -> Result<Value, TaskError> {
    match handler {
        Handler::Blocking(f) => {
            let f = f.clone();
            match tokio::time::timeout(time_limit, on_blocking_pool(move || f(payload))).await {
                Ok(result) => result,
                // A blocking handler cannot be stopped: it runs on, detached,
                // holding its run slot until it returns.
                Err(_) => Err(over_time_limit(time_limit)),
            }
        }
        // Polled right here, in the delivery's own task: no hand-off to
        // another task or thread. Past the time limit the future is dropped.
        Handler::Async(f) => {
            let run = std::panic::catch_unwind(AssertUnwindSafe(|| f(payload)))
                .map(|future| AssertUnwindSafe(future).catch_unwind());
            let run = match run {
                Ok(run) => run,
                Err(panic) => return Err(panicked(panic)),
            };
            match tokio::time::timeout(time_limit, run).await {
                Ok(Ok(result)) => result,
                Ok(Err(panic)) => Err(panicked(panic)),
                Err(_) => Err(over_time_limit(time_limit)),
            }
        }
    }
}

/// Runs `work` on tokio's blocking pool; a panic or a cancellation there
/// becomes the task's error.
pub(crate) async fn on_blocking_pool(
    work: impl FnOnce() -> TaskResult + Send + 'static,
) -> TaskResult {
    let slot = SLOT.try_with(Arc::clone).ok();
    let work = move || {
        let _slot = slot;
        work()
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => Err(panicked(join.into_panic())),
        Err(join) => Err(TaskError::transient(format!(
            "the handler was cancelled: {join}"
        ))),
    }
}

/// A panic counts as a failed attempt: it may be a passing condition.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> TaskError {
    TaskError::transient(format!("the handler panicked: {}", panic_message(panic)))
}

fn over_time_limit(time_limit: Duration) -> TaskError {
    TaskError::permanent(format!(
        "the task exceeded its time limit of {:.1}s",
        time_limit.as_secs_f64()
    ))
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// A run slot of a semaphore of its own, for tests.
#[cfg(test)]
pub(crate) fn test_slot() -> OwnedSemaphorePermit {
    Arc::new(tokio::sync::Semaphore::new(1))
        .try_acquire_owned()
        .expect("a fresh semaphore has a permit")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tareas_common::task::TaskId;

    fn slot() -> OwnedSemaphorePermit {
        test_slot()
    }

    #[tokio::test]
    async fn a_blocking_handler_past_its_limit_keeps_its_slot_until_it_returns() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Mutex::new(released);
        let mut registry = Registry::new();
        registry.register_blocking("stuck", move |_| {
            // Runs on until the test lets it go.
            let _ = released.lock().expect("lock").recv();
            Ok(json!(null))
        });
        let slots = Arc::new(tokio::sync::Semaphore::new(1));
        let slot = slots.clone().try_acquire_owned().expect("a slot");
        let stuck = execute(&registry, &task("stuck"), Duration::from_millis(20), slot).await;
        assert!(stuck.error.unwrap().contains("time limit"));
        assert_eq!(
            slots.available_permits(),
            0,
            "its thread still runs, so its slot stays taken"
        );
        release.send(()).expect("let it return");
        let freed = tokio::time::timeout(Duration::from_secs(5), slots.acquire()).await;
        assert!(freed.is_ok(), "the slot is freed once the thread returns");
    }

    fn task(task_type: &str) -> TaskMessage {
        TaskMessage {
            task_id: TaskId::generate().into(),
            task_type: task_type.into(),
            payload: json!({}),
            notify: true,
        }
    }

    #[tokio::test]
    async fn an_error_text_with_a_nul_can_be_stored() {
        let mut registry = Registry::new();
        registry.register_blocking("nul", |_| Err(TaskError::transient("bad\u{0}byte")));
        let outcome = execute(&registry, &task("nul"), Duration::from_secs(5), slot()).await;
        assert_eq!(outcome.error.as_deref(), Some("bad\u{fffd}byte"));
    }

    #[tokio::test]
    async fn panics_and_timeouts_are_failures() {
        let mut registry = Registry::new();
        registry
            .register_blocking("boom", |_| panic!("kaput"))
            .register_async("slow", |_| async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(json!(null))
            })
            .register_blocking("ok", |_| Ok(json!(1)));
        let limit = Duration::from_secs(30);
        let boom = execute(&registry, &task("boom"), limit, slot()).await;
        assert_eq!(boom.state, TaskState::Failed);
        let error = boom.error.unwrap();
        assert!(error.contains("kaput"), "{error}");
        assert!(boom.retryable, "a panic is a failed attempt, tried again");
        let slow = execute(&registry, &task("slow"), Duration::from_millis(50), slot()).await;
        assert!(slow.error.unwrap().contains("time limit"));
        assert!(!slow.retryable, "over the time limit fails at once");
        let missing = execute(&registry, &task("nope"), limit, slot()).await;
        assert!(missing.error.unwrap().contains("no handler"));
        assert_eq!(
            execute(&registry, &task("ok"), limit, slot()).await.result,
            Some(json!(1))
        );
    }
}
