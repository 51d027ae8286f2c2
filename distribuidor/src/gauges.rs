//! Samples the distribuidor's gauges every few seconds: results awaited,
//! the RabbitMQ link, and the depths of the work queue and its dead letters
//! (passive declares: cheap, and a few seconds apart).

use std::sync::Arc;
use std::time::Duration;

use tareas_common::metrics as names;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::router::Router;

/// How often the gauges are sampled.
const EVERY: Duration = Duration::from_secs(5);

/// Samples until `stop`.
pub async fn run(broker: Broker, router: Arc<Router>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        names::upkeep();
        metrics::gauge!(names::RESULTS_AWAITED).set(router.len() as f64);
        let up = broker.is_connected();
        metrics::gauge!(names::RABBITMQ_UP).set(if up { 1.0 } else { 0.0 });
        for (queue, messages) in broker.depths().await {
            metrics::gauge!(names::QUEUE_DEPTH, "queue" => queue).set(f64::from(messages));
        }
    }
}
