//! The per-connection limits: the connection cap, the idle timeout, and
//! backpressure on a client that waits for many results.

use serde_json::json;
use tareas_common::protocol::{ErrorCode, Reply, Request, TaskRequest};
use tareas_common::task::TaskState;

use tareas_integration::{next, next_result, submit_ok, task, Deployment, LIMIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_clearly() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.max_connections = 2;
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut first = distribuidor.client().await;
    let mut second = distribuidor.client().await;
    for client in [&mut first, &mut second] {
        client.send(&Request::Ping).await.unwrap();
        assert_eq!(next(client).await, Reply::Pong);
    }
    let mut third = distribuidor.client().await;
    match next(&mut third).await {
        Reply::Error(error) => assert_eq!(error.code, ErrorCode::TooManyConnections),
        other => panic!("expected too_many_connections, got {other:?}"),
    }
    assert!(
        matches!(third.recv().await, Ok(None) | Err(_)),
        "and the connection is closed"
    );
    drop(first);
    // A slot frees up once a client leaves.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let mut again = distribuidor.client().await;
        again.send(&Request::Ping).await.unwrap();
        if let Ok(Reply::Pong) = again.recv_within(LIMIT).await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_with_a_reason() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.idle_timeout_secs = 1;
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut client = distribuidor.client().await;
    match next(&mut client).await {
        Reply::Error(error) => assert_eq!(error.code, ErrorCode::IdleTimeout),
        other => panic!("expected idle_timeout, got {other:?}"),
    }
    assert!(matches!(client.recv().await, Ok(None) | Err(_)));
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_client_is_not_idle() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.idle_timeout_secs = 1;
    let distribuidor = deployment.start_distribuidor(config).await;
    deployment.start_worker(deployment.worker_config("w-idle", 1));
    let mut client = distribuidor.client().await;
    let request = TaskRequest {
        ..task("sleep", json!({"ms": 2500}))
    };
    submit_ok(&mut client, request).await;
    assert_eq!(
        next_result(&mut client).await.status,
        TaskState::Succeeded,
        "kept open while its task ran"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_for_many_results_is_slowed_not_buffered() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.max_waiting_results = 2;
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut client = distribuidor.client().await;
    let ids: Vec<String> = (0..5)
        .map(|i| format!("wait-{i}-{}", uuid::Uuid::new_v4()))
        .collect();
    for id in &ids {
        let request = TaskRequest {
            task_id: Some(id.clone()),
            ..task("echo", json!({"text": id}))
        };
        client.send(&Request::Task(request)).await.unwrap();
    }
    // No worker yet: two tasks are acked, and the rest are not even read.
    for id in &ids[..2] {
        assert!(
            matches!(next(&mut client).await, Reply::Ack { task_id, .. } if task_id.as_str() == id)
        );
    }
    let db = tareas_integration::db();
    for id in &ids[2..] {
        assert_eq!(
            db.status(id).await.unwrap(),
            None,
            "{id} was read before there was room"
        );
    }
    // Results free room; everything is then acked and answered.
    deployment.start_worker(deployment.worker_config("w-room", 2));
    let (mut acks, mut results) = (2, 0);
    while acks < 5 || results < 5 {
        match next(&mut client).await {
            Reply::Ack { .. } => acks += 1,
            Reply::Result(report) => {
                assert_eq!(report.status, TaskState::Succeeded);
                results += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    deployment.stop().await;
}
