//! The distribuidor's link to RabbitMQ: one connection, kept up by a
//! supervisor task that reconnects with backoff. It carries two channels:
//! one in confirm mode for publishing tasks, and one consuming this
//! instance's reply queue, whose results go to the [`Router`]. The reply
//! queue is exclusive to the connection, so it goes with it (or with its
//! node); each reconnect declares it again with the same name, on the node
//! it reached (`AMQP_URL` may name a cluster's nodes), so results of tasks
//! accepted before still arrive. Results that were published while it was
//! gone are found in PostgreSQL by [`crate::recovery`]. RabbitMQ may still
//! hold the old queue for a connection it has not seen go (on 4.2+, a node
//! that is down keeps its exclusive queues until it returns): then this
//! connection's reply queue gets a name of its own, and the recovery looks
//! up the tasks whose results went to the old name until they finished.
//!
//! While the link is down, [`Broker::publish`] fails at once, so the client
//! gets `unavailable` instead of a false ack.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tareas_common::amqp::{self, AMQPSoftError, Envelope, PublishError};
use tareas_common::task::{TaskMessage, TaskReport};
use tareas_common::topology::Topology;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::router::Router;

/// How long connecting and declaring everything may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long closing may take at shutdown, all steps together: after the
/// 30 s drain this still ends within compose's 40 s `stop_grace_period`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the link holds while it is up.
#[derive(Clone)]
struct Session {
    /// Publishing channel, in confirm mode.
    channel: Channel,
    /// This instance's reply queue; workers send results there.
    reply_queue: String,
}

/// A handle to the link; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    /// The current session, `None` while disconnected.
    session: watch::Receiver<Option<Session>>,
    /// How many times the link has come up.
    connects: watch::Receiver<u64>,
    /// How many times a connect gave the reply queue another name than the
    /// connect before; counted before that connect is.
    renames: Arc<AtomicU64>,
    /// Queue names.
    topology: Arc<Topology>,
}

impl Broker {
    /// Starts the supervisor. The link comes up in the background; until it
    /// does, publishes fail with [`PublishError::Disconnected`]. The handle
    /// ends once `shutdown` closed the link.
    pub fn start(
        amqp_url: String,
        topology: Topology,
        router: Arc<Router>,
        instance: String,
        shutdown: CancellationToken,
    ) -> (Broker, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(None);
        let (connects_tx, connects) = watch::channel(0);
        let topology = Arc::new(topology);
        let renames = Arc::new(AtomicU64::new(0));
        let link = Link {
            amqp_url,
            topology: topology.clone(),
            instance,
            renames: renames.clone(),
        };
        let supervisor = tokio::spawn(supervise(link, router, tx, connects_tx, shutdown));
        let broker = Broker {
            session: rx,
            connects,
            renames,
            topology,
        };
        (broker, supervisor)
    }

    /// Counts the times the link came up: `changed()` fires on each (re)connect.
    pub fn connects(&self) -> watch::Receiver<u64> {
        self.connects.clone()
    }

    /// How many times the reply queue changed its name on a reconnect.
    pub fn renames(&self) -> u64 {
        self.renames.load(Ordering::SeqCst)
    }

    /// The reply queue of the link, while it is up.
    pub fn reply_queue(&self) -> Option<String> {
        self.session
            .borrow()
            .as_ref()
            .map(|s| s.reply_queue.clone())
    }

    /// Whether the link is up right now.
    pub fn is_connected(&self) -> bool {
        self.session.borrow().is_some()
    }

    /// Waits until the link is up (for tests and start-up logs).
    pub async fn wait_connected(&self) {
        let mut session = self.session.clone();
        let _ = session.wait_for(Option::is_some).await;
    }

