//! Queue and exchange names, and their declarations. Every process declares
//! the same topology with the same arguments (declaring is idempotent), so
//! whichever starts first creates it.
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
//! - `<queue>.reply.<instance>`: one per distribuidor process, durable, the
//!   `reply_to` of the tasks it accepted. Its name stays the same across
//!   reconnects and RabbitMQ restarts, so results of tasks queued before
//!   still find it; RabbitMQ deletes it once unused for 10 minutes.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, Connection, ExchangeKind};

/// How many times RabbitMQ delivers a message that was handed back
/// (worker crash, nack with requeue) before dead-lettering it.
pub const DELIVERY_LIMIT: i64 = 20;

/// A reply queue unused this long (its distribuidor is gone) is deleted.
pub const REPLY_QUEUE_EXPIRES_MS: i64 = 10 * 60 * 1000;

/// The names of one Tareas deployment's queues.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The work queue, `tareas` unless configured otherwise.
    pub queue: String,
    /// Most messages the work queue holds (`x-max-length`), if bounded.
    pub max_length: Option<u64>,
}

impl Topology {
    /// The topology of work queue `queue`, unbounded.
    pub fn new(queue: impl Into<String>) -> Topology {
        Topology {
            queue: queue.into(),
            max_length: None,
        }
    }

    /// The topology that `broker` configures (queue name and maximum length).
    /// Every process of a deployment must agree on it: RabbitMQ refuses to
    /// declare a queue again with other arguments.
    pub fn from_args(broker: &crate::config::BrokerArgs) -> Topology {
        Topology {
            queue: broker.queue.clone(),
            max_length: (broker.queue_max_length > 0).then_some(broker.queue_max_length),
        }
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    /// Declares the work queue, the dead-letter exchange and the dead-letter
    /// queue, on channels of its own on `connection`.
    ///
    /// A work queue created before `TAREAS_QUEUE_MAX_LENGTH` existed keeps
    /// its arguments (RabbitMQ refuses to change them): that is logged, with
    /// the policy that bounds it, and the queue is used as it is.
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
        declare_durable(&channel, &self.dead_letter_queue(), quorum_arguments()).await?;
        channel
            .queue_bind(
                self.dead_letter_queue().as_str().into(),
                self.dead_letter_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let declared = declare_durable(&channel, &self.queue, self.work_arguments(true)).await;
        match declared {
            Err(err)
                if self.max_length.is_some() && err.to_string().contains("inequivalent arg") =>
            {
                tracing::warn!(
                    queue = %self.queue,
                    "the work queue exists with other arguments (no or another maximum length) and keeps them; bound it with a policy: \
                     rabbitmqctl set_policy --apply-to queues tareas-max-length '^{}$' '{{\"max-length\":{},\"overflow\":\"reject-publish\"}}'",
                    self.queue,
                    self.max_length.unwrap_or_default()
                );
                // It exists (with other arguments): use it as it is.
                let channel = connection.create_channel().await?;
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                };
                channel
                    .queue_declare(self.queue.as_str().into(), passive, FieldTable::default())
                    .await?;
                let _ = channel.close(200, "declared".into()).await;
            }
            declared => {
                declared?;
                let _ = channel.close(200, "declared".into()).await;
            }
        }
        Ok(())
    }

    /// The work queue's arguments, with its maximum length when `bounded`.
    fn work_arguments(&self, bounded: bool) -> FieldTable {
        let mut arguments = quorum_arguments();
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.dead_letter_exchange().as_str())),
        );
        if let (true, Some(max)) = (bounded, self.max_length) {
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

    /// Declares the retry queue for `delay_ms`; returns its name.
    pub async fn declare_retry_queue(
        &self,
        channel: &Channel,
        delay_ms: u64,
    ) -> Result<String, lapin::Error> {
        let name = self.retry_queue(delay_ms);
        let mut arguments = quorum_arguments();
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
        declare_durable(channel, &name, arguments).await?;
        Ok(name)
    }
}

impl Topology {
    /// The reply queue of the distribuidor process `instance`.
    pub fn reply_queue(&self, instance: &str) -> String {
        format!("{}.reply.{instance}", self.queue)
    }

    /// Declares the reply queue of `instance`; returns its name.
    pub async fn declare_reply_queue(
        &self,
        channel: &Channel,
        instance: &str,
    ) -> Result<String, lapin::Error> {
        let name = self.reply_queue(instance);
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(REPLY_QUEUE_EXPIRES_MS),
        );
        declare_durable(channel, &name, arguments).await?;
        Ok(name)
    }
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

/// The arguments of a durable quorum queue (replicated, at-least-once).
pub fn quorum_arguments() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    arguments
}
