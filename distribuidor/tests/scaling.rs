//! Several workers share the work; several distribuidores each get their own clients' results.

use std::collections::HashSet;

use serde_json::json;
use tareas_common::protocol::{Reply, Request};

use crate::util::{next, next_result, submit_ok, task, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_work() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment.start_distribuidor(deployment.distribuidor_config()).await;
    deployment.start_worker(deployment.worker_config("w-left", 1));
    deployment.start_worker(deployment.worker_config("w-right", 1));
    let mut client = distribuidor.client().await;
    for _ in 0..20 {
        submit_ok(&mut client, task("sleep", json!({"ms": 50}))).await;
    }
    let mut workers = HashSet::new();
    for _ in 0..20 {
        workers.insert(next_result(&mut client).await.worker_id.expect("worker id"));
    }
    assert_eq!(workers, HashSet::from(["w-left".to_owned(), "w-right".to_owned()]));
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_the_client_whichever_distribuidor_it_used() {
    let mut deployment = Deployment::new().await;
    let first = deployment.start_distribuidor(deployment.distribuidor_config()).await;
    let second = deployment.start_distribuidor(deployment.distribuidor_config()).await;
    deployment.start_worker(deployment.worker_config("w-shared", 4));
    let mut alice = first.client().await;
    let mut bob = second.client().await;
    let mut alice_ids = HashSet::new();
    let mut bob_ids = HashSet::new();
    for i in 0..10 {
        alice_ids.insert(submit_ok(&mut alice, task("echo", json!({"text": format!("alice {i}")}))).await);
        bob_ids.insert(submit_ok(&mut bob, task("echo", json!({"text": format!("bob {i}")}))).await);
    }
    for (client, ids, name) in [(&mut alice, &alice_ids, "alice"), (&mut bob, &bob_ids, "bob")] {
        let mut seen = HashSet::new();
        for _ in 0..10 {
            let report = next_result(client).await;
            assert!(ids.contains(report.task_id.as_str()), "{name} got someone else's result");
            assert!(report.result.unwrap()["text"].as_str().unwrap().starts_with(name));
            seen.insert(report.task_id.to_string());
        }
        assert_eq!(&seen, ids);
        client.send(&Request::Ping).await.unwrap();
        assert_eq!(next(client).await, Reply::Pong, "{name} got no extra results");
    }
    deployment.stop().await;
}
