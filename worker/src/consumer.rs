//! The AMQP session of the worker: connects (with backoff), consumes the
//! work queue with its prefetch (at least the concurrency), hands each
//! delivery to [`crate::delivery`], and on shutdown cancels the consumer,
//! hands back what has not started, drains the rest within a limit and
//! hands back what is still unfinished.
//!
//! If the RabbitMQ connection drops, unacked deliveries return to the queue
//! by themselves; the worker reconnects and carries on.

use std::sync::Arc;

use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use tareas_common::amqp;
use tareas_common::backoff::RABBITMQ;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::{Channels, Context, AMQP_TIMEOUT};
use crate::delivery;

/// Why a consume session ended.
enum Ended {
    Shutdown,
    ConnectionLost,
}

/// Consumes until `shutdown`, reconnecting whenever the connection drops.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    loop {
        let opened = amqp::open_with_backoff(&ctx.amqp_url, AMQP_TIMEOUT, &shutdown, || open(&ctx));
        let Some((connection, channels, consumer)) = opened.await else {
            return;
        };
        tracing::info!(queue = %ctx.topology.queue, worker_id = %ctx.worker_id, concurrency = ctx.concurrency, prefetch = ctx.prefetch, "consuming");
        let heartbeat = crate::health::Heartbeat::start(ctx.health_file.clone());
        ctx.set_linked(true);
        let abandon = CancellationToken::new();
        let tracker = TaskTracker::new();
        let ended = consume(&ctx, &channels, consumer, &tracker, &abandon, &shutdown).await;
        drop(heartbeat);
        ctx.set_linked(false);
        tracker.close();
        match ended {
            Ended::Shutdown => {
                let cancel = channels
                    .consume
                    .basic_cancel(ctx.worker_id.as_str().into(), BasicCancelOptions::default());
                let _ = tokio::time::timeout(AMQP_TIMEOUT, cancel).await;
                if tokio::time::timeout(ctx.drain_limit, tracker.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        in_flight = tracker.len(),
                        "shutdown limit reached; handing unfinished tasks back"
                    );
                    abandon.cancel();
                    tracker.wait().await;
                }
                let _ = tokio::time::timeout(
                    AMQP_TIMEOUT,
                    channels.consume.close(200, "worker shutting down".into()),
                )
                .await;
                let _ = tokio::time::timeout(
                    AMQP_TIMEOUT,
                    connection.close(200, "worker shutting down".into()),
                )
                .await;
                return;
            }
            Ended::ConnectionLost => {
                RABBITMQ.failed(&"the connection was lost; unacked tasks return to the queue");
                abandon.cancel();
                tracker.wait().await;
            }
        }
    }
}

async fn open(ctx: &Context) -> Result<(Arc<Connection>, Channels, lapin::Consumer), lapin::Error> {
    let connection = Arc::new(amqp::connect(&ctx.amqp_url, &ctx.worker_id).await?);
    ctx.topology.declare(&connection).await?;
    let consume = connection.create_channel().await?;
    let prefetch = u16::try_from(ctx.prefetch).unwrap_or(u16::MAX);
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publish = amqp::confirm_channel(&connection).await?;
    let consumer = consume
        .basic_consume(
            ctx.topology.queue.as_str().into(),
            ctx.worker_id.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let channels = Channels::new(connection.clone(), consume, publish);
    Ok((connection, channels, consumer))
}

async fn consume(
    ctx: &Arc<Context>,
    channels: &Channels,
    mut consumer: lapin::Consumer,
    tracker: &TaskTracker,
    abandon: &CancellationToken,
    shutdown: &CancellationToken,
) -> Ended {
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return Ended::Shutdown,
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => {
                tracker.spawn(delivery::process(
                    ctx.clone(),
                    channels.clone(),
                    delivery,
                    delivery::Stop {
                        starting: shutdown.clone(),
                        abandon: abandon.clone(),
                    },
                ));
            }
            Some(Err(err)) => {
                tracing::debug!(cause = %err, "consumer failed");
                return Ended::ConnectionLost;
            }
            None => return Ended::ConnectionLost,
        }
    }
}
