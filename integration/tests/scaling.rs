//! Several workers share the work; several distribuidores each get their own clients' results.

use std::collections::HashSet;

use serde_json::json;
use tareas_common::protocol::{Reply, Request};

use tareas_integration::{next, run_all, task, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_work() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-left", 1));
    deployment.start_worker(deployment.worker_config("w-right", 1));
    let mut client = distribuidor.client().await;
    let (_, results) = run_all(
        &mut client,
        (0..20).map(|_| task("sleep", json!({"ms": 50}))).collect(),
    )
    .await;
    let workers: HashSet<String> = results
        .into_values()
        .map(|r| r.worker_id.expect("worker id"))
        .collect();
    assert_eq!(
        workers,
        HashSet::from(["w-left".to_owned(), "w-right".to_owned()])
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_the_client_whichever_distribuidor_it_used() {
    let mut deployment = Deployment::new().await;
    let first = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let second = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-shared", 4));
    let mut alice = first.client().await;
    let mut bob = second.client().await;
    let requests = |name: &str| {
        (0..10)
            .map(|i| task("echo", json!({"text": format!("{name} {i}")})))
            .collect()
    };
    // Both clients at once, so that results for both are in flight together.
    let ((alice_ids, alice_results), (bob_ids, bob_results)) = tokio::join!(
        run_all(&mut alice, requests("alice")),
        run_all(&mut bob, requests("bob"))
    );
    for (name, ids, results) in [
        ("alice", alice_ids, alice_results),
        ("bob", bob_ids, bob_results),
    ] {
        let seen: HashSet<String> = results.keys().cloned().collect();
        assert_eq!(
            seen,
            ids.into_iter().collect::<HashSet<_>>(),
            "{name} got exactly its own results"
        );
        for report in results.values() {
            assert!(report.result.as_ref().unwrap()["text"]
                .as_str()
                .unwrap()
                .starts_with(name));
        }
    }
    for (client, name) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        client.send(&Request::Ping).await.unwrap();
        assert_eq!(
            next(client).await,
            Reply::Pong,
            "{name} got no extra results"
        );
    }
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distribuidor_deletes_its_reply_queue_when_it_stops() {
    let mut deployment = Deployment::new().await;
    let queue = deployment.queue.clone();
    deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let running = tareas_integration::reply_queues(&queue);
    assert_eq!(running.len(), 1, "{running:?}");
    deployment.stop().await;
    assert_eq!(
        tareas_integration::reply_queues(&queue),
        Vec::<String>::new()
    );
}
