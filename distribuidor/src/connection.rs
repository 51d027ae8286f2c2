//! Serves one client: reads framed requests, handles up to `max_in_flight`
//! of them at once, writes their replies in request order, and pushes the
//! results of the client's tasks as they arrive (never before their ack).
//!
//! Every bound is per connection and in bytes or time: a read buffer only
//! while bytes arrive (an idle connection holds none), one message of at
//! most `max_message_bytes` that must arrive within `message_timeout_secs`,
//! queued results within `max_output_bytes`, and each write within
//! `write_timeout_secs`. A client past one gets an error reply where it can
//! still be written, and the connection closes. What it holds (read buffer,
//! requests in progress, queued results) also counts against the pool all
//! connections share ([`Memory`](crate::memory::Memory)); with the pool
//! full, a connection that holds bytes stops reading until some are given
//! back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesOrdered, StreamExt};
use tareas_common::protocol::{ErrorCode, Reply, Request};
use tareas_common::task::TaskKey;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::framing::{Frame, Framer};
use crate::intake::{Handled, Shared};
use crate::router::{result_queue, Budget, ConnectionId, Pushed, ResultSender};
use crate::transport::{Reader, Writer};

/// Room made for one read.
const READ_CHUNK: usize = 8 * 1024;

/// What one request in progress holds beyond its bytes (its handler's
/// state, the task message), as counted against the shared pool; measured
/// with `std::mem::size_of_val` on the submission future and rounded up.
const REQUEST_OVERHEAD: usize = 4 * 1024;

/// How long a closing connection keeps reading (and discarding) what the
/// client still sends, so that its error line is not lost to a reset.
const LINGER: Duration = Duration::from_secs(1);

type Pending = Pin<Box<dyn Future<Output = Handled> + Send>>;

/// Serves `stream` until the client leaves, misbehaves, idles out, or
/// `shutdown` fires (then in-progress requests still get their replies).
pub async fn serve(
    (reader, writer): (Reader, Writer),
    id: ConnectionId,
    peer: std::net::SocketAddr,
    shared: Arc<Shared>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut client = Client::new(id, shared, limits, reader, writer);
    // The client's identity for its quota until a token names it: its
    // address (no port: one client, many connections).
    client.address = peer.ip().to_string().into();
    client.peer = client.address.clone();
    let outcome = client.run(&shutdown).await;
    client.close().await;
    outcome
}

/// One client's state between two events. It keeps the ordering rules:
/// replies go out in request order, and a task's result never before its ack.
struct Client {
    /// This connection, as the router knows it.
    id: ConnectionId,
    /// Who is connected, as the quota counts it: the client its token
    /// names, else its address.
    peer: Arc<str>,
    /// Whose task ids it names: the client its token names, else the
    /// scope all anonymous clients share.
    scope: Arc<str>,
    /// Its address (no port), for the delays of failed authentications.
    address: Arc<str>,
    /// What every connection shares: database, broker, router.
    shared: Arc<Shared>,
    limits: Limits,
    reader: Reader,
    /// Bytes read and not framed yet; empty (no allocation) between messages.
    buffer: BytesMut,
    framer: Framer,
    /// Unbuffered: each line is written whole and at once, and an idle
    /// connection holds no write buffer.
    writer: Writer,
    /// Given to the router with each subscription; results arrive on `results`.
    results_tx: ResultSender,
    results: mpsc::UnboundedReceiver<Pushed>,
    /// The bytes of results queued for this client, within its limit.
    budget: Arc<Budget>,
    /// Acked tasks whose result this connection waits for.
    subscribed: HashSet<TaskKey>,
    /// Task requests whose ack is not written yet, and results that beat their ack.
    unacked: HashMap<TaskKey, Unacked>,
    /// Requests in progress; they finish in any order, replies leave in order.
    pending: FuturesOrdered<Pending>,
    /// What each request in `pending` holds, in the same order.
    pending_bytes: VecDeque<usize>,
    /// Bytes taken from the shared pool: read buffer and requests in progress.
    held: usize,
    /// The shared pool had no room for a read: wait until it has.
    starved: bool,
    /// Still taking requests: false after end of stream, a too-large
    /// message, or shutdown.
    reading: bool,
    /// When a silent connection with nothing outstanding is closed.
    idle_deadline: Instant,
    /// When the message being received must be complete.
    message_deadline: Option<Instant>,
    /// The connection ends on an error reply: linger for the client to read it.
    closing_on_error: bool,
    /// It may send requests: it presented a token, or none is required.
    authenticated: bool,
    /// When a connection that has not authenticated is closed.
    auth_deadline: Option<Instant>,
}

