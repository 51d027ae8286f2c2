//! The distribuidor's configuration: flags with environment twins.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser};
use tareas_common::config::{BrokerArgs, DatabaseArgs, LogArgs};

/// Tareas distribuidor: accepts tasks over TCP and queues them in RabbitMQ.
#[derive(Debug, Clone, Parser)]
#[command(version, about)]
pub struct Config {
    /// Address to listen on for clients.
    #[arg(long, env = "DISTRIBUIDOR_ADDR", default_value = "0.0.0.0:8888")]
    pub addr: SocketAddr,
    /// Address of the HTTP API; empty: no HTTP API.
    #[arg(long, env = "DISTRIBUIDOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: String,
    /// Every connection begins with a PROXY protocol header (v1 or v2, as
    /// HAProxy's `send-proxy-v2` sends) naming the real client: set it only
    /// when all clients come through the balancer, never on a port that
    /// clients reach directly (they could claim any address).
    #[arg(long, env = "TAREAS_PROXY_PROTOCOL", default_value_t = false, action = clap::ArgAction::Set)]
    pub proxy_protocol: bool,
    /// The server certificate chain (PEM): with `TAREAS_TLS_KEY`, the
    /// client port speaks TLS only.
    #[arg(long, env = "TAREAS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "TAREAS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub limits: Limits,
    /// Task types accepted besides the built-ins, comma-separated, for
    /// workers that register their own handlers. Their payloads are
    /// validated by the worker, not here.
    #[arg(long, env = "TAREAS_EXTRA_TASK_TYPES", value_delimiter = ',')]
    pub extra_task_types: Vec<String>,
    /// Client tokens for development and compose, `name=token,…`; with any
    /// token configured every connection must authenticate first.
    #[arg(
        long,
        env = "TAREAS_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub tokens: Vec<Secret>,
    /// Operator tokens for the dashboard, `name=token,…` (HTTP Basic with the
    /// token as password, or Bearer). With any client or operator token
    /// configured the dashboard needs one; without, it is open.
    #[arg(
        long,
        env = "TAREAS_OPERATOR_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub operator_tokens: Vec<Secret>,
    /// A file of client tokens, one `name sha256-hex-of-token` per line
    /// (`cliente token new NAME` prints one).
    #[arg(long, env = "TAREAS_TOKENS_FILE")]
    pub tokens_file: Option<String>,
    /// Seconds after which a recorded task whose publish was never
    /// confirmed (its distribuidor died, or the outcome was unknown) is
    /// published by the outbox relay.
    #[arg(long, env = "TAREAS_ORPHAN_AFTER_SECS", default_value_t = 30)]
    pub orphan_after_secs: u64,
    #[command(flatten)]
    pub log: LogArgs,
}

impl Config {
    /// Where the HTTP API listens; `None`: it is off (an empty address).
    pub fn http_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        tareas_common::config::optional_addr("DISTRIBUIDOR_HTTP_ADDR", &self.http_addr)
    }

    /// The TLS acceptor of a TLS-only port, or `None` for plain TCP.
    pub fn tls(&self) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let config = tareas_common::tls::server_config(cert, key)
            .map_err(|err| anyhow::anyhow!("TAREAS_TLS_CERT / TAREAS_TLS_KEY: {err}"))?;
        Ok(Some(tokio_rustls::TlsAcceptor::from(config)))
    }
}

/// Bounds on what clients can make the distribuidor hold.
#[derive(Debug, Clone, Args)]
pub struct Limits {
    /// Most client connections at once; beyond it a client gets `too_many_connections`.
    #[arg(long, env = "TAREAS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Largest single message from a client, in bytes; beyond it `too_large` and close.
    #[arg(long, env = "TAREAS_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Requests one connection may have in progress (awaiting their publish
    /// confirm) before the distribuidor stops reading from it.
    #[arg(long, env = "TAREAS_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,
    /// Tasks one connection may wait for results of (pushed results not
    /// yet arrived); at the limit the distribuidor stops reading from it
    /// until results come in, so subscriptions cannot grow without bound.
    #[arg(long, env = "TAREAS_MAX_WAITING_RESULTS", default_value_t = 10_000)]
    pub max_waiting_results: usize,
    /// Seconds a connection may stay silent, with nothing outstanding, before it is closed.
    /// Whitespace alone is not activity.
    #[arg(long, env = "TAREAS_IDLE_TIMEOUT_SECS", default_value_t = 300)]
    pub idle_timeout_secs: u64,
    /// Seconds a connection has to authenticate when tokens are configured;
    /// past it `unauthenticated` and close.
    #[arg(long, env = "TAREAS_AUTH_TIMEOUT_SECS", default_value_t = 10)]
    pub auth_timeout_secs: u64,
    /// Seconds a message may take to arrive once its first byte has; past
    /// it `request_timeout` and close (a client trickling bytes holds no slot).
    #[arg(long, env = "TAREAS_MESSAGE_TIMEOUT_SECS", default_value_t = 30)]
    pub message_timeout_secs: u64,
    /// Bytes of results one connection may have queued and unwritten; past
    /// it `slow_consumer` and close (its results stay available by `status`).
    #[arg(long, env = "TAREAS_MAX_CONNECTION_OUTPUT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_output_bytes: usize,
    /// Bytes all connections together may hold (read buffers, requests in
    /// progress, queued results); when it is full, a connection that holds
    /// some stops reading, or for a result closes as a slow consumer.
    #[arg(long, env = "TAREAS_MAX_BUFFERED_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_buffered_bytes: usize,
    /// Seconds one write to a client may take; past it the client is a slow
    /// consumer and the connection closes (also while shutting down).
    #[arg(long, env = "TAREAS_WRITE_TIMEOUT_SECS", default_value_t = 30)]
    pub write_timeout_secs: u64,
    /// Seconds to let connections finish their in-progress requests after SIGTERM.
    #[arg(long, env = "TAREAS_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
    /// Tasks one client (one peer address) may have queued or running on
    /// the work queue; beyond it `quota_exceeded`. 0: no limit.
    #[arg(
        long,
        env = "TAREAS_MAX_OUTSTANDING_PER_CLIENT",
        default_value_t = 1000
    )]
    pub max_outstanding_per_client: u64,
    /// Longest `text` of a `hash`, `reverse` or `echo` task, in bytes.
    #[arg(long, env = "TAREAS_MAX_TEXT_BYTES", default_value_t = 65_536)]
    pub max_text_bytes: usize,
    /// Most `numbers` in one `sum` task.
    #[arg(long, env = "TAREAS_MAX_SUM_NUMBERS", default_value_t = 100_000)]
    pub max_sum_numbers: usize,
    /// PostgreSQL connections in the pool.
    #[arg(long, env = "TAREAS_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
}

/// A value never printed, not even by `{:?}`.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(value.to_owned()))
    }
}

impl Limits {
    /// The caps on built-in payloads.
    pub fn payloads(&self) -> tareas_common::builtin::PayloadLimits {
        tareas_common::builtin::PayloadLimits {
            max_text_bytes: self.max_text_bytes,
            max_sum_numbers: self.max_sum_numbers,
        }
    }
}

impl Config {
    /// The defaults, as if no flag or environment variable were set.
    pub fn defaults() -> Config {
        tareas_common::config::parse_from(["distribuidor"])
    }
}
