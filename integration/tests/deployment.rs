//! The compose deployment, run natively: the real `distribuidor` and three
//! `worker` binaries as child processes, given the environment variables
//! that docker-compose.yml gives their containers (pointed at the local
//! services). Work spreads over all three workers, and stopping one of them
//! the way `docker compose stop` does (SIGTERM) loses no acked task.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::Stdio;

use serde_json::json;
use tareas_common::protocol::{Reply, Request};
use tareas_common::task::TaskState;
use tareas_distribuidor::config::Config;
use tareas_worker::WorkerConfig;
use tokio::process::{Child, Command};

use tareas_integration::{binary, next, task, Deployment, LIMIT};

/// The environment variable names of one service in docker-compose.yml,
/// including those merged in from the `x-tareas-env` anchor.
fn compose_environment(service: &str) -> BTreeSet<String> {
    let compose = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docker-compose.yml"
    ))
    .expect("read docker-compose.yml");
    let keys_under = |header: &str, indent: usize| -> BTreeSet<String> {
        let mut keys = BTreeSet::new();
        let mut lines = compose
            .lines()
            .skip_while(|line| !line.starts_with(header))
            .skip(1);
        for line in lines.by_ref() {
            let depth = line.len() - line.trim_start().len();
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            if depth < indent {
                break;
            }
            if depth == indent {
                if let Some((key, _)) = line.trim().split_once(':') {
                    keys.insert(key.to_owned());
                }
            }
        }
        keys
    };
    let service_block: String = compose
        .lines()
        .skip_while(|line| *line != format!("  {service}:"))
        .skip(1)
        .take_while(|line| line.is_empty() || line.starts_with("   "))
        .collect::<Vec<_>>()
        .join("\n");
    let mut keys = BTreeSet::new();
    let mut in_environment = false;
    for line in service_block.lines() {
        if line == "    environment:" {
            in_environment = true;
        } else if in_environment && line.trim_start().starts_with('#') {
            continue;
        } else if in_environment && line.starts_with("      ") {
            if let Some((key, _)) = line.trim().split_once(':') {
                if key == "<<" {
                    keys.extend(keys_under("x-tareas-env:", 2));
                } else {
                    keys.insert(key.to_owned());
                }
            }
        } else if !line.starts_with("      ") {
            in_environment = false;
        }
    }
    assert!(
        !keys.is_empty(),
        "no environment found for {service} in docker-compose.yml"
    );
    keys
}

/// The local value for each variable compose sets.
fn local_values(queue: &str, addr: &str) -> BTreeMap<&'static str, String> {
    let worker = WorkerConfig::defaults();
    let distribuidor = Config::defaults();
    let mut values = BTreeMap::from([
        ("AMQP_URL", worker.broker.amqp_url),
        ("DATABASE_URL", worker.database.database_url),
        ("TAREAS_QUEUE", queue.to_owned()),
        ("RUST_LOG", "warn".to_owned()),
        ("DISTRIBUIDOR_ADDR", addr.to_owned()),
        ("DISTRIBUIDOR_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("WORKER_METRICS_ADDR", "127.0.0.1:0".to_owned()),
        ("S3_ENDPOINT", worker.s3.s3_endpoint),
        ("S3_BUCKET", worker.s3.s3_bucket),
        ("AWS_ACCESS_KEY_ID", worker.s3.aws_access_key_id),
        ("AWS_SECRET_ACCESS_KEY", worker.s3.aws_secret_access_key),
        ("AWS_REGION", worker.s3.aws_region),
        ("WORKER_CONCURRENCY", "2".to_owned()),
        (
            "TAREAS_MAX_CONNECTIONS",
            distribuidor.limits.max_connections.to_string(),
        ),
        ("LOG_FORMAT", "json".to_owned()),
    ]);
    // What compose passes for a setting that `.env` leaves out: an empty
    // value, which the programs read as "use the default".
    for unset in [
        "TAREAS_SHUTDOWN_TIMEOUT_SECS",
        "TAREAS_QUEUE_MAX_LENGTH",
        "TAREAS_QUORUM_SIZE",
        "TAREAS_EXTRA_TASK_TYPES",
        "TAREAS_MAX_MESSAGE_BYTES",
        "TAREAS_MAX_OUTSTANDING_PER_CLIENT",
        "TAREAS_MAX_IN_FLIGHT",
        "TAREAS_MAX_WAITING_RESULTS",
        "TAREAS_IDLE_TIMEOUT_SECS",
        "TAREAS_MESSAGE_TIMEOUT_SECS",
        "TAREAS_MAX_CONNECTION_OUTPUT_BYTES",
        "TAREAS_WRITE_TIMEOUT_SECS",
        "TAREAS_MAX_BUFFERED_BYTES",
        "TAREAS_PROXY_PROTOCOL",
        "TAREAS_ORPHAN_AFTER_SECS",
        "TAREAS_TOKENS",
        "TAREAS_TOKEN",
        "TAREAS_AUTH_TIMEOUT_SECS",
        "TAREAS_OPERATOR_TOKENS",
        "TAREAS_DB_POOL_SIZE",
        "TAREAS_MAX_TEXT_BYTES",
        "TAREAS_MAX_SUM_NUMBERS",
        "WORKER_PREFETCH",
        "TAREAS_TASK_TIME_LIMIT_SECS",
        "TAREAS_TASK_TIME_LIMITS",
        "TAREAS_MAX_ATTEMPTS",
        "TAREAS_RETRY_BASE_MS",
        "TAREAS_RETRY_MAX_MS",
        "TAREAS_RESULT_TTL",
        "TAREAS_RETENTION_INTERVAL",
    ] {
        values.insert(unset, String::new());
    }
    values
}

