//! Serves one client: reads framed requests, handles up to `max_in_flight`
//! of them at once, writes their replies in request order, and pushes the
//! results of the client's tasks as they arrive (never before their ack).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use tareas_common::protocol::{ErrorCode, Reply, Request};
use tareas_common::task::{TaskId, TaskReport};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::framing::{Frame, Framer};
use crate::intake::{Handled, Shared};
use crate::router::ConnectionId;

/// Results waiting to be written to one client; beyond this, pushes are dropped.
const RESULT_QUEUE: usize = 1024;

type Pending = Pin<Box<dyn Future<Output = Handled> + Send>>;

/// Serves `stream` until the client leaves, misbehaves, idles out, or
/// `shutdown` fires (then in-progress requests still get their replies).
pub async fn serve(
    stream: TcpStream,
    id: ConnectionId,
    shared: Arc<Shared>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (mut reader, writer) = stream.into_split();
    let mut writer = BufWriter::new(writer);
    let mut framer = Framer::new(limits.max_message_bytes);
    let (results_tx, mut results_rx) = mpsc::channel::<TaskReport>(RESULT_QUEUE);
    // Tasks whose result this connection waits for.
    let mut subscribed: HashSet<TaskId> = HashSet::new();
    // Task requests whose ack is not written yet, and results that beat their ack.
    let mut unacked: HashMap<TaskId, Option<TaskReport>> = HashMap::new();
    let mut pending: FuturesOrdered<Pending> = FuturesOrdered::new();
    let idle = Duration::from_secs(limits.idle_timeout_secs);
    let mut deadline = Instant::now() + idle;
    let mut reading = true;

    let outcome = loop {
        // Room for more requests: few enough in progress, and few enough
        // tasks waiting for their results (backpressure, not buffering).
        let has_room = |pending: &FuturesOrdered<Pending>,
                        subscribed: &HashSet<TaskId>,
                        unacked: &HashMap<TaskId, Option<TaskReport>>| {
            pending.len() < limits.max_in_flight
                && subscribed.len() + unacked.len() < limits.max_waiting_results
        };
        // Turn buffered bytes into requests while there is room.
        while reading && has_room(&pending, &subscribed, &unacked) {
            let Some(frame) = framer.next_frame() else {
                break;
            };
            match frame {
                Frame::Object(bytes) => {
                    pending.push_back(start_request(
                        &bytes,
                        id,
                        &shared,
                        &results_tx,
                        &mut unacked,
                    ));
                }
                Frame::Garbage(reason) => {
                    pending.push_back(ready(Reply::error(
                        ErrorCode::InvalidJson,
                        format!("{reason}; skipped to the next newline"),
                        None,
                    )));
                }
                Frame::TooLarge => {
                    let reply = Reply::error(
                        ErrorCode::TooLarge,
                        format!(
                            "message exceeds {} bytes; send smaller tasks (the connection is closed)",
                            limits.max_message_bytes
                        ),
                        None,
                    );
                    reading = false;
                    pending.push_back(ready(reply));
                }
            }
        }
        if !reading && pending.is_empty() {
            break Ok(());
        }
        let waiting_for_nothing = pending.is_empty() && subscribed.is_empty();
        framer.reserve_for_read();
        tokio::select! {
            Some(handled) = pending.next(), if !pending.is_empty() => {
                if let Err(err) = write_handled(&mut writer, handled, &mut subscribed, &mut unacked).await {
                    break Err(err);
                }
            }
            Some(report) = results_rx.recv() => {
                if let Some(slot) = unacked.get_mut(&report.task_id) {
                    *slot = Some(report);
                    continue;
                }
                subscribed.remove(&report.task_id);
                if subscribed.capacity() > 1024 && subscribed.len() < subscribed.capacity() / 4 {
                    subscribed.shrink_to(subscribed.len() * 2);
                }
                if let Err(err) = write_reply(&mut writer, &Reply::Result(report)).await {
                    break Err(err);
                }
            }
            read = reader.read_buf(framer.buffer_mut()), if reading && has_room(&pending, &subscribed, &unacked) => {
                match read {
                    Ok(0) => reading = false,
                    Ok(_) => deadline = Instant::now() + idle,
                    Err(err) => break Err(err),
                }
            }
            () = sleep_until(deadline), if reading && waiting_for_nothing => {
                let reply = Reply::error(
                    ErrorCode::IdleTimeout,
                    format!("no request for {}s; the connection is closed, reconnect to continue", idle.as_secs()),
                    None,
                );
                break write_reply(&mut writer, &reply).await;
            }
            () = shutdown.cancelled(), if reading => reading = false,
        }
    };
    for task_id in subscribed.iter().chain(unacked.keys()) {
        shared.router.unsubscribe(task_id, id);
    }
    let _ = writer.shutdown().await;
    outcome
}

/// Parses one frame and starts handling it.
fn start_request(
    bytes: &[u8],
    id: ConnectionId,
    shared: &Arc<Shared>,
    results: &mpsc::Sender<TaskReport>,
    unacked: &mut HashMap<TaskId, Option<TaskReport>>,
) -> Pending {
    let request = match Request::parse(bytes) {
        Ok(request) => request,
        Err(err) => return ready(err.into_reply()),
    };
    match request {
        Request::Ping => ready(Reply::Pong),
        Request::Health => {
            let shared = shared.clone();
            Box::pin(async move {
                Handled {
                    replies: vec![shared.health().await],
                    subscribed: None,
                }
            })
        }
        Request::Status { task_id } => {
            let shared = shared.clone();
            Box::pin(async move {
                Handled {
                    replies: vec![shared.status(task_id).await],
                    subscribed: None,
                }
            })
        }
        Request::Task(task) => match shared.prepare(task) {
            Err(err) => ready(err.into_reply()),
            Ok(task) => {
                unacked.insert(task.task_id.clone(), None);
                let shared = shared.clone();
                let results = results.clone();
                Box::pin(async move { shared.submit(task, id, &results).await })
            }
        },
    }
}

fn ready(reply: Reply) -> Pending {
    Box::pin(std::future::ready(Handled {
        replies: vec![reply],
        subscribed: None,
    }))
}

/// Writes a request's replies, then any result that arrived before its ack.
async fn write_handled<W: AsyncWrite + Unpin>(
    writer: &mut W,
    handled: Handled,
    subscribed: &mut HashSet<TaskId>,
    unacked: &mut HashMap<TaskId, Option<TaskReport>>,
) -> std::io::Result<()> {
    for reply in &handled.replies {
        write_reply(writer, reply).await?;
    }
    // Settle the bookkeeping of the task this request was about.
    let about = handled.replies.iter().find_map(|reply| match reply {
        Reply::Ack { task_id, .. } => Some(task_id.clone()),
        Reply::Error(error) => error
            .task_id
            .as_deref()
            .and_then(|raw| TaskId::parse(raw).ok()),
        _ => None,
    });
    let early = about.and_then(|task_id| unacked.remove(&task_id).flatten());
    if let Some(task_id) = handled.subscribed {
        match early {
            Some(report) => write_reply(writer, &Reply::Result(report)).await?,
            None => {
                subscribed.insert(task_id);
            }
        }
    }
    Ok(())
}

async fn write_reply<W: AsyncWrite + Unpin>(writer: &mut W, reply: &Reply) -> std::io::Result<()> {
    writer.write_all(&reply.to_line()).await?;
    writer.flush().await
}
