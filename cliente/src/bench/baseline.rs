//! The bare limits of the three dependencies, each alone, with messages,
//! rows and objects shaped like the system's own:
//!
//! - RabbitMQ: persistent messages of a task's size published with
//!   pipelined confirms to a scratch durable quorum queue (like `tareas`),
//!   consumed at the same time with manual acks.
//! - PostgreSQL: rows like `tasks` rows upserted in multi-row batches over
//!   a few connections into a scratch table with the same schema.
//! - S3: result-sized objects PUT at the worker's concurrency.
//!
//! And one latency: RabbitMQ's publish-to-confirm time for such messages
//! published one by one at a fixed rate, the floor under the ack latency.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::Connection;
use serde::Serialize;
use serde_json::json;
use tareas_common::amqp::{self, Envelope, PublishError};
use tareas_common::config::BrokerArgs;
use tareas_common::s3::S3Store;
use tareas_common::task::{TaskId, TaskMessage};
use tokio_postgres::NoTls;

use super::latency::{self, Latency};
use super::BenchArgs;

/// Operations per second of each dependency alone.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// Messages, rows or objects per measurement.
    pub count: usize,
    /// Messages/s published with confirms and consumed with acks.
    pub rabbitmq_per_sec: f64,
    /// Rows/s upserted.
    pub postgres_per_sec: f64,
    /// Objects/s PUT.
    pub s3_per_sec: f64,
}

impl Baseline {
    /// The slowest dependency and its rate.
    pub fn slowest(&self) -> (&'static str, f64) {
        [
            ("RabbitMQ", self.rabbitmq_per_sec),
            ("PostgreSQL", self.postgres_per_sec),
            ("S3", self.s3_per_sec),
        ]
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("RabbitMQ", self.rabbitmq_per_sec))
    }
}

pub async fn measure(args: &BenchArgs, count: usize) -> anyhow::Result<Baseline> {
    let message = TaskMessage {
        task_id: TaskId::generate().into(),
        task_type: args.task_type.clone(),
        payload: args.payload()?,
        notify: true,
    };
    let body = serde_json::to_vec(&message)?;
    let rabbitmq_per_sec = rabbitmq(&args.broker, &body, count)
        .await
        .context("RabbitMQ baseline")?;
    let postgres_per_sec = postgres(&args.database.database_url, &message, count)
        .await
        .context("PostgreSQL baseline")?;
    let s3_per_sec = s3(args, &message, count).await.context("S3 baseline")?;
    Ok(Baseline {
        count,
        rabbitmq_per_sec,
        postgres_per_sec,
        s3_per_sec,
    })
}

