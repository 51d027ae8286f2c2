//! The compose deployment, run natively: the real `distribuidor` and three
//! `worker` binaries as child processes, given the environment variables
//! that docker-compose.yml gives their containers (pointed at the local
//! services). Work spreads over all three workers, and stopping one of them
//! the way `docker compose stop` does (SIGTERM) loses no acked task.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
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
        "TAREAS_EXTRA_TASK_TYPES",
        "TAREAS_MAX_MESSAGE_BYTES",
        "TAREAS_MAX_IN_FLIGHT",
        "TAREAS_MAX_WAITING_RESULTS",
        "TAREAS_IDLE_TIMEOUT_SECS",
        "TAREAS_DB_POOL_SIZE",
        "WORKER_PREFETCH",
        "TAREAS_TASK_TIME_LIMIT_SECS",
        "TAREAS_TASK_TIME_LIMITS",
        "TAREAS_MAX_ATTEMPTS",
        "TAREAS_RETRY_BASE_MS",
        "TAREAS_RETRY_MAX_MS",
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

/// The value docker-compose.yml gives `key` in its `x-tareas-env` anchor,
/// with `${NAME:-default}` filled from `env` (as compose fills it from
/// `.env`) and `host` names of compose services replaced by 127.0.0.1.
fn compose_value(key: &str, env: &BTreeMap<&str, &str>) -> String {
    let compose = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docker-compose.yml"
    ))
    .expect("read docker-compose.yml");
    let line = compose
        .lines()
        .skip_while(|line| !line.starts_with("x-tareas-env:"))
        .find_map(|line| line.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("x-tareas-env has no {key}"))
        .trim()
        .to_owned();
    let mut value = String::new();
    let mut rest = line.as_str();
    while let Some(start) = rest.find("${") {
        value.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace") + start;
        let (name, default) = rest[start + 2..end]
            .split_once(":-")
            .unwrap_or((&rest[start + 2..end], ""));
        value.push_str(env.get(name).copied().unwrap_or(default));
        rest = &rest[end + 1..];
    }
    value.push_str(rest);
    value
        .replace("@rabbitmq:", "@127.0.0.1:")
        .replace("@postgres:", "@127.0.0.1:")
}

/// A RabbitMQ user that exists for one test (`rabbitmqctl`), deleted on drop.
struct RabbitUser(String);

impl RabbitUser {
    fn create(name: &str, password: &str) -> RabbitUser {
        let rabbitmqctl = |args: &[&str]| {
            let output = std::process::Command::new("rabbitmqctl")
                .arg("-q")
                .args(args)
                .output()
                .expect("rabbitmqctl");
            assert!(
                output.status.success(),
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        rabbitmqctl(&["add_user", name, password]);
        let user = RabbitUser(name.to_owned());
        rabbitmqctl(&["set_permissions", "-p", "/", name, ".*", ".*", ".*"]);
        user
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.0])
            .output();
    }
}

/// Puts one task message in the dead-letter queue of `queue`.
async fn dead_letter(queue: &str, task_id: &str) {
    let connection = tareas_integration::rabbitmq().await;
    let channel = connection.create_channel().await.expect("channel");
    let topology = tareas_common::topology::Topology::new(queue);
    topology.declare(&channel).await.expect("declare");
    let body = json!({"task_id": task_id, "task_type": "echo", "payload": {}});
    channel
        .basic_publish(
            "".into(),
            topology.dead_letter_queue().as_str().into(),
            Default::default(),
            body.to_string().as_bytes(),
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("sent");
    let _ = connection.close(200, "done".into()).await;
}

/// README: `docker compose exec worker cliente dlq list`. Run natively with
/// the worker container's environment: compose's AMQP_URL and DATABASE_URL
/// filled from an `.env` (a RabbitMQ user of its own, as compose creates
/// one), not cliente's development defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_works_with_the_compose_credentials() {
    let deployment = Deployment::new().await;
    let user = format!("compose-{}", uuid::Uuid::new_v4().simple());
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let _user = RabbitUser::create(&user, &password);
    let task_id = format!("dead-{}", uuid::Uuid::new_v4().simple());
    dead_letter(&deployment.queue, &task_id).await;
    let dotenv = BTreeMap::from([
        ("RABBITMQ_USER", user.as_str()),
        ("RABBITMQ_PASSWORD", password.as_str()),
        ("POSTGRES_USER", "postgres"),
    ]);
    let amqp_url = compose_value("AMQP_URL", &dotenv);
    assert!(amqp_url.contains(&password), "{amqp_url}");

    let list = || {
        std::process::Command::new(binary("cliente"))
            .env_clear()
            .env("AMQP_URL", &amqp_url)
            .env("DATABASE_URL", compose_value("DATABASE_URL", &dotenv))
            .env("TAREAS_QUEUE", &deployment.queue)
            .args(["dlq", "list"])
            .output()
            .expect("run cliente")
    };
    // Listing twice: the first leaves the dead letter in place.
    for _ in 0..2 {
        let output = list();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "cliente dlq list failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains(&task_id), "{stdout}");
        assert!(stdout.contains("1 task(s)"), "{stdout}");
    }
    deployment.stop().await;
}

