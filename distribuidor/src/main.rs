//! `distribuidor`: parse the configuration, start logging, serve.

use std::process::ExitCode;

use anyhow::Context;
use tareas_common::config::redacted;
use tareas_distribuidor::config::Config;
use tareas_distribuidor::Distribuidor;

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config = tareas_common::config::parse();
    let _telemetry = tareas_common::telemetry::init(&config.log, "distribuidor");
    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("distribuidor: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let shutdown = tareas_common::shutdown::on_signal();
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (DISTRIBUIDOR_ADDR); is another distribuidor running?",
                config.addr
            )
        })?;
    tracing::info!(
        addr = %listener.local_addr()?,
        queue = %config.broker.queue,
        amqp = %redacted(&config.broker.amqp_url),
        database = %redacted(&config.database.database_url),
        "distribuidor listening"
    );
    let http = match config.http_addr()? {
        None => None,
        Some(addr) => {
            let http = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen on {addr} (DISTRIBUIDOR_HTTP_ADDR; empty turns the HTTP API off)")
            })?;
            tracing::info!(addr = %http.local_addr()?, "HTTP API listening");
            Some(http)
        }
    };
    let distribuidor = Distribuidor::start(config, shutdown.clone())?;
    distribuidor.serve_with_http(listener, http, shutdown).await;
    tracing::info!("distribuidor stopped");
    Ok(())
}
