//! The cluster proof: a distribuidor and two workers connected to the
//! three-node RabbitMQ cluster of `scripts/cluster` lose a node in the
//! middle of the load — first the distribuidor's own node, then the node
//! leading the work queue — and every acked task still succeeds with one
//! row and one S3 object and reaches its client exactly once, no refused
//! task runs, the programs reconnect to the surviving
//! nodes by themselves, and the stopped node rejoins when it comes back.
//!
//! It stops RabbitMQ nodes (of that cluster only, never the default node),
//! so `scripts/test` runs it alone, after the rest, between
//! `scripts/cluster start` and `scripts/cluster clean`; it restarts every
//! node it stopped, even when it fails.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::{BTreeSet, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tareas_common::protocol::{ErrorCode, Reply, Request, TaskRequest};
use tareas_common::task::TaskState;
use tokio::sync::watch;

use cliente::Client;
use tareas_integration::{task, Deployment, LIMIT};

/// Tasks offered per second: slow enough that the load spans both phases.
const RATE: u64 = 60;
/// Fewest tasks the run pushes through.
const AT_LEAST: usize = 2000;
/// Longest a node stop, a reconnect or a rejoin may take.
const NODE_LIMIT: Duration = Duration::from_secs(90);

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cluster");

/// `scripts/cluster` with `args`; its standard output, or why not.
async fn try_cluster(args: &[&str]) -> Result<String, String> {
    let output = tokio::process::Command::new(SCRIPT)
        .args(args)
        .output()
        .await
        .map_err(|err| err.to_string())?;
    if !output.status.success() {
        return Err(format!(
            "scripts/cluster {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    String::from_utf8(output.stdout).map_err(|err| err.to_string())
}

/// [`try_cluster`], or the test fails.
async fn cluster(args: &[&str]) -> String {
    try_cluster(args)
        .await
        .unwrap_or_else(|err| panic!("{err}; start the cluster with `scripts/cluster start`"))
}

/// `rabbitmqctl ARGS --formatter json` on a running node of the cluster,
/// or why not (a node stopping, an election: pollers try again).
async fn ctl_json(args: &[&str]) -> Result<Value, String> {
    let mut all = vec!["ctl"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--formatter", "json"]);
    let output = try_cluster(&all).await?;
    serde_json::from_str(&output).map_err(|err| format!("{err}: {output}"))
}

fn node_name(n: u8) -> String {
    format!("tareas-{n}@localhost")
}

/// The node (1..3) a node name (`tareas-2@localhost`) or an AMQP port
/// (5682) stands for.
fn node_number(text: &str) -> Option<u8> {
    let digit = match text.strip_prefix("tareas-") {
        Some(rest) => rest.chars().next(),
        None => text.chars().last(),
    };
    u8::try_from(digit?.to_digit(10)?).ok()
}

/// For each of `prefixes`, the nodes holding a client connection whose
/// name starts with it (one `list_connections` for all).
async fn nodes_of(prefixes: &[&str]) -> Option<Vec<Vec<u8>>> {
    let connections = ctl_json(&["list_connections", "port", "client_properties"])
        .await
        .ok()?;
    let connections = connections.as_array()?;
    let nodes = prefixes.iter().map(|prefix| {
        let mut nodes: Vec<u8> = connections
            .iter()
            .filter(|c| c["client_properties"].to_string().contains(prefix))
            .filter_map(|c| node_number(&c["port"].to_string()))
            .collect();
        nodes.sort_unstable();
        nodes
    });
    Some(nodes.collect())
}

/// The work queue's leader and its members that are online.
async fn queue_state(queue: &str) -> Option<(u8, Vec<String>)> {
    let queues = ctl_json(&["list_queues", "name", "leader", "online"])
        .await
        .ok()?;
    let row = queues.as_array()?.iter().find(|q| q["name"] == queue)?;
    let online = row["online"]
        .as_array()?
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    Some((node_number(row["leader"].as_str()?)?, online))
}

/// Polls `check` every 200 ms until it holds, within [`NODE_LIMIT`].
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < NODE_LIMIT,
            "{what} within {NODE_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

/// Starts every node again on drop, so a failing test leaves the cluster up.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        let _ = Command::new(SCRIPT).arg("start").status();
    }
}

/// What the load saw.
#[derive(Default)]
struct Outcome {
    acked: BTreeSet<String>,
    /// Refused `unavailable`: a promise that they will not run.
    refused: BTreeSet<String>,
    results: HashMap<String, TaskState>,
    /// When each ack came, since the load started.
    ack_times: Vec<Duration>,
}

/// Offers `hash` tasks at [`RATE`] until `enough` turns true and at least
/// [`AT_LEAST`] were offered, resubmitting a refused task under a new id
/// and an `uncertain` one under the same id, then waits for every result.
async fn load(client: Client, enough: watch::Receiver<bool>, acks: Arc<AtomicUsize>) -> Outcome {
    let (mut writer, mut reader) = client.into_split();
    let mut outcome = Outcome::default();
    let started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let (mut offered, mut retry) = (0usize, Vec::<String>::new());
    let request = |id: &str| {
        Request::Task(TaskRequest {
            task_id: Some(id.to_owned()),
            ..task("hash", json!({ "text": id }))
        })
    };
    let done = |o: &Outcome, offered: usize, retry: &[String]| {
        *enough.borrow()
            && offered >= AT_LEAST
            && retry.is_empty()
            && o.results.len() == o.acked.len()
            && o.acked.len() + o.refused.len() >= offered
    };
    while !done(&outcome, offered, &retry) {
        let offering = !*enough.borrow() || offered < AT_LEAST || !retry.is_empty();
        tokio::select! {
            _ = pace.tick(), if offering => {
                let id = retry.pop().unwrap_or_else(|| {
                    offered += 1;
                    format!("cluster-{}", uuid::Uuid::new_v4().simple())
                });
                writer.send(&request(&id)).await.unwrap();
                writer.flush().await.unwrap();
            }
            reply = tokio::time::timeout(LIMIT * 2, reader.recv()) => {
                match reply.expect("a reply within the limit").unwrap().expect("the connection stays open") {
                    Reply::Ack { task_id, .. } => {
                        outcome.acked.insert(task_id.to_string());
                        outcome.ack_times.push(started.elapsed());
                        acks.store(outcome.acked.len(), Ordering::Relaxed);
                    }
                    Reply::Result(report) => {
                        let id = report.task_id.to_string();
                        assert!(outcome.acked.contains(&id), "a result before its ack: {id}");
                        let previous = outcome.results.insert(id.clone(), report.status);
                        assert!(previous.is_none(), "a second result for {id}");
                    }
                    Reply::Error(error) if error.code == ErrorCode::Unavailable => {
                        outcome.refused.insert(error.task_id.unwrap());
                        offered += 1;
                        retry.push(format!("cluster-{}", uuid::Uuid::new_v4().simple()));
                    }
                    Reply::Error(error) if error.code == ErrorCode::Uncertain => {
                        retry.push(error.task_id.unwrap());
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }
    outcome
}

/// Stops node `n` while the load runs; waits until the distribuidor and
/// both workers are connected to other nodes and the work queue has a
/// leader elsewhere, then starts `n` again and waits until it is running
/// and back among the work queue's online members.
async fn lose_node(n: u8, queue: &str, started: Instant) {
    println!("{:>6.1?}: stopping {}", started.elapsed(), node_name(n));
    cluster(&["stop-node", &n.to_string()]).await;
    let stopped = Instant::now();
    eventually("the programs reconnect to surviving nodes", async || {
        let programs = ["distribuidor-", "cluster-worker-1", "cluster-worker-2"];
        nodes_of(&programs)
            .await
            .is_some_and(|nodes| nodes.iter().all(|on| !on.is_empty() && !on.contains(&n)))
    })
    .await;
    println!(
        "{:>6.1?}: the three programs reconnected {:.1?} after the stop (seen by polling rabbitmqctl)",
        started.elapsed(),
        stopped.elapsed()
    );
    eventually("a leader for the work queue on another node", async || {
        queue_state(queue)
            .await
            .is_some_and(|(leader, _)| leader != n)
    })
    .await;
    cluster(&["start-node", &n.to_string()]).await;
    eventually("the node rejoins the cluster and the queue", async || {
        let running = ctl_json(&["cluster_status"]).await;
        let running =
            running.is_ok_and(|status| status["running_nodes"].to_string().contains(&node_name(n)));
        running
            && queue_state(queue)
                .await
                .is_some_and(|(_, online)| online.len() == 3)
    })
    .await;
    println!("{:>6.1?}: {} rejoined", started.elapsed(), node_name(n));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_node_loses_no_acked_task() {
    let urls = cluster(&["urls"]).await.trim().to_owned();
    let _restart = Restart;
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.broker.amqp_url = urls.clone();
    let distribuidor = deployment.start_distribuidor(config).await;
    for id in ["cluster-worker-1", "cluster-worker-2"] {
        let mut worker = deployment.worker_config(id, 4);
        worker.broker.amqp_url = urls.clone();
        deployment.start_worker(worker);
    }
    let queue = deployment.queue.clone();
    let (_, online) = queue_state(&queue)
        .await
        .expect("the work queue in the cluster");
    assert_eq!(
        online.len(),
        3,
        "the work queue has three replicas: {online:?}"
    );

    let (enough_tx, enough) = watch::channel(false);
    let acks = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let load = tokio::spawn(load(distribuidor.client().await, enough, acks.clone()));
    // In the middle of the load: the distribuidor's own node, then the
    // work queue's leader.
    eventually("the first acks", async || {
        acks.load(Ordering::Relaxed) >= 300
    })
    .await;
    let own = nodes_of(&["distribuidor-"]).await.expect("connections")[0][0];
    lose_node(own, &queue, started).await;
    let (leader, _) = queue_state(&queue).await.expect("the work queue's leader");
    lose_node(leader, &queue, started).await;
    enough_tx.send_replace(true);
    let outcome = load.await.unwrap();
    audit(&outcome).await;
    report(&outcome, started.elapsed());
    delete_queues(&urls, &deployment.queue).await;
    deployment.stop().await;
}

/// Every acked task has a succeeded row and an S3 object equal to it, and
/// got one result; no refused task has a row or an object.
async fn audit(outcome: &Outcome) {
    let db = tareas_integration::db();
    for id in &outcome.acked {
        assert_eq!(outcome.results.get(id), Some(&TaskState::Succeeded), "{id}");
        let row = db
            .status(id)
            .await
            .unwrap()
            .expect("a row for an acked task");
        assert_eq!(row.state, TaskState::Succeeded, "{id}");
        let stored = db.document(id).await.unwrap().unwrap();
        let object = tareas_integration::s3_document(id).await;
        assert_eq!(object.as_ref(), Some(&stored), "S3 holds the row of {id}");
    }
    for id in &outcome.refused {
        assert!(
            db.status(id).await.unwrap().is_none(),
            "refused {id} has a row"
        );
        assert!(
            tareas_integration::s3_document(id).await.is_none(),
            "refused {id} ran"
        );
    }
}

/// Prints the figures docs/scaling.md quotes: acks per second over the run
/// and the longest time without an ack (the recovery).
fn report(outcome: &Outcome, elapsed: Duration) {
    let gap = outcome
        .ack_times
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .max()
        .unwrap_or_default();
    println!(
        "cluster: {} acked, {} refused (unavailable) and resubmitted, {} results, {:.0} acks/s over {:.1?}; longest time without an ack {:.2?}",
        outcome.acked.len(),
        outcome.refused.len(),
        outcome.results.len(),
        outcome.acked.len() as f64 / elapsed.as_secs_f64(),
        elapsed,
        gap
    );
}

/// The test's queues live in the cluster, not on the default node.
async fn delete_queues(urls: &str, queue: &str) {
    let connection = tareas_common::amqp::connect(urls, "cluster-test")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for name in [queue.to_owned(), format!("{queue}.dlq")] {
        let _ = channel
            .queue_delete(
                name.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
}

/// `TAREAS_QUORUM_SIZE` sets the replicas of every quorum queue of the
/// topology; more than the cluster has gives each queue all the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queues_get_the_configured_replicas() {
    let urls = cluster(&["urls"]).await.trim().to_owned();
    let connection = tareas_common::amqp::connect(&urls, "cluster-test")
        .await
        .unwrap();
    for (size, replicas) in [(2, 2), (5, 3)] {
        let mut topology = tareas_integration::topology(&format!("test-{}", uuid::Uuid::new_v4()));
        topology.quorum_size = size;
        topology.declare(&connection).await.unwrap();
        for queue in [topology.queue.clone(), topology.dead_letter_queue()] {
            let members = ctl_json(&["list_queues", "name", "members"])
                .await
                .unwrap_or_else(|err| panic!("{err}"));
            let row = members
                .as_array()
                .unwrap()
                .iter()
                .find(|q| q["name"] == queue.as_str())
                .unwrap()
                .clone();
            assert_eq!(
                row["members"].as_array().map(Vec::len),
                Some(replicas),
                "TAREAS_QUORUM_SIZE={size}: {row}"
            );
        }
        delete_queues(&urls, &topology.queue).await;
    }
    let _ = connection.close(200, "done".into()).await;
}