/// `scripts/check-images` on the real files passes; on copies with an image
/// that cannot be pulled any more, or that floats, it fails and says why.
#[test]
fn check_images_refuses_unpinned_and_gone_images() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let check = |file: &std::path::Path| {
        std::process::Command::new(root.join("scripts/check-images"))
            .arg(file)
            .output()
            .expect("run scripts/check-images")
    };
    let real = root.join("docker-compose.yml");
    let passed = check(&real);
    assert!(
        passed.status.success(),
        "{}",
        String::from_utf8_lossy(&passed.stderr)
    );
    let compose = std::fs::read_to_string(&real).expect("read docker-compose.yml");
    let minio = compose
        .lines()
        .find(|line| line.trim_start().starts_with("image: quay.io/minio/minio:"))
        .expect("the minio image line")
        .trim()
        .to_owned();
    let dir = std::env::temp_dir().join(format!("check-images-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (broken, why) in [
        ("image: minio/minio:latest", "no longer serves images"),
        ("image: quay.io/minio/minio:latest", "uses latest"),
        ("image: quay.io/minio/minio", "has no tag"),
        ("image: rabbitmq:4-management", "floats"),
    ] {
        let copy = dir.join("docker-compose.yml");
        std::fs::write(&copy, compose.replace(&minio, broken)).expect("write copy");
        let output = check(&copy);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{broken} passed: {stderr}");
        assert!(stderr.contains(why), "{broken}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Neither `--help`, nor an error, nor a log line shows a password from
/// AMQP_URL, DATABASE_URL or the S3 secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_printed() {
    const SECRET: &str = "pw-that-must-not-show";
    let secret_env = |command: &mut std::process::Command| {
        command
            .env_clear()
            .env(
                "AMQP_URL",
                format!("amqp://tareas:{SECRET}@127.0.0.1:1/%2f"),
            )
            .env(
                "DATABASE_URL",
                format!("postgres://tareas:{SECRET}@127.0.0.1:1/tareas"),
            )
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("DISTRIBUIDOR_ADDR", "127.0.0.1:0");
    };
    let shows = |output: &std::process::Output| {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (text.contains(SECRET), text)
    };
    for (name, args) in [
        ("distribuidor", vec!["--help"]),
        ("worker", vec!["--help"]),
        ("cliente", vec!["dlq", "list", "--help"]),
        ("cliente", vec!["dlq", "list"]),
    ] {
        let mut command = std::process::Command::new(binary(name));
        secret_env(&mut command);
        let output = command.args(&args).output().expect("run");
        let (leaked, text) = shows(&output);
        assert!(!leaked, "{name} {args:?} printed the secret: {text}");
        if args == ["dlq", "list"] {
            assert!(!output.status.success());
            assert!(text.contains("tareas:***@127.0.0.1:1"), "{text}");
        }
    }
    // The distribuidor's log, up to the line saying RabbitMQ is unavailable.
    let mut command = std::process::Command::new(binary("distribuidor"));
    secret_env(&mut command);
    let mut child = command
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start distribuidor");
    let stderr = child.stderr.take().expect("stderr");
    let mut log = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line.expect("log line");
        log.push_str(&line);
        log.push('\n');
        if line.contains("RabbitMQ is unavailable") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("tareas:***@127.0.0.1:1"), "{log}");
    assert!(!log.contains(SECRET), "the log shows the secret: {log}");
}
