//! The distribuidor: the TCP front door of Tareas.
//!
//! # Layout
//! - [`config`]: flags and environment variables.
//! - [`server`]: the accept loop and connection limit.
//! - [`transport`]: plain TCP or TLS under a connection.
//! - [`connection`]: one client: framing, pipelining, replies in order, pushed results.
//! - [`framing`]: splits a byte stream into JSON objects, newline or not.
//! - [`gauges`]: samples the gauges of `/metrics` (link, queue depths, results awaited).
//! - [`http`]: the HTTP API beside the socket: the same intake, the `tasks` table, OpenAPI.
//! - [`intake`]: validate, record, publish with confirm, ack; status queries.
//! - [`quota`]: tasks one client may have queued or running.
//! - [`broker`]: the RabbitMQ link: confirms, reconnects, this instance's reply queue.
//! - [`router`]: routes results from the reply queue to the waiting connections.
//! - [`recovery`]: after a reconnect, pushes results that finished while the link was down.

pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod framing;
pub mod gauges;
pub mod http;
pub mod intake;
pub mod memory;
pub mod proxy;
pub mod quota;
pub mod recovery;
pub mod relay;
pub mod router;
pub mod server;
pub mod transport;

use std::collections::HashSet;
use std::sync::Arc;

use tareas_common::db::Db;
use tareas_common::topology::Topology;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::Config;
use crate::intake::Shared;
use crate::router::Router;

/// A distribuidor with its dependencies being connected in the background.
pub struct Distribuidor {
    shared: Arc<Shared>,
    config: Config,
    /// Becomes `true` once the database schema is in place.
    migrated: watch::Receiver<bool>,
    /// Closes the RabbitMQ link, once the connections have drained.
    broker_stop: CancellationToken,
    /// Ends when the link is closed (and this instance's reply queue deleted).
    broker_link: tokio::task::JoinHandle<()>,
    /// The port is TLS-only (`TAREAS_TLS_CERT`, `TAREAS_TLS_KEY`).
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Distribuidor {
    /// Starts connecting to RabbitMQ and PostgreSQL (retrying with backoff
    /// until `shutdown`); fails only on configuration errors.
    pub fn start(config: Config, shutdown: CancellationToken) -> anyhow::Result<Distribuidor> {
        let db = Db::new(&config.database.database_url, config.limits.db_pool_size)?;
        let tls = config.tls()?;
        let tokens = auth::Tokens::load(&config.tokens, config.tokens_file.as_deref())?;
        let operators = auth::Tokens::load(&config.operator_tokens, None)?;
        if !tokens.required() {
            tracing::warn!(
                "no client tokens configured (TAREAS_TOKENS, TAREAS_TOKENS_FILE): any client that \
                 reaches this port may submit tasks and read results; set tokens before exposing it"
            );
        }
        let router = Arc::new(Router::new());
        // Names this process: its reply queue, its RabbitMQ connection, and
        // the rows it records (for the outbox relay).
        let instance = uuid::Uuid::new_v4().simple().to_string();
        // The broker link outlives the shutdown signal: requests in progress
        // when it fires still need their publishes confirmed. `serve` closes
        // it after the last connection has drained.
        let broker_stop = CancellationToken::new();
        let (broker, broker_link) = Broker::start(
            config.broker.amqp_url.clone(),
            Topology::from_args(&config.broker),
            router.clone(),
            instance.clone(),
            broker_stop.clone(),
        );
        tokio::spawn(relay::run(
            relay::Relay {
                db: db.clone(),
                broker: broker.clone(),
                instance: instance.clone(),
                queue: config.broker.queue.clone(),
                orphan_after: std::time::Duration::from_secs(config.orphan_after_secs),
            },
            broker_stop.clone(),
        ));
        tokio::spawn(recovery::run(
            broker.clone(),
            router.clone(),
            db.clone(),
            broker_stop.clone(),
        ));
        tareas_common::metrics::handle();
        tokio::spawn(gauges::run(
            broker.clone(),
            router.clone(),
            broker_stop.clone(),
        ));
        let (migrated_tx, migrated) = watch::channel(false);
        let migrating = db.clone();
        tokio::spawn(async move {
            let done = tareas_common::backoff::retry_until_ok(
                &tareas_common::backoff::POSTGRES,
                &shutdown,
                || migrating.migrate(),
            )
            .await;
            if done.is_some() {
                migrated_tx.send_replace(true);
            }
        });
        let shared = Arc::new(Shared {
            db,
            broker,
            router,
            extra_task_types: config
                .extra_task_types
                .iter()
                .cloned()
                .collect::<HashSet<_>>(),
            payload_limits: config.limits.payloads(),
            quota: quota::Quota::new(
                config.limits.max_outstanding_per_client,
                config.broker.queue.clone(),
            ),
            memory: Arc::new(memory::Memory::new(config.limits.max_buffered_bytes)),
            instance,
            tokens,
            operators,
        });
        Ok(Distribuidor {
            shared,
            config,
            migrated,
            broker_stop,
            broker_link,
            tls,
        })
    }

    /// Waits until RabbitMQ is connected and the schema is in place.
    pub async fn ready(&self) {
        self.shared.broker.wait_connected().await;
        let mut migrated = self.migrated.clone();
        let _ = migrated.wait_for(|done| *done).await;
    }

    /// Serves clients on `listener` until `shutdown`, then drains, then
    /// closes the RabbitMQ link.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        self.serve_with_http(listener, None, shutdown).await;
    }

    /// [`Distribuidor::serve`], and the HTTP API on `http` beside it.
    pub async fn serve_with_http(
        self,
        listener: TcpListener,
        http: Option<TcpListener>,
        shutdown: CancellationToken,
    ) {
        let http = http.map(|http_listener| {
            let app = http::App::start(
                self.shared.clone(),
                &self.config,
                self.broker_stop.clone(),
                shutdown.clone(),
            );
            let router = http::router(app, self.config.limits.max_message_bytes);
            tokio::spawn(http::serve(http_listener, router, shutdown.clone()))
        });
        let door = server::Door {
            proxy_protocol: self.config.proxy_protocol,
            tls: self.tls,
        };
        let limit = std::time::Duration::from_secs(self.config.limits.shutdown_timeout_secs);
        server::run(listener, self.shared, self.config.limits, door, shutdown).await;
        if let Some(http) = http {
            // Long polls end at shutdown; other requests get the drain's limit.
            let _ = tokio::time::timeout(limit, http).await;
        }
        self.broker_stop.cancel();
        // Closing waits for RabbitMQ at most a few seconds per step; the
        // process must not exit halfway, leaving its reply queue behind.
        let _ = self.broker_link.await;
    }
}
