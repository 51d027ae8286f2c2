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
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::codec::{Decoder, FramedRead};
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::framing::{Frame, Framer};
use crate::intake::{Handled, Shared};
use crate::router::ConnectionId;

/// Results waiting to be written to one client; beyond this, pushes are dropped.
const RESULT_QUEUE: usize = 1024;

/// The read buffer's first size; it grows to one message at most.
const READ_BUFFER: usize = 8 * 1024;

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
    let (reader, writer) = stream.into_split();
    let framer = Framer::new(limits.max_message_bytes);
    let mut frames = FramedRead::with_capacity(reader, framer, READ_BUFFER);
    let mut client = Client::new(id, shared, limits, writer);
    let outcome = client.run(&mut frames, &shutdown).await;
    client.close().await;
    outcome
}

/// One client's state between two events. It keeps the ordering rules:
/// replies go out in request order, and a task's result never before its ack.
struct Client {
    /// This connection, as the router knows it.
    id: ConnectionId,
    /// What every connection shares: database, broker, router.
    shared: Arc<Shared>,
    limits: Limits,
    writer: BufWriter<OwnedWriteHalf>,
    /// Given to the router with each subscription; results arrive on `results`.
    results_tx: mpsc::Sender<TaskReport>,
    results: mpsc::Receiver<TaskReport>,
    /// Acked tasks whose result this connection waits for.
    subscribed: HashSet<TaskId>,
    /// Task requests whose ack is not written yet, and results that beat their ack.
    unacked: HashMap<TaskId, Option<TaskReport>>,
    /// Requests in progress; they finish in any order, replies leave in order.
    pending: FuturesOrdered<Pending>,
    /// Still taking requests: false after end of stream, a too-large
    /// message, or shutdown.
    reading: bool,
    /// When a silent connection with nothing outstanding is closed.
    deadline: Instant,
}

/// What woke the connection up.
enum Event {
    /// A request finished: write its replies.
    Handled(Handled),
    /// A result for one of this connection's tasks.
    Result(TaskReport),
    /// A frame read, the end of the stream (`None`), or a read error.
    Frame(Option<std::io::Result<Frame>>),
    IdleTimeout,
    Shutdown,
}

impl Client {
    fn new(
        id: ConnectionId,
        shared: Arc<Shared>,
        limits: Limits,
        writer: OwnedWriteHalf,
    ) -> Client {
        let (results_tx, results) = mpsc::channel(RESULT_QUEUE);
        Client {
            id,
            shared,
            writer: BufWriter::new(writer),
            results_tx,
            results,
            subscribed: HashSet::new(),
            unacked: HashMap::new(),
            pending: FuturesOrdered::new(),
            reading: true,
            deadline: Instant::now() + Duration::from_secs(limits.idle_timeout_secs),
            limits,
        }
    }

    /// Handles events until there is nothing left to read or to answer.
    async fn run(
        &mut self,
        frames: &mut FramedRead<OwnedReadHalf, Framer>,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        while self.reading || !self.pending.is_empty() {
            match self.next_event(frames, shutdown).await {
                Event::Handled(handled) => self.write_handled(handled).await?,
                Event::Result(report) => self.push_result(report).await?,
                Event::Frame(Some(frame)) => {
                    self.deadline = Instant::now() + self.idle_timeout();
                    self.start(frame?);
                    self.start_buffered(frames)?;
                }
                Event::Frame(None) | Event::Shutdown => self.reading = false,
                Event::IdleTimeout => return self.idle_out().await,
            }
        }
        Ok(())
    }

    async fn next_event(
        &mut self,
        frames: &mut FramedRead<OwnedReadHalf, Framer>,
        shutdown: &CancellationToken,
    ) -> Event {
        // Read only with room for more: backpressure, not buffering.
        let read = self.reading && self.has_room();
        let idle = self.reading && self.pending.is_empty() && self.subscribed.is_empty();
        tokio::select! {
            Some(handled) = self.pending.next(), if !self.pending.is_empty() => Event::Handled(handled),
            Some(report) = self.results.recv() => Event::Result(report),
            frame = frames.next(), if read => Event::Frame(frame),
            () = sleep_until(self.deadline), if idle => Event::IdleTimeout,
            () = shutdown.cancelled(), if self.reading => Event::Shutdown,
        }
    }

