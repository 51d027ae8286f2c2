//! Tests that break things for real: they stop and restart the shared
//! RabbitMQ, PostgreSQL and S3 server, and kill worker processes. They run
//! in their own binary, one at a time, after every other test
//! (`scripts/test`), and always bring the service back, even on failure.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tareas_common::protocol::{ErrorCode, Reply, Request, TaskRequest};
use tareas_common::task::{TaskMessage, TaskState};
use tareas_common::topology::Topology;
use tokio::process::Child;

mod service_control;

use service_control::{postgres_stop, rabbitmq_stop, s3_stop};
use tareas_integration::{
    drain_queue, next, submit_ok, task, Deployment, RunningDistribuidor, LIMIT,
};

/// Submits until a task is acked (the system recovered), returning its id.
async fn submit_until_acked(distribuidor: &RunningDistribuidor, request: TaskRequest) -> String {
    let deadline = tokio::time::Instant::now() + LIMIT * 2;
    loop {
        let mut client = distribuidor.client().await;
        client
            .send(&Request::Task(request.clone()))
            .await
            .expect("send");
        match next(&mut client).await {
            Reply::Ack { task_id, .. } => return task_id.to_string(),
            // Refused, or unknown while a dependency went away: try again.
            Reply::Error(error)
                if matches!(error.code, ErrorCode::Unavailable | ErrorCode::Uncertain) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the system never recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every task is finished in PostgreSQL and S3, and the two agree.
async fn assert_all_stored(ids: &BTreeSet<String>, expected: TaskState) {
    let db = tareas_integration::db();
    let deadline = tokio::time::Instant::now() + LIMIT * 2;
    for id in ids {
        loop {
            let row = db.status(id).await.ok().flatten();
            let document = tareas_integration::s3_document(id).await;
            if let (Some(row), Some(document)) = (&row, &document) {
                if row.state.is_terminal() {
                    assert_eq!(row.state, expected, "task {id}");
                    let stored = db.document(id).await.unwrap().unwrap();
                    assert_eq!(
                        &stored, document,
                        "S3 holds exactly the PostgreSQL row of {id}"
                    );
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {id} never finished: {row:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn submit_batch(
    distribuidor: &RunningDistribuidor,
    count: usize,
    ms: u64,
) -> BTreeSet<String> {
    let mut client = distribuidor.client().await;
    let mut ids = BTreeSet::new();
    for _ in 0..count {
        let request = TaskRequest {
            notify: Some(false),
            ..task("sleep", json!({"ms": ms}))
        };
        ids.insert(submit_ok(&mut client, request).await);
    }
    ids
}

/// What the submissions at the edge of an outage got: every one is audited
/// once the service is back.
struct Edge {
    /// Acked in the instant before the outage was noticed: they must finish.
    acked: BTreeSet<String>,
    /// Refused `unavailable`: a promise that they will not run, so no row.
    refused: Vec<String>,
}

impl Edge {
    /// Checks the refusals (the service is back); returns the acked ids,
    /// to be audited with the rest.
    async fn audit(self) -> BTreeSet<String> {
        let db = tareas_integration::db();
        for id in &self.refused {
            let row = db.status(id).await.expect("PostgreSQL is back");
            assert!(
                row.is_none(),
                "{id} was refused `unavailable` but has a row: {row:?}"
            );
        }
        self.acked
    }
}

/// Submits until a task is refused `unavailable` (the outage was noticed).
async fn expect_unavailable(distribuidor: &RunningDistribuidor) -> Edge {
    let mut client = distribuidor.client().await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut acked = BTreeSet::new();
    loop {
        client
            .send(&Request::Task(task("hash", json!({"text": "down"}))))
            .await
            .expect("send");
        match next(&mut client).await {
            Reply::Error(error) if error.code == ErrorCode::Unavailable => {
                let refused = error.task_id.into_iter().collect();
                return Edge { acked, refused };
            }
            // The outcome of a publish cut off by the outage: it may run.
            Reply::Error(error) if error.code == ErrorCode::Uncertain => {}
            Reply::Ack { task_id, .. } => {
                // Only possible in the instant before the outage was noticed.
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "acks kept coming while the dependency was down"
                );
                acked.insert(task_id.to_string());
            }
            other => panic!("unexpected {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restart_loses_no_acked_task() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-rmq", 2));
    let mut ids = submit_batch(&distribuidor, 30, 100).await;
    let edge = {
        let _restore = rabbitmq_stop();
        expect_unavailable(&distribuidor).await
    };
    ids.extend(edge.audit().await);
    ids.insert(submit_until_acked(&distribuidor, task("hash", json!({"text": "after"}))).await);
    assert_all_stored(&ids, TaskState::Succeeded).await;
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_a_waiting_client_across_a_rabbitmq_restart() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-rmq-results", 2));
    // 20 × 200 ms on two slots: about two seconds of work, and RabbitMQ
    // goes away in the middle of it. The client stays connected throughout.
    let mut client = distribuidor.client().await;
    for _ in 0..20 {
        client
            .send(&Request::Task(task("sleep", json!({"ms": 200}))))
            .await
            .expect("send");
    }
    let mut acked = BTreeSet::new();
    let mut results = BTreeSet::new();
    let take =
        |reply: Reply, acked: &mut BTreeSet<String>, results: &mut BTreeSet<String>| match reply {
            Reply::Ack { task_id, .. } => acked.insert(task_id.to_string()),
            Reply::Result(report) => {
                assert_eq!(report.status, TaskState::Succeeded, "{report:?}");
                results.insert(report.task_id.to_string())
            }
            other => panic!("expected acks and results, got {other:?}"),
        };
    while acked.len() < 20 {
        take(next(&mut client).await, &mut acked, &mut results);
    }
    let edge = {
        let _restore = rabbitmq_stop();
        expect_unavailable(&distribuidor).await
    };
    let edge_acked = edge.audit().await;
    assert_all_stored(&edge_acked, TaskState::Succeeded).await;
    while results.len() < 20 {
        // Each wait fails the test after LIMIT: a lost push is a hang.
        take(next(&mut client).await, &mut acked, &mut results);
    }
    assert_eq!(results, acked, "every acked task's result was pushed");
    deployment.stop().await;
}

/// Waits (up to `LIMIT`) until the worker's `/readyz` answers `status`.
async fn readyz_turns(addr: std::net::SocketAddr, status: u16) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let answer = tareas_integration::http::request(addr, "GET", "/readyz", &[], b"").await;
        if answer.status == status {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker's /readyz stayed {} ({}), never {status}",
            answer.status,
            answer.json
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_loses_no_acked_task() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_http = metrics.local_addr().unwrap();
    let mut registry = tareas_worker::Registry::new();
    tareas_worker::builtins::register(&mut registry);
    let config = deployment.worker_config("w-pg", 2);
    deployment.start_observed_worker(config, registry, Some(metrics));
    readyz_turns(worker_http, 200).await;
    let mut ids = submit_batch(&distribuidor, 30, 100).await;
    let edge = {
        let _restore = postgres_stop();
        readyz_turns(worker_http, 503).await;
        expect_unavailable(&distribuidor).await
    };
    readyz_turns(worker_http, 200).await;
    ids.extend(edge.audit().await);
    ids.insert(submit_until_acked(&distribuidor, task("hash", json!({"text": "after"}))).await);
    assert_all_stored(&ids, TaskState::Succeeded).await;
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_restart_holds_results_until_it_is_back() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let worker = deployment.worker_config("w-s3", 2);
    // Two run slots, three messages held: a slot is freed before storing.
    let held = worker.prefetch();
    assert_eq!(held, 3);
    deployment.start_worker(worker);
    // The worker is consuming (it checked the bucket at start-up).
    let warmup = submit_batch(&distribuidor, 1, 1).await;
    assert_all_stored(&warmup, TaskState::Succeeded).await;
    let ids;
    {
        let _restore = s3_stop();
        // Acks do not need S3; the worker holds the results until it returns.
        ids = submit_batch(&distribuidor, 10, 10).await;
        let db = tareas_integration::db();
        let finished = || async {
            let mut finished = 0;
            for id in &ids {
                if db
                    .status(id)
                    .await
                    .unwrap()
                    .is_some_and(|row| row.state.is_terminal())
                {
                    finished += 1;
                }
            }
            finished
        };
        let deadline = tokio::time::Instant::now() + LIMIT;
        while finished().await < held {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the tasks never ran"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The prefetched tasks ran, but cannot be acked without S3, so the
        // worker takes no more: watch for a while that none does.
        for _ in 0..20 {
            assert_eq!(
                finished().await,
                held,
                "the worker took new work while its results could not be stored"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_all_stored(&ids, TaskState::Succeeded).await;
    deployment.stop().await;
}

fn spawn_worker(
    binary: &str,
    deployment: &Deployment,
    worker_id: &str,
    env: &[(&str, &str)],
) -> Child {
    let path = tareas_integration::binary(binary);
    let health = std::env::temp_dir().join(format!("{}-{worker_id}.health", deployment.queue));
    let mut command = tokio::process::Command::new(path);
    command
        .env("TAREAS_QUEUE", &deployment.queue)
        .env("WORKER_ID", worker_id)
        .env("WORKER_HEALTH_FILE", health)
        .env("WORKER_METRICS_ADDR", "")
        .env("RUST_LOG", "error")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command.spawn().expect("spawn worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_task_loses_nothing() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let mut doomed = spawn_worker(
        "worker",
        &deployment,
        "doomed",
        &[("WORKER_CONCURRENCY", "4")],
    );
    let ids = submit_batch(&distribuidor, 12, 400).await;
    // Wait until the doomed worker is in the middle of tasks, then SIGKILL it.
    let db = tareas_integration::db();
    let deadline = tokio::time::Instant::now() + LIMIT;
    'running: loop {
        for id in &ids {
            if db
                .status(id)
                .await
                .unwrap()
                .is_some_and(|row| row.state == TaskState::Running)
            {
                break 'running;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the doomed worker never started a task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    doomed.start_kill().expect("SIGKILL");
    doomed.wait().await.expect("reaped");
    let _survivor = spawn_worker(
        "worker",
        &deployment,
        "survivor",
        &[("WORKER_CONCURRENCY", "4")],
    );
    assert_all_stored(&ids, TaskState::Succeeded).await;
    let mut rerun = 0;
    for id in &ids {
        let document = db.document(id).await.unwrap().unwrap();
        if document["attempts"].as_i64() > Some(1) {
            rerun += 1;
            assert_eq!(document["worker_id"], "survivor");
        }
    }
    assert!(rerun > 0, "some task was interrupted and run again");
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_keeps_crashing_its_worker_ends_failed_in_the_dead_letter_queue() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.extra_task_types = vec!["crash".into()];
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut client = distribuidor.client().await;
    let poison = submit_ok(
        &mut client,
        TaskRequest {
            notify: Some(false),
            ..task("crash", json!({}))
        },
    )
    .await;
    let db = tareas_integration::db();
    let deadline = tokio::time::Instant::now() + LIMIT * 2;
    let mut crashes = 0;
    // A supervisor (docker's restart policy) restarts the worker after each crash.
    loop {
        let row = db.status(&poison).await.unwrap().unwrap();
        if row.state.is_terminal() {
            break;
        }
        let mut worker = spawn_worker(
            "examples/crash_worker",
            &deployment,
            "crashy",
            &[("TAREAS_MAX_ATTEMPTS", "2")],
        );
        loop {
            tokio::select! {
                status = worker.wait() => {
                    if !status.expect("wait").success() {
                        crashes += 1;
                    }
                    break;
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if db.status(&poison).await.unwrap().unwrap().state.is_terminal() {
                        // The row is written before the message is rejected
                        // into the DLQ: stop the worker only once it is there.
                        let dlq = Topology::new(&deployment.queue).dead_letter_queue();
                        tareas_integration::wait_for_ready_messages(&dlq, 1).await;
                        let _ = worker.start_kill();
                        break;
                    }
                }
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the poison task never stopped"
        );
    }
    assert_eq!(crashes, 2, "it crashed its worker once per allowed attempt");
    let row = db.status(&poison).await.unwrap().unwrap();
    assert_eq!(row.state, TaskState::Failed);
    assert!(row
        .error
        .unwrap_or_default()
        .contains("gave up after 2 attempts"));
    let dead = drain_queue(&Topology::new(&deployment.queue).dead_letter_queue()).await;
    let ids: Vec<String> = dead
        .iter()
        .map(|m| {
            serde_json::from_slice::<TaskMessage>(&m.delivery.data)
                .unwrap()
                .task_id
                .to_string()
        })
        .collect();
    assert_eq!(ids, vec![poison]);
    deployment.stop().await;
}