fn spawn(
    service: &str,
    name: &str,
    values: &BTreeMap<&'static str, String>,
    extra: &[(&str, String)],
) -> Child {
    let mut command = Command::new(binary(service));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for key in compose_environment(service) {
        let value = values.get(key.as_str()).unwrap_or_else(|| {
            panic!("docker-compose.yml gives {service} {key}, which this test does not map")
        });
        command.env(&key, value);
    }
    for (key, value) in extra {
        command.env(key, value);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {name}: {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_environment_runs_three_workers_and_survives_stopping_one() {
    let deployment = Deployment::new().await;
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        probe.local_addr().expect("addr").to_string()
    };
    let values = local_values(&deployment.queue, &addr);
    let mut distribuidor = spawn("distribuidor", "distribuidor", &values, &[]);
    let health = std::env::temp_dir();
    let mut workers: Vec<Child> = (1..=3)
        .map(|i| {
            let file = health.join(format!("{}-worker-{i}.health", deployment.queue));
            spawn(
                "worker",
                "worker",
                &values,
                &[
                    ("WORKER_ID", format!("worker-{i}")),
                    ("WORKER_HEALTH_FILE", file.display().to_string()),
                ],
            )
        })
        .collect();

    // The distribuidor answers `unavailable` until its dependencies are up.
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut client = loop {
        if let Ok(mut client) = cliente::Client::connect(&addr).await {
            client
                .send(&Request::Task(task("echo", json!({"text": "ready?"}))))
                .await
                .expect("send");
            if let Ok(Reply::Ack { .. }) = client.recv_within(LIMIT).await {
                next(&mut client).await; // its result
                break client;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the distribuidor never became ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };

    let total = 90;
    for _ in 0..total {
        client
            .send(&Request::Task(task("sleep", json!({"ms": 60}))))
            .await
            .expect("send");
    }
    let mut acked = HashSet::new();
    let mut results = Vec::new();
    let mut stopped = false;
    while acked.len() < total || results.len() < total {
        match next(&mut client).await {
            Reply::Ack { task_id, .. } => {
                acked.insert(task_id.to_string());
            }
            Reply::Result(report) => {
                assert_eq!(report.status, TaskState::Succeeded, "{report:?}");
                results.push(report);
            }
            other => panic!("unexpected {other:?}"),
        }
        if !stopped && results.len() == 15 {
            // `docker compose stop` of one worker: SIGTERM, then the drain.
            let pid = workers[0].id().expect("worker-1 pid");
            let status = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
            stopped = true;
        }
    }
    let exit = tokio::time::timeout(LIMIT, workers[0].wait())
        .await
        .expect("worker-1 drained in time")
        .expect("wait");
    assert!(
        exit.success(),
        "worker-1 exits cleanly after SIGTERM: {exit}"
    );

    let by_worker: BTreeSet<String> = results.iter().filter_map(|r| r.worker_id.clone()).collect();
    assert_eq!(
        by_worker,
        BTreeSet::from([
            "worker-1".to_owned(),
            "worker-2".to_owned(),
            "worker-3".to_owned()
        ]),
        "work spread over all three workers"
    );
    let db = tareas_integration::db();
    for task_id in &acked {
        let row = db
            .status(task_id)
            .await
            .expect("db")
            .expect("every acked task has a row");
        assert_eq!(
            row.state,
            TaskState::Succeeded,
            "acked task {task_id} was not lost"
        );
    }
    for worker in &mut workers[1..] {
        let _ = worker.start_kill();
    }
    // `docker compose stop` of the distribuidor: it drains, closes its
    // RabbitMQ link and deletes its reply queue before the process exits.
    assert_eq!(tareas_integration::reply_queues(&deployment.queue).len(), 1);
    drop(client);
    let pid = distribuidor.id().expect("distribuidor pid");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(LIMIT, distribuidor.wait())
        .await
        .expect("the distribuidor stopped in time")
        .expect("wait");
    assert!(exit.success(), "the distribuidor exits cleanly: {exit}");
    assert_eq!(
        tareas_integration::reply_queues(&deployment.queue),
        Vec::<String>::new(),
        "no reply queue left behind"
    );
    deployment.stop().await;
}