    /// Publishes `task` to the work queue by the one rule
    /// ([`amqp::publish_persistent`]); its result is to come back to this
    /// instance's reply queue. `Ok` means the task is durably queued.
    pub async fn publish(&self, task: &TaskMessage) -> Result<(), PublishError> {
        let Some(session) = self.session.borrow().clone() else {
            return Err(PublishError::Disconnected);
        };
        let body = serde_json::to_vec(task).expect("a TaskMessage always serializes");
        // One trace per task: the submit span and the worker's delivery
        // span carry its id.
        let span = tracing::Span::current();
        let traceparent = tareas_common::telemetry::traceparent_of(&span);
        if let Some(trace_id) = amqp::trace_id(&traceparent) {
            span.record("trace_id", trace_id);
        }
        let envelope = Envelope::task(
            task.task_id.as_str(),
            Some(session.reply_queue.as_str().into()),
            traceparent,
        );
        amqp::publish_persistent(&session.channel, &self.topology.queue, &body, envelope).await
    }
}

impl Broker {
    /// Messages in the work queue and its dead-letter queue (passive
    /// declares); those it could not count are left out.
    pub async fn depths(&self) -> Vec<(String, u32)> {
        let Some(session) = self.session.borrow().clone() else {
            return Vec::new();
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let mut depths = Vec::new();
        for queue in [
            self.topology.queue.clone(),
            self.topology.dead_letter_queue(),
        ] {
            let declared = session.channel.queue_declare(
                queue.as_str().into(),
                passive,
                FieldTable::default(),
            );
            if let Ok(Ok(declared)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), declared).await
            {
                depths.push((queue, declared.message_count()));
            }
        }
        depths
    }

    /// Whether the work queue holds its maximum length right now (a passive
    /// declare): tells a nack for a full queue from any other.
    pub async fn queue_is_full(&self) -> bool {
        let Some(max) = self.topology.max_length else {
            return false;
        };
        let Some(session) = self.session.borrow().clone() else {
            return false;
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = session.channel.queue_declare(
            self.topology.queue.as_str().into(),
            passive,
            FieldTable::default(),
        );
        match tokio::time::timeout(std::time::Duration::from_secs(2), declared).await {
            Ok(Ok(queue)) => u64::from(queue.message_count()) >= max,
            _ => false,
        }
    }
}

/// Where and who to connect as.
struct Link {
    /// `AMQP_URL`: one node or a cluster's nodes.
    amqp_url: String,
    /// The queues to declare.
    topology: Arc<Topology>,
    /// This process's id, part of its reply queue's name.
    instance: String,
    /// See [`Broker::renames`].
    renames: Arc<AtomicU64>,
}

/// Keeps the link up until shutdown.
async fn supervise(
    link: Link,
    router: Arc<Router>,
    session: watch::Sender<Option<Session>>,
    connects: watch::Sender<u64>,
    shutdown: CancellationToken,
) {
    let topology = &link.topology;
    let mut previous: Option<String> = None;
    loop {
        let Some(Opened {
            connection,
            publish_channel,
            reply_channel,
            consumer,
            reply_queue,
        }) = amqp::open_with_backoff(&link.amqp_url, OPEN_TIMEOUT, &shutdown, || open(&link)).await
        else {
            return;
        };
        tracing::info!(queue = %topology.queue, reply_queue = %reply_queue, "connected to RabbitMQ");
        if previous.as_ref().is_some_and(|name| *name != reply_queue) {
            link.renames.fetch_add(1, Ordering::SeqCst);
        }
        previous = Some(reply_queue.clone());
        session.send_replace(Some(Session {
            channel: publish_channel,
            reply_queue,
        }));
        connects.send_modify(|count| *count += 1);
        let lost = tokio::select! {
            () = shutdown.cancelled() => false,
            () = route_results(consumer, &router) => true,
        };
        let last = session.send_replace(None);
        if !lost {
            close(connection, reply_channel, last).await;
            return;
        }
        tracing::error!(
            "lost the RabbitMQ connection; new tasks get `unavailable` until it is back"
        );
        // Closed before reopening (if it still answers), so that RabbitMQ
        // lets go of its exclusive reply queue, whose name comes next.
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "reconnecting".into())).await;
    }
}