/// What woke the connection up.
enum Event {
    /// A request finished: write its replies.
    Handled(Handled),
    /// A result for one of this connection's tasks.
    Result(Pushed),
    /// Bytes can be read (or the stream ended, or failed).
    Readable(std::io::Result<()>),
    /// The shared pool has room again.
    Freed,
    /// A result did not fit in the output budget.
    Overflow,
    IdleTimeout,
    MessageTimeout,
    AuthTimeout,
    Shutdown,
}

impl Client {
    fn new(
        id: ConnectionId,
        shared: Arc<Shared>,
        limits: Limits,
        reader: Reader,
        writer: Writer,
    ) -> Client {
        let (results_tx, results, budget) =
            result_queue(limits.max_output_bytes, shared.memory.clone());
        let required = shared.tokens.required();
        Client {
            id,
            peer: "unknown".into(),
            scope: crate::auth::ANONYMOUS.into(),
            address: "unknown".into(),
            shared,
            reader,
            buffer: BytesMut::new(),
            framer: Framer::new(limits.max_message_bytes),
            writer,
            results_tx,
            results,
            budget,
            subscribed: HashSet::new(),
            unacked: HashMap::new(),
            pending: FuturesOrdered::new(),
            pending_bytes: VecDeque::new(),
            held: 0,
            starved: false,
            reading: true,
            idle_deadline: Instant::now() + secs(limits.idle_timeout_secs),
            message_deadline: None,
            closing_on_error: false,
            authenticated: !required,
            auth_deadline: required.then(|| Instant::now() + secs(limits.auth_timeout_secs)),
            limits,
        }
    }

