//! Run slots and prefetch: a worker holds more messages than it runs (so
//! storing one result overlaps running the next task), never runs more than
//! its concurrency, and on shutdown hands back at once what has not started.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;
use tareas_common::task::TaskState;
use tareas_worker::Registry;
use tokio::sync::{watch, Semaphore};

use tareas_integration::{next_result, submit_ok, task, Deployment, RunningDistribuidor, LIMIT};

/// A `gated` task type: each run counts itself in, then waits for a permit
/// of the gate. `running` publishes how many runs are inside; `peak` is the
/// most there ever were.
struct Gated {
    gate: Arc<Semaphore>,
    running: watch::Receiver<usize>,
    peak: Arc<AtomicUsize>,
}

fn gated_registry() -> (Registry, Gated) {
    let gate = Arc::new(Semaphore::new(0));
    let (count, running) = watch::channel(0usize);
    let count = Arc::new(count);
    let peak = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    let (handler_gate, handler_peak) = (gate.clone(), peak.clone());
    registry.register_async("gated", move |_| {
        let (gate, count, peak) = (handler_gate.clone(), count.clone(), handler_peak.clone());
        async move {
            count.send_modify(|n| {
                *n += 1;
                peak.fetch_max(*n, Ordering::SeqCst);
            });
            let permit = gate.acquire().await;
            count.send_modify(|n| *n -= 1);
            permit.map(|p| p.forget()).ok();
            Ok(json!({"passed": true}))
        }
    });
    let gated = Gated {
        gate,
        running,
        peak,
    };
    (registry, gated)
}

async fn start(
    concurrency: usize,
    prefetch: usize,
) -> (
    Deployment,
    RunningDistribuidor,
    tokio_util::sync::CancellationToken,
    Gated,
) {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.extra_task_types = vec!["gated".to_owned()];
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut worker = deployment.worker_config("w-slots", concurrency);
    worker.prefetch = Some(prefetch);
    let (registry, gated) = gated_registry();
    let stop = deployment.start_worker_with(worker, registry);
    (deployment, distribuidor, stop, gated)
}

/// Waits until `running` says `n`.
async fn until_running(gated: &mut Gated, n: usize) {
    tokio::time::timeout(LIMIT, gated.running.wait_for(|&running| running == n))
        .await
        .unwrap_or_else(|_| panic!("never {n} running"))
        .expect("handler alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_holds_its_prefetch_but_runs_only_its_concurrency() {
    let (deployment, distribuidor, _stop, mut gated) = start(2, 4).await;
    let mut client = distribuidor.client().await;
    for _ in 0..6 {
        submit_ok(&mut client, task("gated", json!({}))).await;
    }
    until_running(&mut gated, 2).await;
    // The worker took its prefetch (4 of 6), two of them waiting for a slot.
    tareas_integration::wait_for_ready_messages(&deployment.queue, 2).await;
    assert_eq!(*gated.running.borrow(), 2, "only the concurrency runs");
    gated.gate.add_permits(6);
    for _ in 0..6 {
        let report = next_result(&mut client).await;
        assert_eq!(report.status, TaskState::Succeeded, "{report:?}");
    }
    assert_eq!(
        gated.peak.load(Ordering::SeqCst),
        2,
        "never more runs than the concurrency"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_back_at_once_what_has_not_started() {
    let (deployment, distribuidor, stop, mut gated) = start(1, 3).await;
    let mut client = distribuidor.client().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(submit_ok(&mut client, task("gated", json!({}))).await);
    }
    until_running(&mut gated, 1).await;
    tareas_integration::wait_for_ready_messages(&deployment.queue, 0).await;
    stop.cancel();
    // The two waiting for the slot go back while the first still runs.
    tareas_integration::wait_for_ready_messages(&deployment.queue, 2).await;
    assert_eq!(
        *gated.running.borrow(),
        1,
        "the running task is not cut short"
    );
    gated.gate.add_permits(1);
    let first = next_result(&mut client).await;
    assert_eq!(first.status, TaskState::Succeeded, "{first:?}");
    let db = tareas_integration::db();
    for id in ids.iter().filter(|id| **id != first.task_id.to_string()) {
        let record = db.status(id).await.expect("status").expect("row");
        assert_eq!(
            record.state,
            TaskState::Queued,
            "{id} handed back untouched"
        );
        assert_eq!(record.worker_id, None, "{id} was never claimed");
    }
    deployment.stop().await;
}
