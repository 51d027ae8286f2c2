//! The distribuidor itself crashes: what it acked finishes, and what it
//! recorded but never confirmed is published by the outbox relay of another
//! distribuidor, so nothing stays `queued` for ever.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use tareas_common::protocol::{Reply, Request};
use tareas_common::task::TaskState;
use tareas_integration::{task, Deployment, DistribuidorProcess, LIMIT};

const CLIENTS: usize = 2;
const TASKS: usize = 3000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_distribuidor_loses_no_acked_task_and_leaves_no_task_queued() {
    let mut deployment = Deployment::new().await;
    let env = [
        ("TAREAS_MAX_OUTSTANDING_PER_CLIENT", "0"),
        ("TAREAS_ORPHAN_AFTER_SECS", "2"),
    ];
    let first = DistribuidorProcess::start(&deployment.queue, &env).await;
    deployment.start_worker(deployment.worker_config("w-crash", 8));
    let ids: Vec<Vec<String>> = (0..CLIENTS)
        .map(|c| {
            (0..TASKS)
                .map(|i| format!("crash-{}-{c}-{i}", deployment.queue))
                .collect()
        })
        .collect();
    let mut acked = HashSet::new();
    let mut clients = Vec::new();
    for client_ids in &ids {
        let mut client = first.client().await;
        for id in client_ids {
            let mut request = task("hash", json!({"text": id}));
            request.task_id = Some(id.clone());
            client.send(&Request::Task(request)).await.expect("send");
        }
        clients.push(client);
    }
    // Kill it mid-load: after some acks, with most submissions in progress.
    while acked.len() < 300 {
        let reply = clients[0].recv_within(LIMIT).await.expect("a reply");
        if let Reply::Ack { task_id, .. } = reply {
            acked.insert(task_id);
        }
    }
    first.kill().await;
    for client in &mut clients {
        // What reached the clients before the crash counts as acked.
        while let Ok(reply) = client.recv_within(Duration::from_millis(200)).await {
            if let Reply::Ack { task_id, .. } = reply {
                acked.insert(task_id);
            }
        }
    }
    // A new distribuidor; nobody resubmits anything.
    let second = DistribuidorProcess::start(&deployment.queue, &env).await;
    let all: Vec<&str> = ids.iter().flatten().map(String::as_str).collect();
    let db = tareas_integration::db();
    // The dead one's heartbeat expires (15 s), then its orphans are relayed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let records = loop {
        let records = db.records(&all).await.expect("records");
        let open = records.values().filter(|r| !r.state.is_terminal()).count();
        if open == 0 {
            break records;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} rows still queued or running long after the crash; see {}",
            second.log.display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "{} acked before the kill, {} recorded in all, {} never recorded",
        acked.len(),
        records.len(),
        all.len() - records.len()
    );
    for id in &acked {
        let record = records.get(id.as_str()).expect("an acked task has its row");
        assert_eq!(record.state, TaskState::Succeeded, "{id}");
        assert!(
            tareas_integration::s3_document(id.as_str()).await.is_some(),
            "{id} has no S3 object"
        );
    }
    for (id, record) in &records {
        assert_eq!(record.state, TaskState::Succeeded, "{id}");
    }
    second.stop().await;
    deployment.stop().await;
}