    /// Handles events until there is nothing left to read or to answer.
    async fn run(&mut self, shutdown: &CancellationToken) -> std::io::Result<()> {
        loop {
            self.start_buffered()?;
            if !self.reading && self.pending.is_empty() {
                return Ok(());
            }
            let event = self.next_event(shutdown).await;
            let written = match event {
                Event::Handled(handled) => {
                    self.pending_bytes.pop_front();
                    self.write_handled(handled).await
                }
                Event::Result(pushed) => self.push_result(pushed).await,
                Event::Readable(ready) => self.read(ready),
                Event::Freed => {
                    self.starved = false;
                    Ok(())
                }
                Event::Overflow => {
                    let message = "results waited for this connection past its output limit \
                                   (TAREAS_MAX_CONNECTION_OUTPUT_BYTES); read your replies; \
                                   fetch the missing results with `status`";
                    return self.close_with(ErrorCode::SlowConsumer, message).await;
                }
                Event::IdleTimeout => {
                    let message = format!(
                        "no request for {}s; the connection is closed, reconnect to continue",
                        self.limits.idle_timeout_secs
                    );
                    return self.close_with(ErrorCode::IdleTimeout, &message).await;
                }
                Event::MessageTimeout => {
                    let message = format!(
                        "a message took over {}s to arrive (TAREAS_MESSAGE_TIMEOUT_SECS); the connection is closed",
                        self.limits.message_timeout_secs
                    );
                    return self.close_with(ErrorCode::RequestTimeout, &message).await;
                }
                Event::AuthTimeout => {
                    let message = format!(
                        "no token within {}s: send {{\"type\":\"auth\",\"token\":…}} first",
                        self.limits.auth_timeout_secs
                    );
                    return self.close_with(ErrorCode::Unauthenticated, &message).await;
                }
                Event::Shutdown => {
                    self.reading = false;
                    Ok(())
                }
            };
            self.settle_memory();
            match written {
                Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                    let message = "a write to this connection did not finish within \
                                   TAREAS_WRITE_TIMEOUT_SECS; read your replies; fetch the \
                                   missing results with `status`";
                    return self.close_with(ErrorCode::SlowConsumer, message).await;
                }
                written => written?,
            }
        }
    }

    async fn next_event(&mut self, shutdown: &CancellationToken) -> Event {
        // Read only with room for more: backpressure, not buffering.
        let read = self.reading && self.has_room() && !self.starved;
        let idle = self.reading && self.pending.is_empty() && self.subscribed.is_empty();
        if !self.has_room() {
            // Not reading (requests in progress): the message cannot arrive
            // meanwhile, so its time starts again when reading does. A
            // connection starved of memory gets no such grace: it holds
            // bytes others may need.
            if let Some(deadline) = self.message_deadline.as_mut() {
                let renewed = Instant::now() + secs(self.limits.message_timeout_secs);
                *deadline = (*deadline).max(renewed);
            }
        }
        let message_deadline = self.message_deadline;
        let (budget, memory) = (self.budget.clone(), self.shared.memory.clone());
        tokio::select! {
            Some(handled) = self.pending.next(), if !self.pending.is_empty() => Event::Handled(handled),
            Some(pushed) = self.results.recv() => Event::Result(pushed),
            ready = self.reader.readable(), if read => Event::Readable(ready),
            () = memory.freed(READ_CHUNK), if self.reading && self.starved => Event::Freed,
            () = budget.overflowed() => Event::Overflow,
            () = sleep_until(self.idle_deadline), if idle => Event::IdleTimeout,
            () = sleep_until(message_deadline.unwrap_or_else(Instant::now)),
                if self.reading && self.has_room() && message_deadline.is_some() => Event::MessageTimeout,
            () = sleep_until(self.auth_deadline.unwrap_or_else(Instant::now)),
                if self.reading && self.auth_deadline.is_some() => Event::AuthTimeout,
            () = shutdown.cancelled(), if self.reading => Event::Shutdown,
        }
    }

    /// Reads what is there and starts the requests it completes. Only bytes
    /// of a message count as activity: whitespace keeps nobody alive.
    fn read(&mut self, ready: std::io::Result<()>) -> std::io::Result<()> {
        ready?;
        if self.buffer.capacity() - self.buffer.len() < READ_CHUNK / 2 {
            if !self.shared.memory.take(READ_CHUNK, self.held) {
                self.starved = true;
                return Ok(());
            }
            self.held += READ_CHUNK;
            self.buffer.reserve(READ_CHUNK);
        }
        let read = match self.reader.try_read_buf(&mut self.buffer) {
            Ok(read) => read,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(err) => return Err(err),
        };
        if read == 0 {
            self.reading = false;
            if let Some(frame) = self.framer.decode_eof(&mut self.buffer)? {
                self.start(frame);
            }
            return Ok(());
        }
        let started = self.start_buffered()?;
        let now = Instant::now();
        let in_message = self.framer.pending_len(&self.buffer) > 0;
        if started > 0 || in_message {
            self.idle_deadline = now + secs(self.limits.idle_timeout_secs);
        }
        self.message_deadline = match (in_message, started, self.message_deadline) {
            (false, _, _) => None,
            (true, 0, Some(deadline)) => Some(deadline),
            (true, _, _) => Some(now + secs(self.limits.message_timeout_secs)),
        };
        Ok(())
    }

    /// Starts the requests already read, while there is room; returns how many.
    fn start_buffered(&mut self) -> std::io::Result<usize> {
        let mut started = 0;
        while self.reading && self.has_room() {
            match self.framer.decode(&mut self.buffer)? {
                Some(frame) => {
                    self.start(frame);
                    started += 1;
                }
                None => break,
            }
        }
        if self.buffer.is_empty() && self.buffer.capacity() > 0 {
            // Between messages a connection holds no read buffer.
            self.buffer = BytesMut::new();
        }
        Ok(started)
    }

    /// Brings the bytes taken from the shared pool in line with what this
    /// connection holds: its read buffer and its requests in progress.
    fn settle_memory(&mut self) {
        let holds = self.buffer.capacity() + self.pending_bytes.iter().sum::<usize>();
        if holds > self.held {
            self.shared.memory.charge(holds - self.held);
        } else {
            self.shared.memory.release(self.held - holds);
        }
        self.held = holds;
    }

    /// Few enough requests in progress, and few enough tasks waiting for
    /// their results.
    fn has_room(&self) -> bool {
        self.pending.len() < self.limits.max_in_flight
            && self.subscribed.len() + self.unacked.len() < self.limits.max_waiting_results
    }

    /// Starts handling one frame; its replies are written when it is done.
    fn start(&mut self, frame: Frame) {
        // A request in progress holds its parsed form and its handler's
        // state besides its bytes.
        let bytes = match &frame {
            Frame::Object(bytes) => REQUEST_OVERHEAD + 2 * bytes.len(),
            _ => 0,
        };
        self.pending_bytes.push_back(bytes);
        let handling = match frame {
            Frame::Object(bytes) if !self.authenticated => self.authenticate(&bytes),
            Frame::Object(bytes) => start_request(
                &bytes,
                (self.id, &self.peer, &self.scope),
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
                self.closing_on_error = true;
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

    /// Checks a token: on success the connection acts as its client (for
    /// its quota, and its tasks); on failure, after a delay that grows with
    /// the failures from its address, `unauthenticated` and close.
    fn authenticate(&mut self, bytes: &[u8]) -> Pending {
        let token = match Request::parse(bytes) {
            Ok(Request::Auth { token }) => Some(token),
            _ => None,
        };
        let tokens = &self.shared.tokens;
        if let Some(client) = token.as_deref().and_then(|token| tokens.verify(token)) {
            self.authenticated = true;
            self.auth_deadline = None;
            self.peer = client.into();
            self.scope = self.peer.clone();
            return ready(Reply::Auth {
                ok: true,
                client: client.to_owned(),
            });
        }
        let (delay, message) = match token {
            Some(_) => (tokens.failed(&self.address), "wrong token; the connection is closed"),
            None => (
                Duration::ZERO,
                "authenticate first: send {\"type\":\"auth\",\"token\":…} (the connection is closed)",
            ),
        };
        tracing::info!("refusing an unauthenticated client");
        self.reading = false;
        self.closing_on_error = true;
        let reply = Reply::error(ErrorCode::Unauthenticated, message, None);
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            Handled::reply(reply)
        })
    }

    /// A result arrived: held until its task's ack is written, else pushed.
    async fn push_result(&mut self, pushed: Pushed) -> std::io::Result<()> {
        if let Some(unacked) = self.unacked.get_mut(&pushed.task_id) {
            if let Some(replaced) = unacked.early.replace(pushed.line) {
                self.budget.release(replaced.len());
            }
            return Ok(());
        }
        self.subscribed.remove(&pushed.task_id);
        if self.subscribed.capacity() > 1024
            && self.subscribed.len() < self.subscribed.capacity() / 4
        {
            self.subscribed.shrink_to(self.subscribed.len() * 2);
        }
        self.write_result(&pushed.line).await
    }

    /// Writes a request's replies, then any result that arrived before its ack.
    async fn write_handled(&mut self, handled: Handled) -> std::io::Result<()> {
        for reply in &handled.replies {
            self.write(&reply.to_line()).await?;
        }
        // Settle the bookkeeping of the submission this request was (only
        // that one: another request may name the same id in its error).
        let Some(task_id) = handled.settles else {
            return Ok(());
        };
        // A result that came early waits for the last ack of its id on
        // this connection (the same id may be pipelined twice).
        let early = match self.unacked.get_mut(&task_id) {
            Some(unacked) if unacked.submissions > 1 => {
                unacked.submissions -= 1;
                None
            }
            Some(_) => self.unacked.remove(&task_id).and_then(|u| u.early),
            None => None,
        };
        if handled.subscribed.is_some() {
            self.subscribed.insert(task_id.clone());
        }
        match early {
            Some(line) if self.subscribed.remove(&task_id) => self.write_result(&line).await?,
            // Not waited for (refused, or its stored result went out with
            // the ack): the early line is dropped, its bytes given back.
            Some(line) => self.budget.release(line.len()),
            None => {}
        }
        Ok(())
    }

    /// Writes a queued result and gives its bytes back to the budget.
    async fn write_result(&mut self, line: &Bytes) -> std::io::Result<()> {
        let written = self.write(line).await;
        self.budget.release(line.len());
        written
    }

    /// Writes one line within the write deadline: a client that does not
    /// read is a slow consumer, and holds nothing longer than that.
    async fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        let limit = secs(self.limits.write_timeout_secs);
        let writing = async {
            self.writer.write_all(line).await?;
            self.writer.flush().await
        };
        match tokio::time::timeout(limit, writing).await {
            Ok(written) => written,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "slow consumer: a write did not finish within TAREAS_WRITE_TIMEOUT_SECS",
            )),
        }
    }

    /// Tells the client why the connection ends, where it can still be
    /// written (a short deadline: the client may not be reading at all).
    async fn close_with(&mut self, code: ErrorCode, message: &str) -> std::io::Result<()> {
        tracing::info!(
            code = code.as_str(),
            "closing the connection after an error reply"
        );
        self.reading = false;
        self.closing_on_error = true;
        let line = Reply::error(code, message.to_owned(), None).to_line();
        let _ = tokio::time::timeout(LINGER, async {
            self.writer.write_all(&line).await?;
            self.writer.flush().await
        })
        .await;
        Ok(())
    }

    /// Leaves the router and closes; after an error reply, lingers a moment
    /// reading what the client still sends, so the reply is not lost to a reset.
    async fn close(mut self) {
        if !self.pending.is_empty() {
            // Requests under way (a submission between its record and its
            // publish) finish even though nobody reads their replies: a
            // half-done submission would leave a `queued` row behind.
            let pending = std::mem::take(&mut self.pending);
            tokio::spawn(pending.for_each(|_| async {}));
        }
        for task_id in self.subscribed.iter().chain(self.unacked.keys()) {
            self.shared.router.unsubscribe(task_id, self.id);
        }
        self.shared.memory.release(std::mem::take(&mut self.held));
        let _ = tokio::time::timeout(LINGER, self.writer.shutdown()).await;
        if self.closing_on_error {
            let mut sink = [0u8; 4096];
            let until = Instant::now() + LINGER;
            while let Ok(Ok(read)) =
                tokio::time::timeout_at(until, self.reader.read(&mut sink)).await
            {
                if read == 0 {
                    break;
                }
            }
        }
    }
}

