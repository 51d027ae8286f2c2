//! Helpers: start the real distribuidor and workers in-process against the
//! real RabbitMQ, PostgreSQL and S3 server, each test on its own queue.

pub mod http;

use std::net::SocketAddr;
use std::time::Duration;

use cliente::Client;
use lapin::options::QueueDeleteOptions;
use lapin::Connection;
use serde_json::Value;
use tareas_common::db::Db;
use tareas_common::protocol::{Reply, Request, TaskRequest};
use tareas_common::s3::S3Store;
use tareas_common::task::TaskReport;
use tareas_common::topology::Topology;
use tareas_distribuidor::config::Config;
use tareas_distribuidor::Distribuidor;
use tareas_worker::{Worker, WorkerConfig};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long any single wait in a test may take before the test fails.
pub const LIMIT: Duration = Duration::from_secs(30);

const START_SERVICES: &str = "start the services with `scripts/services`";

/// One test's private deployment: its own queue, shared services.
pub struct Deployment {
    pub queue: String,
    shutdown: CancellationToken,
    handles: Vec<JoinHandle<()>>,
}

/// A running distribuidor.
pub struct RunningDistribuidor {
    pub addr: SocketAddr,
}

impl Deployment {
    pub async fn new() -> Deployment {
        check_services().await;
        let queue = format!("test-{}", uuid::Uuid::new_v4());
        Deployment {
            queue,
            shutdown: CancellationToken::new(),
            handles: Vec::new(),
        }
    }

    pub fn distribuidor_config(&self) -> Config {
        let mut config = Config::defaults();
        config.broker.queue = self.queue.clone();
        config.limits.shutdown_timeout_secs = 2;
        // Every test client comes from 127.0.0.1: tests that load one
        // queue from it raise the quota (as load tests must); the quota's
        // own test sets one.
        config.limits.max_outstanding_per_client = 0;
        config
    }

    pub fn worker_config(&self, worker_id: &str, concurrency: usize) -> WorkerConfig {
        let mut config = WorkerConfig::defaults();
        config.broker.queue = self.queue.clone();
        config.worker_id = Some(worker_id.to_owned());
        config.concurrency = Some(concurrency);
        config.shutdown_timeout_secs = 2;
        config
    }

    /// Starts a distribuidor on 127.0.0.1:0 and waits until it is ready.
    pub async fn start_distribuidor(&mut self, config: Config) -> RunningDistribuidor {
        self.spawn_distribuidor(config, true, None).await
    }

    /// Starts a distribuidor with its HTTP API (both on 127.0.0.1:0) and
    /// waits until it is ready; returns the HTTP API's address too.
    pub async fn start_distribuidor_with_http(
        &mut self,
        config: Config,
    ) -> (RunningDistribuidor, SocketAddr) {
        let http = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let http_addr = http.local_addr().expect("local addr");
        let running = self.spawn_distribuidor(config, true, Some(http)).await;
        (running, http_addr)
    }

    /// Starts a distribuidor without waiting for its dependencies.
    pub async fn start_distribuidor_unready(&mut self, config: Config) -> RunningDistribuidor {
        self.spawn_distribuidor(config, false, None).await
    }

    async fn spawn_distribuidor(
        &mut self,
        config: Config,
        wait_ready: bool,
        http: Option<TcpListener>,
    ) -> RunningDistribuidor {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let distribuidor =
            Distribuidor::start(config, self.shutdown.clone()).expect("distribuidor config");
        if wait_ready {
            tokio::time::timeout(LIMIT, distribuidor.ready())
                .await
                .unwrap_or_else(|_| {
                    panic!("distribuidor not ready within {LIMIT:?}; {START_SERVICES}")
                });
        }
        let shutdown = self.shutdown.clone();
        self.handles.push(tokio::spawn(
            distribuidor.serve_with_http(listener, http, shutdown),
        ));
        RunningDistribuidor { addr }
    }

    /// Starts a worker running the built-ins; returns its own stop token.
    pub fn start_worker(&mut self, config: WorkerConfig) -> CancellationToken {
        let mut registry = tareas_worker::Registry::new();
        tareas_worker::builtins::register(&mut registry);
        self.start_worker_with(config, registry)
    }

    /// Starts a worker running the handlers of `registry`.
    pub fn start_worker_with(
        &mut self,
        config: WorkerConfig,
        registry: tareas_worker::Registry,
    ) -> CancellationToken {
        self.start_observed_worker(config, registry, None)
    }

    /// [`Deployment::start_worker_with`], serving `/metrics`, `/healthz`
    /// and `/readyz` on `metrics`.
    pub fn start_observed_worker(
        &mut self,
        config: WorkerConfig,
        registry: tareas_worker::Registry,
        metrics: Option<TcpListener>,
    ) -> CancellationToken {
        let worker = Worker::new(&config, registry).expect("worker config");
        let stop = self.shutdown.child_token();
        self.handles
            .push(tokio::spawn(worker.run_observed(metrics, stop.clone())));
        stop
    }

