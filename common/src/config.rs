//! Configuration pieces shared by the binaries. Each is a clap `Args` group;
//! every flag has an environment twin and a default that matches the local
//! services started by `scripts/services`.

use clap::{Args, ValueEnum};

/// Where RabbitMQ is and which queue carries the tasks.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// The work queue; its dead-letter queue is `<queue>.dlq`.
    #[arg(long, env = "TAREAS_QUEUE", default_value = "tareas")]
    pub queue: String,
}

/// Where PostgreSQL is.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL; the `tasks` table is created there at start-up.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/tareas"
    )]
    pub database_url: String,
}

/// Where the S3-compatible object store is (MinIO, s3s-fs, AWS).
#[derive(Debug, Clone, Args)]
pub struct S3Args {
    /// S3 endpoint URL; requests use path-style addressing and SigV4.
    #[arg(long, env = "S3_ENDPOINT", default_value = "http://127.0.0.1:9000")]
    pub s3_endpoint: String,
    /// Bucket for result documents; created if missing.
    #[arg(long, env = "S3_BUCKET", default_value = "tareas")]
    pub s3_bucket: String,
    /// S3 access key.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", default_value = "tareas")]
    pub aws_access_key_id: String,
    /// S3 secret key.
    #[arg(
        long,
        env = "AWS_SECRET_ACCESS_KEY",
        default_value = "tareas-secret",
        hide_env_values = true
    )]
    pub aws_secret_access_key: String,
    /// S3 region (MinIO and s3s-fs accept any).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub aws_region: String,
}

/// How logs are written.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// `text` for people, `json` for log collectors. The level comes from `RUST_LOG`.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