fn per_sec(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// RabbitMQ's publish-to-confirm latency for `count` task-sized persistent
/// messages offered at `rate` per second to a scratch quorum queue that is
/// consumed meanwhile, as the work queue is.
pub async fn rabbitmq_confirm_latency(
    args: &BenchArgs,
    count: usize,
    rate: f64,
) -> anyhow::Result<Latency> {
    let message = TaskMessage {
        task_id: TaskId::generate().into(),
        task_type: args.task_type.clone(),
        payload: args.payload()?,
        notify: true,
    };
    let body = Arc::new(serde_json::to_vec(&message)?);
    let scratch = ScratchQueue::open(&args.broker, count).await?;
    let latencies = Arc::new(Mutex::new(latency::histogram()));
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    let mut confirms = tokio::task::JoinSet::new();
    for _ in 0..count {
        ticks.tick().await;
        let (publisher, queue, body, latencies) = (
            scratch.publisher.clone(),
            scratch.queue.clone(),
            body.clone(),
            latencies.clone(),
        );
        // One task per message: its latency is taken when the confirm
        // arrives, not when the loop gets round to it.
        confirms.spawn(async move {
            let started = Instant::now();
            amqp::publish_persistent(&publisher, &queue, &body, Envelope::default()).await?;
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            latencies
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .saturating_record(micros.max(1));
            Ok::<(), PublishError>(())
        });
    }
    while let Some(confirm) = confirms.join_next().await {
        confirm.context("publisher task panicked")??;
    }
    scratch.consumed().await?.finish().await?;
    let latencies = latencies
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    Ok(Latency::of(&latencies))
}

async fn rabbitmq(broker: &BrokerArgs, body: &[u8], count: usize) -> anyhow::Result<f64> {
    let scratch = ScratchQueue::open(broker, count).await?;
    let started = Instant::now();
    let mut confirms = FuturesUnordered::new();
    for _ in 0..count {
        if confirms.len() >= 1000 {
            if let Some(confirm) = confirms.next().await {
                confirm?;
            }
        }
        // Pipelined: up to 1000 publishes await their confirms at once.
        confirms.push(amqp::publish_persistent(
            &scratch.publisher,
            &scratch.queue,
            body,
            Envelope::default(),
        ));
    }
    while let Some(confirm) = confirms.next().await {
        confirm?;
    }
    drop(confirms);
    let scratch = scratch.consumed().await?;
    let elapsed = started.elapsed();
    scratch.finish().await?;
    Ok(per_sec(count, elapsed))
}

/// A scratch durable quorum queue (like `tareas`) with a publishing channel
/// in confirm mode and a consumer acking every message as it comes.
struct ScratchQueue {
    connection: Connection,
    publisher: lapin::Channel,
    queue: String,
    consumer_channel: lapin::Channel,
    consuming: tokio::task::JoinHandle<Result<usize, lapin::Error>>,
    expected: usize,
}

impl ScratchQueue {
    /// Declares the queue and starts consuming `expected` messages.
    async fn open(broker: &BrokerArgs, expected: usize) -> anyhow::Result<ScratchQueue> {
        let connection = amqp::connect(&broker.amqp_url, "cliente-bench-baseline").await?;
        let publisher = amqp::confirm_channel(&connection).await?;
        let queue = format!("tareas-baseline-{}", uuid::Uuid::new_v4());
        publisher
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                tareas_common::topology::quorum_arguments(broker.quorum_size),
            )
            .await?;
        let consumer_channel = connection.create_channel().await?;
        consumer_channel
            .basic_qos(1000, BasicQosOptions::default())
            .await?;
        let mut consumer = consumer_channel
            .basic_consume(
                queue.as_str().into(),
                "baseline".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consuming = tokio::spawn(async move {
            let mut consumed = 0;
            while consumed < expected {
                let Some(delivery) = consumer.next().await else {
                    break;
                };
                delivery?.ack(BasicAckOptions::default()).await?;
                consumed += 1;
            }
            Ok::<usize, lapin::Error>(consumed)
        });
        Ok(ScratchQueue {
            connection,
            publisher,
            queue,
            consumer_channel,
            consuming,
            expected,
        })
    }

    /// Waits until every expected message was consumed.
    async fn consumed(mut self) -> anyhow::Result<ScratchQueue> {
        let consumed = (&mut self.consuming).await.context("consumer panicked")??;
        anyhow::ensure!(
            consumed == self.expected,
            "consumed {consumed} of {}",
            self.expected
        );
        Ok(self)
    }

    /// Deletes the queue and closes the connection.
    async fn finish(self) -> anyhow::Result<()> {
        // Best effort: the consumer task's end cancels its consumer, which
        // can race this close ("invalid channel state: Closing").
        let _ = self
            .consumer_channel
            .close(200, "baseline consumed".into())
            .await;
        self.publisher
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        let _ = self.connection.close(200, "baseline done".into()).await;
        Ok(())
    }
}

async fn postgres(url: &str, message: &TaskMessage, count: usize) -> anyhow::Result<f64> {
    const CONNECTIONS: usize = 4;
    const BATCH: usize = 250;
    let table = format!("tareas_baseline_{}", uuid::Uuid::new_v4().simple());
    let (setup, driver) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(driver);
    setup
        .batch_execute(&format!("CREATE TABLE {table} (LIKE tasks INCLUDING ALL)"))
        .await?;
    let result =
        json!({"sha256": "b221d9dbb083a7f33428d7c2a3c3198ae925614d70210e28716ccaa7cd4ddb79"});
    let sql = Arc::new(format!(
        "INSERT INTO {table} (task_id, task_type, payload, state, result, worker_id, attempts, finished_at)
         SELECT id, $2, $3, 'succeeded', $4, 'baseline', 1, now() FROM UNNEST($1::text[]) AS id
         ON CONFLICT (task_id) DO UPDATE SET state = EXCLUDED.state, result = EXCLUDED.result,
             worker_id = EXCLUDED.worker_id, attempts = {table}.attempts + 1, finished_at = now()"
    ));
    let started = Instant::now();
    let mut writers = Vec::new();
    for connection in 0..CONNECTIONS {
        let (client, driver) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(driver);
        let ids: Vec<String> = (connection..count)
            .step_by(CONNECTIONS)
            .map(|i| format!("baseline-{i}"))
            .collect();
        let sql = sql.clone();
        let (task_type, payload, result) = (
            message.task_type.clone(),
            message.payload.clone(),
            result.clone(),
        );
        writers.push(tokio::spawn(async move {
            let statement = client.prepare(&sql).await?;
            for batch in ids.chunks(BATCH) {
                client
                    .execute(&statement, &[&batch, &task_type, &payload, &result])
                    .await?;
            }
            Ok::<(), tokio_postgres::Error>(())
        }));
    }
    for writer in writers {
        writer.await.context("writer panicked")??;
    }
    let elapsed = started.elapsed();
    setup.batch_execute(&format!("DROP TABLE {table}")).await?;
    Ok(per_sec(count, elapsed))
}

async fn s3(args: &BenchArgs, message: &TaskMessage, count: usize) -> anyhow::Result<f64> {
    let store = S3Store::new(&args.s3);
    store.ensure_bucket().await?;
    let document = serde_json::to_vec(&json!({
        "task_id": message.task_id, "task_type": message.task_type, "payload": message.payload,
        "state": "succeeded", "result": {"sha256": "b221d9dbb083a7f33428d7c2a3c3198ae925614d70210e28716ccaa7cd4ddb79"},
        "error": null, "worker_id": "baseline", "attempts": 1, "duration_ms": 0,
        "created_at": "2026-01-01T00:00:00+00:00", "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:00:00+00:00",
    }))?;
    let document = tareas_common::s3::Document::from(document);
    let run = uuid::Uuid::new_v4();
    let started = Instant::now();
    let mut puts = FuturesUnordered::new();
    for i in 0..count {
        if puts.len() >= args.s3_concurrency.max(1) {
            if let Some(put) = puts.next().await {
                put?;
            }
        }
        let store = store.clone();
        let document = document.clone();
        puts.push(async move {
            store
                .put_result(&format!("baseline-{run}-{i}"), document)
                .await
        });
    }
    while let Some(put) = puts.next().await {
        put?;
    }
    let rate = per_sec(count, started.elapsed());
    // Scratch objects: the bucket is for real results.
    futures::stream::iter(0..count)
        .map(|i| {
            let store = store.clone();
            async move { store.delete_result(&format!("baseline-{run}-{i}")).await }
        })
        .buffer_unordered(args.s3_concurrency.max(1))
        .try_collect::<()>()
        .await
        .context("deleting the baseline's scratch objects")?;
    Ok(rate)
}