fn secs(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

/// Submissions of one task id whose ack is not written yet, and a result
/// that beat their last ack.
#[derive(Default)]
struct Unacked {
    submissions: u32,
    early: Option<Bytes>,
}

/// Parses one frame and starts handling it.
fn start_request(
    bytes: &[u8],
    (id, peer, scope): (ConnectionId, &Arc<str>, &Arc<str>),
    shared: &Arc<Shared>,
    results: &ResultSender,
    unacked: &mut HashMap<TaskKey, Unacked>,
) -> Pending {
    let request = match Request::parse(bytes) {
        Ok(request) => request,
        Err(err) => return ready(err.into_reply()),
    };
    match request {
        Request::Ping => ready(Reply::Pong),
        // Already authenticated (or no tokens are configured): the token
        // must name the client this connection acts as.
        Request::Auth { token } => {
            let client = if shared.tokens.required() {
                shared.tokens.verify(&token).filter(|name| **name == **peer)
            } else {
                Some(crate::auth::ANONYMOUS)
            };
            ready(match client {
                Some(client) => Reply::Auth {
                    ok: true,
                    client: client.to_owned(),
                },
                None => Reply::error(
                    ErrorCode::Unauthenticated,
                    "that token does not name this connection's client; open a new connection to act as another",
                    None,
                ),
            })
        }
        Request::Health => {
            let shared = shared.clone();
            Box::pin(async move { Handled::reply(shared.health().await) })
        }
        Request::Status { task_id } => {
            let shared = shared.clone();
            let scope = scope.clone();
            Box::pin(async move { Handled::reply(shared.status(&scope, task_id).await) })
        }
        Request::Task(task) => match shared.prepare(task, scope) {
            Err(err) => ready(err.into_reply()),
            Ok(task) => {
                unacked.entry(task.task_id.clone()).or_default().submissions += 1;
                let (shared, results, peer) = (shared.clone(), results.clone(), peer.clone());
                Box::pin(async move { shared.submit(task, id, &peer, &results).await })
            }
        },
    }
}

fn ready(reply: Reply) -> Pending {
    Box::pin(std::future::ready(Handled::reply(reply)))
}
