//! `cliente`: the command-line client of Tareas.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use cliente::{demo, dlq, Endpoint};
use tareas_common::config::{BrokerArgs, DatabaseArgs};
use tareas_common::protocol::{Reply, Request, TaskRequest};
use tareas_common::task::TaskState;

/// Send tasks to a Tareas distribuidor. With no command: one task of each
/// built-in type, printing acks and results as they arrive.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The distribuidor's address.
    #[arg(
        long,
        env = "DISTRIBUIDOR_ADDR",
        default_value = "127.0.0.1:8888",
        global = true
    )]
    addr: String,
    /// The token to present (a distribuidor with tokens configured requires one).
    #[arg(long, env = "TAREAS_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Connect with TLS (a distribuidor with TAREAS_TLS_CERT).
    #[arg(long, env = "TAREAS_TLS", global = true, action = clap::ArgAction::SetTrue)]
    tls: bool,
    /// With --tls: the PEM certificate(s) to trust (a self-signed
    /// certificate, or the CA that signed the distribuidor's); without it,
    /// the system's roots.
    #[arg(long, env = "TAREAS_CA", global = true)]
    ca: Option<std::path::PathBuf>,
    /// Seconds to wait for replies and results.
    #[arg(long, default_value_t = 60, global = true)]
    timeout: u64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Submit one task and print its ack (and its result with --wait).
    Submit {
        /// hash, fibonacci, reverse, sum, compute, sleep, echo, or a custom type.
        task_type: String,
        /// The payload as JSON, e.g. '{"text":"hola"}'.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Choose the task id (resubmitting it runs the task only once).
        #[arg(long)]
        task_id: Option<String>,
        /// Wait for the result and print it.
        #[arg(long)]
        wait: bool,
    },
    /// Print a task's state and result.
    Status { task_id: String },
    /// Check that the distribuidor answers.
    Ping,
    /// Check that the distribuidor can accept tasks (RabbitMQ and
    /// PostgreSQL reachable); exits non-zero if not. For healthchecks.
    Health,
    /// Load the system with tasks and measure throughput and latency
    /// (with --baseline, also the bare dependencies, in the same run).
    Bench(Box<cliente::bench::BenchArgs>),
    /// Client tokens for a distribuidor (TAREAS_TOKENS_FILE).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The dead-letter queue: tasks that failed their last attempt.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print a fresh random token for client NAME and its TAREAS_TOKENS_FILE line.
    New { name: String },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List the dead-lettered tasks (they stay in the queue).
    List,
    /// Make dead-lettered tasks run again: one by id, or --all.
    Replay {
        /// The task to replay, as its client named it.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        task_id: Option<String>,
        /// The client that submitted it (its token's name); without it, a
        /// task of the anonymous scope. `dlq list` shows `<client>/<task_id>`.
        #[arg(long, conflicts_with = "all")]
        client: Option<String>,
        /// Replay every dead-lettered task.
        #[arg(long)]
        all: bool,
    },
}

/// mimalloc, as in the worker: `bench --baseline` measures S3 with the
/// worker's own S3 client, and so with the worker's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    // A compose `.env` next to it (TAREAS_TOKEN, …) gives defaults.
    let cli: Cli = tareas_common::config::parse_with_env_file(std::path::Path::new(".env"));
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("cliente: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let limit = Duration::from_secs(cli.timeout);
    let tls = match (cli.tls, &cli.ca) {
        (false, None) => None,
        (_, ca) => Some(tareas_common::tls::client_config(ca.as_deref())?),
    };
    let endpoint = Endpoint {
        addr: cli.addr.clone(),
        token: cli.token.clone(),
        tls,
    };
    let addr = cli.addr.as_str();
    match cli.command {
        None => demo(&endpoint, limit).await,
        Some(Command::Submit {
            task_type,
            payload,
            task_id,
            wait,
        }) => {
            let payload = serde_json::from_str(&payload).context("--payload is not valid JSON")?;
            let task = TaskRequest {
                task_id,
                task_type: Some(task_type),
                payload: Some(payload),
                notify: Some(wait),
            };
            submit(&endpoint, task, wait, limit).await
        }
        Some(Command::Status { task_id }) => {
            one_request(&endpoint, Request::Status { task_id }, limit).await
        }
        Some(Command::Ping) => one_request(&endpoint, Request::Ping, limit).await,
        Some(Command::Health) => health(&endpoint, limit).await,
        Some(Command::Bench(args)) => bench(addr, &args).await,
        Some(Command::Token {
            command: TokenCommand::New { name },
        }) => new_token(&name),
        Some(Command::Dlq {
            command: DlqCommand::List,
            broker,
            ..
        }) => dlq_list(&broker).await,
        Some(Command::Dlq {
            command:
                DlqCommand::Replay {
                    task_id,
                    client,
                    all: _,
                },
            broker,
            database,
        }) => {
            let selection = match task_id {
                Some(id) => dlq::Selection::One(dlq::key(client.as_deref(), &id)?),
                None => dlq::Selection::All,
            };
            dlq_replay(&broker, &database, &selection).await
        }
    }
}

