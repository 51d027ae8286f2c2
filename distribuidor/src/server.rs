//! The accept loop: caps connections, spawns one [`connection::serve`] per
//! client, and on shutdown stops accepting and waits (within a limit) for
//! the connections to finish their in-progress requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tareas_common::backoff::Backoff;
use tareas_common::protocol::{ErrorCode, Reply};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::Limits;
use crate::connection;
use crate::intake::Shared;

/// Accepts clients on `listener` until `shutdown` fires, then drains.
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    let next_id = AtomicU64::new(1);
    let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff.reset();
                accepted
            }
            Err(err) => {
                // Usually out of file descriptors: wait instead of spinning.
                tracing::warn!(cause = %err, "accept failed");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracker.spawn(refuse(stream, limits.max_connections));
            continue;
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let limits = limits.clone();
        let shutdown = shutdown.clone();
        // One span per client: every line logged while serving it says which.
        let span = tracing::info_span!("connection", id, %peer);
        let serving = async move {
            tracing::debug!("client connected");
            if let Err(err) = connection::serve(stream, id, shared, limits, shutdown).await {
                tracing::debug!(cause = %err, "client connection ended with an error");
            }
            drop(permit);
        };
        tracker.spawn(serving.instrument(span));
    }
    tracker.close();
    let limit = Duration::from_secs(limits.shutdown_timeout_secs);
    if tokio::time::timeout(limit, tracker.wait()).await.is_err() {
        tracing::warn!(
            connections = tracker.len(),
            "connections still open after the shutdown limit; closing them"
        );
    }
}

async fn refuse(mut stream: TcpStream, max: usize) {
    let reply = Reply::error(
        ErrorCode::TooManyConnections,
        format!("the server is at its limit of {max} connections; retry later or raise TAREAS_MAX_CONNECTIONS"),
        None,
    );
    let _ = stream.write_all(&reply.to_line()).await;
    let _ = stream.shutdown().await;
}
