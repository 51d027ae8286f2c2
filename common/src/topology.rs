//! Queue and exchange names, and their declarations. Every process declares
//! the same topology with the same arguments (declaring is idempotent), so
//! whichever starts first creates it.
//!
//! Every quorum queue is created with `TAREAS_QUORUM_SIZE` replicas
//! (`x-quorum-initial-group-size`, default 3; a smaller cluster gets all
//! its nodes), so it survives the loss of a minority of them. A queue that
//! already exists with another (or no) group size or maximum length is
//! used with its own; any other difference is an error.
//!
//! - `<queue>` (default `tareas`): a durable quorum queue with a delivery
//!   limit; messages that exceed it, or that a worker rejects, are
//!   dead-lettered. It holds at most `TAREAS_QUEUE_MAX_LENGTH` messages
//!   (`x-max-length`, `x-overflow: reject-publish`: a publish past it is
//!   nacked, never dropped silently).
//! - `<queue>.dlx`: a durable fanout exchange, the dead-letter exchange.
//! - `<queue>.dlq`: a durable quorum queue bound to it.
//! - `<queue>.retry.<ms>`: durable quorum queues, declared on first use, one
//!   per retry delay. Nobody consumes them: a message waits there for its
//!   TTL, then is dead-lettered back to `<queue>` through the default
//!   exchange. This is how retries wait in the broker, not in worker memory.
//! - `<queue>.reply.<instance>`: one per distribuidor process, the
//!   `reply_to` of the tasks it accepted: an exclusive queue of its
//!   connection, on the node it is connected to. RabbitMQ deletes it with
//!   the connection (or with its node); the distribuidor declares it again,
//!   with the same name, on whichever node it reconnects to, so results of
//!   tasks queued before still find it. Results sent while it was gone are
//!   found in PostgreSQL (the distribuidor's recovery sweep).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

/// How many times RabbitMQ delivers a message that was handed back
/// (worker crash, nack with requeue) before dead-lettering it.
pub const DELIVERY_LIMIT: i64 = 20;

/// The names of one Tareas deployment's queues.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The work queue, `tareas` unless configured otherwise.
    pub queue: String,
    /// Most messages the work queue holds (`x-max-length`), if bounded.
    pub max_length: Option<u64>,
    /// Replicas of each quorum queue (`x-quorum-initial-group-size`).
    pub quorum_size: u16,
}

pub use crate::config::DEFAULT_QUORUM_SIZE;

impl Topology {
    /// The topology of work queue `queue`, unbounded.
    pub fn new(queue: impl Into<String>) -> Topology {
        Topology {
            queue: queue.into(),
            max_length: None,
            quorum_size: DEFAULT_QUORUM_SIZE,
        }
    }

    /// The topology that `broker` configures (queue name, maximum length,
    /// replicas).
    /// Every process of a deployment must agree on it: RabbitMQ refuses to
    /// declare a queue again with other arguments.
    pub fn from_args(broker: &crate::config::BrokerArgs) -> Topology {
        Topology {
            queue: broker.queue.clone(),
            max_length: (broker.queue_max_length > 0).then_some(broker.queue_max_length),
            quorum_size: broker.quorum_size,
        }
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    /// Declares the work queue, the dead-letter exchange and the dead-letter
    /// queue, on channels of their own on `connection`.
    pub async fn declare(&self, connection: &Connection) -> Result<(), lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                self.dead_letter_exchange().as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let dead_letters = self.dead_letter_queue();
        declare_or_keep(connection, &dead_letters, self.quorum_arguments()).await?;
        channel
            .queue_bind(
                dead_letters.as_str().into(),
                self.dead_letter_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "declared".into()).await;
        declare_or_keep(connection, &self.queue, self.work_arguments()).await
    }

    /// The arguments of a quorum queue of this deployment.
    fn quorum_arguments(&self) -> FieldTable {
        quorum_arguments(self.quorum_size)
    }

    /// The work queue's arguments.
    fn work_arguments(&self) -> FieldTable {
        let mut arguments = self.quorum_arguments();
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.dead_letter_exchange().as_str())),
        );
        if let Some(max) = self.max_length {
            arguments.insert(
                "x-max-length".into(),
                AMQPValue::LongLongInt(i64::try_from(max).unwrap_or(i64::MAX)),
            );
            arguments.insert(
                "x-overflow".into(),
                AMQPValue::LongString(LongString::from("reject-publish")),
            );
        }
        arguments
    }
}

