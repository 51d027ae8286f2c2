//! The accept loop: caps connections, spawns one [`connection::serve`] per
//! client (after its PROXY header, when the balancer sends one, and its TLS
//! handshake, when the port is TLS-only), and on
//! shutdown stops accepting and waits (within a limit) for the connections
//! to finish their in-progress requests.

use std::net::SocketAddr;
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
use crate::proxy;
use crate::transport::{self, Reader, Writer};

/// What a connection passes before its first request.
#[derive(Clone)]
pub struct Door {
    /// Each connection must begin with a PROXY header, and the address it
    /// states is the client's.
    pub proxy_protocol: bool,
    /// The port is TLS-only: each connection begins with a handshake.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Accepts clients on `listener` until `shutdown` fires, then drains.
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    limits: Limits,
    door: Door,
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
        let (mut stream, peer) = match accepted {
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
        let door = door.clone();
        tracker.spawn(async move {
            let Some(peer) = client_address(&mut stream, peer, door.proxy_protocol, &limits).await
            else {
                return;
            };
            // One span per client: every line logged while serving it says which.
            let span = tracing::info_span!("connection", id, %peer);
            let serving = async move {
                let Some(halves) = handshake(stream, door.tls.as_ref(), &limits).await else {
                    return;
                };
                tracing::debug!("client connected");
                let _open =
                    tareas_common::metrics::InProgress::start(tareas_common::metrics::CONNECTIONS);
                let served = connection::serve(halves, id, peer, shared, limits, shutdown).await;
                if let Err(err) = served {
                    tracing::debug!(cause = %err, "client connection ended with an error");
                }
            };
            serving.instrument(span).await;
            drop(permit);
        });
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

/// Who is connected: the socket's peer, or behind a balancer the client its
/// PROXY header names. `None`: no usable header in time; the connection is
/// told so and closed.
async fn client_address(
    stream: &mut TcpStream,
    peer: SocketAddr,
    proxy_protocol: bool,
    limits: &Limits,
) -> Option<SocketAddr> {
    if !proxy_protocol {
        return Some(peer);
    }
    let limit = Duration::from_secs(limits.message_timeout_secs);
    if peer.ip().is_loopback() && !starts_with_proxy_header(stream, limit).await {
        // The host itself (a container's healthcheck): nobody else can
        // connect from loopback, so it claims nothing.
        return Some(peer);
    }
    let error = match tokio::time::timeout(limit, proxy::read_header(stream)).await {
        Ok(Ok(client)) => return Some(client.unwrap_or(peer)),
        Ok(Err(err)) => err.to_string(),
        Err(_) => "no PROXY protocol header in time".to_owned(),
    };
    tracing::debug!(%peer, cause = %error, "refusing a connection without a PROXY header");
    let reply = Reply::error(
        ErrorCode::InvalidRequest,
        format!("{error}: this port takes connections from the load balancer only (TAREAS_PROXY_PROTOCOL=true)"),
        None,
    );
    let _ = tokio::time::timeout(limit, stream.write_all(&reply.to_line())).await;
    let _ = stream.shutdown().await;
    None
}

/// The connection's halves, after its TLS handshake on a TLS-only port.
/// `None`: the handshake failed or took longer than a message may (a
/// plaintext client gets no JSON reply, only TLS's own alert).
async fn handshake(
    stream: TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    limits: &Limits,
) -> Option<(Reader, Writer)> {
    let Some(acceptor) = tls else {
        return Some(transport::plain(stream));
    };
    let limit = Duration::from_secs(limits.message_timeout_secs);
    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(transport::tls(stream)),
        Ok(Err(err)) => {
            tracing::debug!(cause = %err, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("no TLS handshake in time");
            None
        }
    }
}

/// Whether the first bytes (peeked, not consumed) begin a PROXY header.
async fn starts_with_proxy_header(stream: &TcpStream, limit: Duration) -> bool {
    let mut first = [0u8; 1];
    match tokio::time::timeout(limit, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == b'P' || first[0] == b'\r',
        _ => true,
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