    /// Starts the requests already read, while there is room, without a
    /// trip through the event loop for each: a pipelining client's frames
    /// arrive many to a read.
    fn start_buffered(
        &mut self,
        frames: &mut FramedRead<OwnedReadHalf, Framer>,
    ) -> std::io::Result<()> {
        while self.reading && self.has_room() {
            // The decoder and its buffer are two borrows of `frames`.
            let mut buffer = std::mem::take(frames.read_buffer_mut());
            let frame = frames.decoder_mut().decode(&mut buffer);
            *frames.read_buffer_mut() = buffer;
            match frame? {
                Some(frame) => self.start(frame),
                None => break,
            }
        }
        Ok(())
    }

    /// Few enough requests in progress, and few enough tasks waiting for
    /// their results.
    fn has_room(&self) -> bool {
        self.pending.len() < self.limits.max_in_flight
            && self.subscribed.len() + self.unacked.len() < self.limits.max_waiting_results
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.idle_timeout_secs)
    }

    /// Starts handling one frame; its replies are written when it is done.
    fn start(&mut self, frame: Frame) {
        let handling = match frame {
            Frame::Object(bytes) => start_request(
                &bytes,
                self.id,
                &self.shared,
                &self.results_tx,
                &mut self.unacked,
            ),
            Frame::Garbage(reason) => ready(Reply::error(
                ErrorCode::InvalidJson,
                format!("{reason}; skipped to the next newline"),
                None,
            )),
            Frame::TooLarge => {
                self.reading = false;
                ready(Reply::error(
                    ErrorCode::TooLarge,
                    format!(
                        "message exceeds {} bytes; send smaller tasks (the connection is closed)",
                        self.limits.max_message_bytes
                    ),
                    None,
                ))
            }
        };
        self.pending.push_back(handling);
    }

    /// A result arrived: held until its task's ack is written, else pushed.
    async fn push_result(&mut self, report: TaskReport) -> std::io::Result<()> {
        if let Some(slot) = self.unacked.get_mut(&report.task_id) {
            *slot = Some(report);
            return Ok(());
        }
        self.subscribed.remove(&report.task_id);
        if self.subscribed.capacity() > 1024
            && self.subscribed.len() < self.subscribed.capacity() / 4
        {
            self.subscribed.shrink_to(self.subscribed.len() * 2);
        }
        write_reply(&mut self.writer, &Reply::Result(report)).await
    }

    /// Writes a request's replies, then any result that arrived before its ack.
    async fn write_handled(&mut self, handled: Handled) -> std::io::Result<()> {
        for reply in &handled.replies {
            write_reply(&mut self.writer, reply).await?;
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
        let early = about.and_then(|task_id| self.unacked.remove(&task_id).flatten());
        if let Some(task_id) = handled.subscribed {
            match early {
                Some(report) => write_reply(&mut self.writer, &Reply::Result(report)).await?,
                None => {
                    self.subscribed.insert(task_id);
                }
            }
        }
        Ok(())
    }

    /// Says why the connection closes after a silence.
    async fn idle_out(&mut self) -> std::io::Result<()> {
        let reply = Reply::error(
            ErrorCode::IdleTimeout,
            format!(
                "no request for {}s; the connection is closed, reconnect to continue",
                self.limits.idle_timeout_secs
            ),
            None,
        );
        write_reply(&mut self.writer, &reply).await
    }

    /// Leaves the router and closes the write side.
    async fn close(mut self) {
        for task_id in self.subscribed.iter().chain(self.unacked.keys()) {
            self.shared.router.unsubscribe(task_id, self.id);
        }
        let _ = self.writer.shutdown().await;
    }
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

async fn write_reply<W: AsyncWrite + Unpin>(writer: &mut W, reply: &Reply) -> std::io::Result<()> {
    writer.write_all(&reply.to_line()).await?;
    writer.flush().await
}