    /// Stops everything and deletes the test's queues.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for handle in self.handles {
            let _ = tokio::time::timeout(LIMIT, handle).await;
        }
        delete_queues(&self.queue).await;
    }
}

impl RunningDistribuidor {
    pub async fn client(&self) -> Client {
        Client::connect(&self.addr.to_string())
            .await
            .expect("connect to the distribuidor")
    }
}

/// Fails the test, with the fix, when a service is not reachable.
async fn check_services() {
    if let Err(err) = connect_rabbitmq().await {
        panic!("RabbitMQ is not reachable: {err}; {START_SERVICES}");
    }
    // On a fresh database the table does not exist until a process
    // migrated it; tests that read it before starting one need it too.
    if let Err(err) = db().migrate().await {
        panic!("PostgreSQL is not reachable: {err}; {START_SERVICES}");
    }
    if let Err(err) = s3().ensure_bucket().await {
        panic!("the S3 server is not reachable: {err}; {START_SERVICES}");
    }
}

/// Deletes the queues of work queue `queue` on the default node.
pub async fn delete_queues(queue: &str) {
    let Ok(connection) = connect_rabbitmq().await else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let topology = Topology::new(queue);
    let mut names = vec![topology.queue.clone(), topology.dead_letter_queue()];
    names.extend(
        [25, 50]
            .into_iter()
            .flat_map(|base: u64| {
                (0..8).flat_map(move |level| (4..=8).map(move |step| (base << level) * step / 8))
            })
            .map(|ms| topology.retry_queue(ms)),
    );
    for name in names {
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            topology.dead_letter_exchange().as_str().into(),
            Default::default(),
        )
        .await;
    let _ = connection.close(200, "test done".into()).await;
}

/// A connection to the local RabbitMQ, named `tareas-tests` in its UI.
async fn connect_rabbitmq() -> Result<Connection, lapin::Error> {
    let amqp = WorkerConfig::defaults().broker.amqp_url;
    tareas_common::amqp::connect(&amqp, "tareas-tests").await
}

/// A connection to the local RabbitMQ; fails the test without one.
pub async fn rabbitmq() -> Connection {
    connect_rabbitmq()
        .await
        .unwrap_or_else(|err| panic!("RabbitMQ is not reachable: {err}; {START_SERVICES}"))
}

pub fn db() -> Db {
    Db::new(&WorkerConfig::defaults().database.database_url, 2).expect("database url")
}

pub fn s3() -> S3Store {
    S3Store::new(&WorkerConfig::defaults().s3)
}

/// The messages waiting in a queue, taken off it (test queues only).
pub async fn drain_queue(queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let connection = rabbitmq().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut messages = Vec::new();
    while let Some(message) = channel
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        messages.push(message);
    }
    let _ = connection.close(200, "done".into()).await;
    messages
}

/// Polls until `queue` has exactly `n` messages ready (not yet delivered
/// to a consumer): the count is RabbitMQ's, there is nothing else to wait on.
pub async fn wait_for_ready_messages(queue: &str, n: u32) {
    let connection = rabbitmq().await;
    let channel = connection.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let ready = channel
            .queue_declare(queue.into(), passive, Default::default())
            .await
            .expect("passive queue.declare")
            .message_count();
        if ready == n {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} never had {n} ready messages; last {ready}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = connection.close(200, "done".into()).await;
}

/// The reply queues of distribuidores on `queue`, by name (`rabbitmqctl`:
/// AMQP cannot list queues).
pub fn reply_queues(queue: &str) -> Vec<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .output()
        .expect("rabbitmqctl");
    assert!(output.status.success(), "rabbitmqctl list_queues failed");
    let prefix = format!("{queue}.reply.");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|name| name.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// A task request.
pub fn task(task_type: &str, payload: Value) -> TaskRequest {
    TaskRequest {
        task_type: Some(task_type.to_owned()),
        payload: Some(payload),
        ..TaskRequest::default()
    }
}

/// The next reply, or the test fails.
pub async fn next(client: &mut Client) -> Reply {
    client.recv_within(LIMIT).await.expect("a reply")
}

/// Submits a task and returns its ack'd id, or the test fails.
pub async fn submit_ok(client: &mut Client, request: TaskRequest) -> String {
    client.send(&Request::Task(request)).await.expect("send");
    match next(client).await {
        Reply::Ack { task_id, .. } => task_id.to_string(),
        other => panic!("expected an ack, got {other:?}"),
    }
}

/// Sends all `requests` pipelined and waits for every ack and every
/// result; returns the acked ids in request order and the results by id.
pub async fn run_all(
    client: &mut Client,
    requests: Vec<TaskRequest>,
) -> (Vec<String>, std::collections::HashMap<String, TaskReport>) {
    let count = requests.len();
    for request in requests {
        client.send(&Request::Task(request)).await.expect("send");
    }
    let mut acked = Vec::new();
    let mut results = std::collections::HashMap::new();
    while acked.len() < count || results.len() < count {
        match next(client).await {
            Reply::Ack { task_id, .. } => acked.push(task_id.to_string()),
            Reply::Result(report) => {
                assert!(
                    acked.contains(&report.task_id.to_string()),
                    "result before its ack: {report:?}"
                );
                let previous = results.insert(report.task_id.to_string(), report);
                assert!(previous.is_none(), "a second result for {previous:?}");
            }
            other => panic!("expected acks and results, got {other:?}"),
        }
    }
    (acked, results)
}

