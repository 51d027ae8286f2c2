//! The operator's view of the dead-letter queue (`cliente dlq`, the
//! dashboard's Dead letters page). `list`
//! shows what is there without removing it; `replay` makes chosen tasks
//! runnable again (their `failed` row back to `queued`), publishes them to
//! the work queue with a confirm, and only then removes them from the
//! dead-letter queue.
//!
//! It opens its own short connection to RabbitMQ (AMQP_URL) and uses
//! PostgreSQL directly.

use crate::amqp::{self, Envelope};
use crate::config::{redacted, BrokerArgs};
use crate::db::Db;
use crate::task::{TaskKey, TaskMessage};
use crate::token::ANONYMOUS;
use crate::topology::Topology;
use anyhow::{bail, Context};
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

/// Which dead-lettered tasks to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    One(TaskKey),
    All,
}

/// The task `task_id` of `client` (none: the anonymous scope).
pub fn key(client: Option<&str>, task_id: &str) -> anyhow::Result<TaskKey> {
    let client = client.unwrap_or(ANONYMOUS);
    if client != ANONYMOUS {
        crate::token::check_client_name(client)
            .map_err(|problem| anyhow::anyhow!("--client {client:?}: {problem}"))?;
    }
    Ok(TaskKey::for_client(client, task_id)?)
}

/// One dead-lettered message, as `list` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// `None` when the body is not a task message.
    pub task_id: Option<String>,
    pub task_type: Option<String>,
    /// Why RabbitMQ dead-lettered it (`rejected`, `delivery_limit`, …).
    pub reason: String,
}

async fn open(broker: &BrokerArgs) -> anyhow::Result<(Connection, Channel, Topology)> {
    let connection = amqp::connect(&broker.amqp_url, "cliente-dlq")
        .await
        .with_context(|| {
            format!(
                "cannot reach RabbitMQ at {} (AMQP_URL)",
                redacted(&broker.amqp_url)
            )
        })?;
    let topology = Topology::from_args(broker);
    topology
        .declare(&connection)
        .await
        .context("declaring the queues")?;
    // Confirm mode: a replay is published by the one rule.
    let channel = amqp::confirm_channel(&connection).await?;
    Ok((connection, channel, topology))
}

/// Takes up to `limit` messages off the dead-letter queue without acking:
/// they go back when handed back or the channel closes, unless acked.
async fn fetch(
    channel: &Channel,
    topology: &Topology,
    limit: usize,
) -> anyhow::Result<Vec<BasicGetMessage>> {
    let mut messages = Vec::new();
    while messages.len() < limit {
        let Some(message) = channel
            .basic_get(
                topology.dead_letter_queue().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        messages.push(message);
    }
    Ok(messages)
}

fn describe(message: &BasicGetMessage) -> DeadLetter {
    let task = serde_json::from_slice::<TaskMessage>(&message.delivery.data).ok();
    DeadLetter {
        task_id: task.as_ref().map(|t| t.task_id.to_string()),
        task_type: task.map(|t| t.task_type),
        reason: death_reason(message.delivery.properties.headers().as_ref())
            .unwrap_or_else(|| "unknown".into()),
    }
}

/// The `reason` of the first `x-death` entry RabbitMQ added.
fn death_reason(headers: Option<&FieldTable>) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    match first.inner().get("reason")? {
        AMQPValue::LongString(reason) => Some(reason.to_string()),
        AMQPValue::ShortString(reason) => Some(reason.to_string()),
        _ => None,
    }
}

/// The first `limit` dead-lettered messages (`usize::MAX`: all), left in
/// place. The dashboard shows a bounded page; `cliente dlq list` shows all.
///
/// They are handed back with an explicit `basic.nack` (requeue) rather than
/// by closing the channel: since RabbitMQ 4.3 a nack does not count as a
/// failed delivery, while a channel closed on unacked messages does, and
/// RabbitMQ 4 drops a message of a quorum queue without a dead-letter target
/// after 20 of them (its default delivery limit). Listing must not wear dead
/// letters out.
pub async fn list(broker: &BrokerArgs, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let (connection, channel, topology) = open(broker).await?;
    let messages = fetch(&channel, &topology, limit).await?;
    let listed = messages.iter().map(describe).collect();
    if let Some(last) = messages.last() {
        channel
            .basic_nack(
                last.delivery.delivery_tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await
            .context("handing the dead letters back to RabbitMQ")?;
    }
    let _ = channel.close(200, "listed".into()).await;
    let _ = connection.close(200, "listed".into()).await;
    Ok(listed)
}

/// Replays the selected dead-lettered tasks; returns the replayed ids.
pub async fn replay(
    broker: &BrokerArgs,
    db: &Db,
    selection: &Selection,
) -> anyhow::Result<Vec<String>> {
    let (connection, channel, topology) = open(broker).await?;
    let messages = fetch(&channel, &topology, usize::MAX).await?;
    let mut replayed = Vec::new();
    for message in &messages {
        let Ok(task) = serde_json::from_slice::<TaskMessage>(&message.delivery.data) else {
            continue;
        };
        let chosen = match selection {
            Selection::All => true,
            Selection::One(key) => task.task_id == *key,
        };
        if !chosen {
            continue;
        }
        db.reset_for_replay(task.task_id.as_str())
            .await
            .with_context(|| {
                format!(
                    "cannot reset task {} in PostgreSQL (DATABASE_URL)",
                    task.task_id
                )
            })?;
        let envelope = Envelope::forwarded(task.task_id.as_str(), &message.delivery.properties);
        amqp::publish_persistent(&channel, &topology.queue, &message.delivery.data, envelope)
            .await
            .with_context(|| {
                format!(
                    "RabbitMQ did not take the replay of {}; it stays in the dead-letter queue",
                    task.task_id
                )
            })?;
        channel
            .basic_ack(message.delivery.delivery_tag, BasicAckOptions::default())
            .await?;
        replayed.push(task.task_id.to_string());
    }
    let _ = channel.close(200, "replayed".into()).await;
    let _ = connection.close(200, "replayed".into()).await;
    if let Selection::One(id) = selection {
        if replayed.is_empty() {
            bail!(
                "task {id} is not in the dead-letter queue {}",
                topology.dead_letter_queue()
            );
        }
    }
    Ok(replayed)
}