/// Closes the link at shutdown, within [`CLOSE_TIMEOUT`]: stop consuming,
/// close the channels, then the connection, which deletes the reply queue
/// (its clients are gone: nobody waits for what would arrive).
async fn close(connection: Connection, reply_channel: Channel, last: Option<Session>) {
    const REASON: &str = "distribuidor shutting down";
    let steps = async {
        let _ = reply_channel.close(200, REASON.into()).await;
        if let Some(last) = last {
            // Closed here, not on drop: a channel still closing when the
            // connection closes makes lapin log a connection error.
            let _ = last.channel.close(200, REASON.into()).await;
        }
        let _ = connection.close(200, REASON.into()).await;
    };
    if tokio::time::timeout(CLOSE_TIMEOUT, steps).await.is_err() {
        tracing::warn!("RabbitMQ did not answer while closing; it removes this instance's reply queue when it notices the connection is gone");
    }
}

/// An open link.
struct Opened {
    /// The connection to the node that answered.
    connection: Connection,
    /// In confirm mode.
    publish_channel: Channel,
    /// Consumes `reply_queue`.
    reply_channel: Channel,
    /// The results arriving on `reply_queue`.
    consumer: lapin::Consumer,
    /// This connection's reply queue (see [`declare_reply_queue`]).
    reply_queue: String,
}

async fn open(link: &Link) -> Result<Opened, lapin::Error> {
    let name = format!("distribuidor-{}", link.instance);
    let connection = amqp::connect(&link.amqp_url, &name).await?;
    link.topology.declare(&connection).await?;
    let publish_channel = amqp::confirm_channel(&connection).await?;
    let (reply_channel, reply_queue) = declare_reply_queue(&connection, link).await?;
    let consumer = reply_channel
        .basic_consume(
            reply_queue.as_str().into(),
            "distribuidor-results".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(Opened {
        connection,
        publish_channel,
        reply_channel,
        consumer,
        reply_queue,
    })
}

/// Declares this instance's reply queue on a channel of its own:
/// `<queue>.reply.<instance>`, or, while RabbitMQ still holds that one for
/// an earlier connection (`RESOURCE_LOCKED` for [`BASE_NAME_TRIES`] tries,
/// [`BASE_NAME_PAUSE`] apart), `<queue>.reply.<instance>.<n>` with a new `n`.
async fn declare_reply_queue(
    connection: &Connection,
    link: &Link,
) -> Result<(Channel, String), lapin::Error> {
    let mut tries = 0;
    let held = loop {
        let channel = connection.create_channel().await?;
        let declared = link.topology.declare_reply_queue(&channel, &link.instance);
        match declared.await {
            Ok(name) => return Ok((channel, name)),
            Err(err) if amqp::refused_with(&err, AMQPSoftError::RESOURCELOCKED) => {
                tries += 1;
                if tries == BASE_NAME_TRIES {
                    break err;
                }
                // RabbitMQ deletes the queue of a closed connection soon.
                tokio::time::sleep(BASE_NAME_PAUSE).await;
            }
            Err(err) => return Err(err),
        }
    };
    let channel = connection.create_channel().await?;
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let fresh = format!("{}.{}", link.instance, &suffix[..8]);
    let name = link.topology.declare_reply_queue(&channel, &fresh).await?;
    tracing::warn!(
        reply_queue = %name,
        cause = %held,
        "RabbitMQ still holds this instance's reply queue for an earlier connection; results of tasks accepted before are looked up in PostgreSQL until they finish"
    );
    Ok((channel, name))
}

/// How many times the reply queue's own name is tried before another.
const BASE_NAME_TRIES: u32 = 3;
/// The pause between those tries.
const BASE_NAME_PAUSE: Duration = Duration::from_millis(200);

/// Hands every result on the reply queue to the router; returns when the
/// consumer ends (the connection was lost).
async fn route_results(mut consumer: lapin::Consumer, router: &Router) {
    while let Some(delivery) = consumer.next().await {
        let delivery = match delivery {
            Ok(delivery) => delivery,
            Err(err) => {
                tracing::warn!(cause = %err, "result consumer failed");
                return;
            }
        };
        match serde_json::from_slice::<TaskReport>(&delivery.data) {
            Ok(report) => {
                router.deliver(report);
            }
            Err(err) => tracing::warn!(cause = %err, "ignoring a malformed result message"),
        }
    }
}