/// Waits for the next result pushed on `client`.
pub async fn next_result(client: &mut Client) -> TaskReport {
    match next(client).await {
        Reply::Result(report) => report,
        other => panic!("expected a result, got {other:?}"),
    }
}

/// The S3 document of a task, parsed.
pub async fn s3_document(task_id: &str) -> Option<Value> {
    let bytes = s3().get_result(task_id).await.expect("S3 get")?;
    Some(serde_json::from_slice(&bytes).expect("S3 document is JSON"))
}

/// Polls a task's status until `accept` says yes (the state is written by
/// another process, so there is nothing to wait on but the row itself).
pub async fn wait_for_status(
    client: &mut Client,
    task_id: &str,
    accept: impl Fn(&Reply) -> bool,
) -> Reply {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        client
            .send(&Request::Status {
                task_id: task_id.to_owned(),
            })
            .await
            .expect("send status");
        let reply = next(client).await;
        if accept(&reply) {
            return reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never matched; last: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A binary or example of the workspace, built next to the test binaries
/// (`target/debug/<name>`, or `target/debug/examples/<name>`).
pub fn binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build --workspace --bins --examples` (scripts/test does)",
        path.display()
    );
    path
}

/// A distribuidor running as its own process (the built binary), with its
/// log in a file, for tests that read what it logs.
pub struct DistribuidorProcess {
    pub addr: String,
    /// Everything it wrote to stderr.
    pub log: std::path::PathBuf,
    child: tokio::process::Child,
}

impl DistribuidorProcess {
    /// Starts `target/debug/distribuidor` on `queue` with `env` on top of
    /// the defaults, and waits until it is ready (RabbitMQ and PostgreSQL up).
    pub async fn start(queue: &str, env: &[(&str, &str)]) -> DistribuidorProcess {
        DistribuidorProcess::start_with_probe(queue, env, None).await
    }

    /// As [`DistribuidorProcess::start`]; the readiness probe sends
    /// `preamble` first (a PROXY header, when the process expects one).
    pub async fn start_with_probe(
        queue: &str,
        env: &[(&str, &str)],
        preamble: Option<Vec<u8>>,
    ) -> DistribuidorProcess {
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("addr").to_string()
        };
        let log = std::env::temp_dir().join(format!("{queue}-distribuidor.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(binary("distribuidor"))
            .env("TAREAS_QUEUE", queue)
            .env("DISTRIBUIDOR_ADDR", &addr)
            // Many run at once: no HTTP API unless a test asks for one.
            .env("DISTRIBUIDOR_HTTP_ADDR", "")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start the distribuidor binary");
        let process = DistribuidorProcess { addr, log, child };
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            if let Ok(mut client) = Client::connect(&process.addr).await {
                if let Some(preamble) = &preamble {
                    client.send_raw(preamble).await.expect("send");
                }
                client.send(&Request::Health).await.expect("send");
                let mut reply = client.recv_within(LIMIT).await;
                if let Ok(Reply::Auth { .. }) = reply {
                    // The answer to the preamble's auth; the health one is next.
                    reply = client.recv_within(LIMIT).await;
                }
                if let Ok(Reply::Health { ready: true, .. }) = reply {
                    return process;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the distribuidor process never became ready; see {}",
                process.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.addr)
            .await
            .expect("connect to the distribuidor")
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).expect("read the distribuidor's log")
    }

    /// Waits (at most `within`) until its log holds `count` lines containing `text`.
    pub async fn wait_for_log(&self, text: &str, count: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let found = self.log().lines().filter(|l| l.contains(text)).count();
            if found >= count {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the distribuidor logged {found} of {count} lines with {text:?}; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The most memory it has had resident (`VmHWM`), in bytes.
    pub fn peak_resident_bytes(&self) -> u64 {
        let pid = self.child.id().expect("the distribuidor is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .expect("VmHWM in /proc/<pid>/status");
        kib * 1024
    }

    /// Kills it (SIGKILL): no drain, nothing finished; a crash.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill the distribuidor");
        let _ = std::fs::remove_file(&self.log);
    }

    /// Stops it the way compose does (SIGTERM) and waits for it to exit.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(LIMIT, self.child.wait()).await;
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The topology the test deployment's processes declare for `queue` (the
/// same arguments: RabbitMQ refuses a queue declared again with others).
pub fn topology(queue: &str) -> Topology {
    let mut broker = WorkerConfig::defaults().broker;
    broker.queue = queue.to_owned();
    Topology::from_args(&broker)
}