impl Topology {
    /// The retry queue for messages that wait `delay_ms` before their next attempt.
    pub fn retry_queue(&self, delay_ms: u64) -> String {
        format!("{}.retry.{delay_ms}", self.queue)
    }

    /// Declares the retry queue for `delay_ms` (an existing one keeps its
    /// arguments);
    /// returns its name.
    pub async fn declare_retry_queue(
        &self,
        connection: &Connection,
        delay_ms: u64,
    ) -> Result<String, lapin::Error> {
        let name = self.retry_queue(delay_ms);
        let mut arguments = self.quorum_arguments();
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(delay_ms).unwrap_or(i64::MAX)),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(self.queue.as_str())),
        );
        arguments.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString(LongString::from("at-least-once")),
        );
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
        declare_or_keep(connection, &name, arguments).await?;
        Ok(name)
    }
}

impl Topology {
    /// The reply queue of the distribuidor process `instance`.
    pub fn reply_queue(&self, instance: &str) -> String {
        format!("{}.reply.{instance}", self.queue)
    }

    /// Declares the reply queue of `instance`, exclusive to the connection
    /// of `channel`; returns its name. While RabbitMQ still holds the queue
    /// of an earlier connection it does not know is gone, this fails
    /// (`RESOURCE_LOCKED`) and is to be retried.
    pub async fn declare_reply_queue(
        &self,
        channel: &Channel,
        instance: &str,
    ) -> Result<String, lapin::Error> {
        let name = self.reply_queue(instance);
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(name.as_str().into(), exclusive, FieldTable::default())
            .await?;
        Ok(name)
    }
}

/// Arguments an existing queue may differ in from this version's: it is
/// used with its own values. The group size only matters at creation (a
/// queue of an older version has none); the maximum length can be set by a
/// policy instead.
const KEPT: [&str; 3] = ["x-quorum-initial-group-size", "x-max-length", "x-overflow"];

/// Declares durable queue `name` with `arguments`, each attempt on a
/// channel of its own on `connection`. RabbitMQ cannot change the arguments
/// of a queue that exists and refuses a declare naming the first argument
/// it finds different. When that is one of [`KEPT`], the declare is made
/// again with the queue's own value of it, so every other argument is still
/// compared: another queue type, durability or delivery limit is an error.
async fn declare_or_keep(
    connection: &Connection,
    name: &str,
    mut arguments: FieldTable,
) -> Result<(), lapin::Error> {
    let mut kept: Vec<String> = Vec::new();
    loop {
        let channel = connection.create_channel().await?;
        let err = match declare_durable(&channel, name, arguments.clone()).await {
            Ok(()) => {
                let _ = channel.close(200, "declared".into()).await;
                return Ok(());
            }
            // The refusal closed the channel.
            Err(err) => err,
        };
        let Some(found) = crate::amqp::inequivalent(&err) else {
            return Err(err);
        };
        if !KEPT.contains(&found.arg.as_str()) || kept.contains(&found.arg) {
            return Err(err);
        }
        log_kept(name, &found, &err);
        let mut table = arguments.inner().clone();
        match found.current {
            Some(value) => table.insert(found.arg.as_str().into(), value),
            None => table.remove(found.arg.as_str()),
        };
        arguments = FieldTable::from(table);
        kept.push(found.arg);
    }
}

/// Says that queue `name` keeps its own value of an argument.
fn log_kept(name: &str, found: &crate::amqp::Inequivalent, err: &lapin::Error) {
    if found.arg == "x-quorum-initial-group-size" && found.current.is_none() {
        tracing::debug!(
            queue = name,
            "a queue of an older version keeps the replicas it was created with"
        );
        return;
    }
    tracing::warn!(
        queue = name,
        cause = %err,
        "the queue keeps the value it was created with (RabbitMQ cannot change it); see \"Changing a queue's arguments\" in docs/operations.md"
    );
}

async fn declare_durable(
    channel: &Channel,
    name: &str,
    arguments: FieldTable,
) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), durable, arguments)
        .await?;
    Ok(())
}

/// The arguments of a durable quorum queue (replicated, at-least-once)
/// with `replicas` members, or all the cluster's nodes if it has fewer.
pub fn quorum_arguments(replicas: u16) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments.insert(
        "x-quorum-initial-group-size".into(),
        AMQPValue::LongInt(i32::from(replicas)),
    );
    arguments
}