/// `token new NAME`: a fresh token and its `TAREAS_TOKENS_FILE` line.
fn new_token(name: &str) -> anyhow::Result<()> {
    tareas_common::token::check_client_name(name)
        .map_err(|problem| anyhow::anyhow!("client name {name:?}: {problem}"))?;
    // 244 random bits from the system's generator, as 64 hex digits.
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    println!("token (give it to the client; it is not stored anywhere): {token}");
    println!(
        "line for TAREAS_TOKENS_FILE: {}",
        tareas_common::token::file_line(name, &token)
    );
    Ok(())
}

/// No command: one task of each built-in type.
async fn demo(endpoint: &Endpoint, limit: Duration) -> anyhow::Result<()> {
    let summary = demo::run(endpoint, limit, true).await?;
    if !summary.errors.is_empty() {
        bail!(
            "{} task(s) were refused: {}",
            summary.errors.len(),
            summary.errors.join("; ")
        );
    }
    Ok(())
}

/// `submit`: prints the ack, and with `wait` the result; a failed task is an error.
async fn submit(
    endpoint: &Endpoint,
    task: TaskRequest,
    wait: bool,
    limit: Duration,
) -> anyhow::Result<()> {
    let mut client = endpoint.connect().await?;
    client.submit(task).await?;
    let ack = expect_ok(client.recv_within(limit).await?)?;
    println!("{}", serde_json::to_string(&ack)?);
    if !wait {
        return Ok(());
    }
    let result = expect_ok(client.recv_within(limit).await?)?;
    println!("{}", serde_json::to_string(&result)?);
    match result {
        Reply::Result(report) if report.status == TaskState::Failed => bail!(
            "task {} failed: {}",
            report.task_id,
            report.error.unwrap_or_default()
        ),
        _ => Ok(()),
    }
}

/// `health`: exits non-zero unless the distribuidor can accept tasks.
async fn health(endpoint: &Endpoint, limit: Duration) -> anyhow::Result<()> {
    let mut client = endpoint.connect().await?;
    client.send(&Request::Health).await?;
    let reply = expect_ok(client.recv_within(limit).await?)?;
    println!("{}", serde_json::to_string(&reply)?);
    match reply {
        Reply::Health { ready: true, .. } => Ok(()),
        Reply::Health {
            rabbitmq, postgres, ..
        } => bail!(
            "not ready: rabbitmq {}, postgres {}",
            up(rabbitmq),
            up(postgres)
        ),
        other => bail!("unexpected reply: {other:?}"),
    }
}

async fn bench(addr: &str, args: &cliente::bench::BenchArgs) -> anyhow::Result<()> {
    let report = cliente::bench::run(addr, args).await?;
    print!("{}", report.render());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn dlq_list(broker: &BrokerArgs) -> anyhow::Result<()> {
    let dead = dlq::list(broker, usize::MAX).await?;
    for letter in &dead {
        println!(
            "{}  {}  ({})",
            letter.task_id.as_deref().unwrap_or("<unreadable message>"),
            letter.task_type.as_deref().unwrap_or("-"),
            letter.reason
        );
    }
    println!("{} task(s) in {}.dlq", dead.len(), broker.queue);
    Ok(())
}

async fn dlq_replay(
    broker: &BrokerArgs,
    database: &DatabaseArgs,
    selection: &dlq::Selection,
) -> anyhow::Result<()> {
    let db = tareas_common::db::Db::new(&database.database_url, 2)?;
    let replayed = dlq::replay(broker, &db, selection).await?;
    for id in &replayed {
        println!("replayed {id}");
    }
    println!("{} task(s) replayed into {}", replayed.len(), broker.queue);
    Ok(())
}

async fn one_request(endpoint: &Endpoint, request: Request, limit: Duration) -> anyhow::Result<()> {
    let mut client = endpoint.connect().await?;
    client.send(&request).await?;
    let reply = expect_ok(client.recv_within(limit).await?)?;
    println!("{}", serde_json::to_string(&reply)?);
    Ok(())
}

fn up(reachable: bool) -> &'static str {
    if reachable {
        "up"
    } else {
        "down"
    }
}

/// An error reply becomes an error, with its code and message.
fn expect_ok(reply: Reply) -> anyhow::Result<Reply> {
    match reply {
        Reply::Error(error) => bail!("{} ({})", error.message, error.code.as_str()),
        other => Ok(other),
    }
}
