//! Queue and exchange names, and their declarations. Every process declares
//! the same topology with the same arguments (declaring is idempotent), so
//! whichever starts first creates it.
//!
//! - `<queue>` (default `tareas`): a durable quorum queue with a delivery
//!   limit; messages that exceed it, or that a worker rejects, are
//!   dead-lettered.
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
use lapin::{Channel, ExchangeKind};

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
}

impl Topology {
    pub fn new(queue: impl Into<String>) -> Topology {
        Topology {
            queue: queue.into(),
        }
    }

    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.queue)
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }

    /// Declares the work queue, the dead-letter exchange and the dead-letter
    /// queue on `channel`.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
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
        declare_durable(channel, &self.dead_letter_queue(), quorum_arguments()).await?;
        channel
            .queue_bind(
                self.dead_letter_queue().as_str().into(),
                self.dead_letter_exchange().as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut arguments = quorum_arguments();
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from(self.dead_letter_exchange().as_str())),
        );
        declare_durable(channel, &self.queue, arguments).await
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
