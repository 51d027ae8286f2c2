//! Prometheus metrics: the names every dashboard and alert is written
//! against (docs/operations.md lists them), and the process's recorder.
//! Counters are exact; histograms are in seconds.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// The distribuidor.
/// Task requests parsed (socket and HTTP), before their fields are checked.
pub const RECEIVED: &str = "tareas_tasks_received_total";
/// Tasks acked (socket `ack`, HTTP `202`): durably queued.
pub const ACKED: &str = "tareas_tasks_acked_total";
/// Task requests refused, by error `code`.
pub const REFUSED: &str = "tareas_tasks_refused_total";
/// Request validated → ack decided (record and confirmed publish), seconds.
pub const ACK_LATENCY: &str = "tareas_ack_latency_seconds";
/// Client connections open on the socket.
pub const CONNECTIONS: &str = "tareas_connections_open";
/// Tasks whose result some connection waits for.
pub const RESULTS_AWAITED: &str = "tareas_results_awaited";
/// Messages in a queue (`queue` label: the work queue, its dead letters).
pub const QUEUE_DEPTH: &str = "tareas_queue_messages";

// The worker.
/// Runs started, by `task_type`.
pub const STARTED: &str = "tareas_tasks_started_total";
/// Tasks finished by this worker, by `task_type` and `outcome`
/// (`succeeded` or `failed`).
pub const FINISHED: &str = "tareas_tasks_finished_total";
/// Transient failures sent to a retry queue, by `task_type`.
pub const RETRIED: &str = "tareas_tasks_retried_total";
/// Messages moved to the dead-letter queue, by `task_type`.
pub const DEAD_LETTERED: &str = "tareas_tasks_dead_lettered_total";
/// Received by the distribuidor → started by a worker, seconds.
pub const QUEUE_WAIT: &str = "tareas_queue_wait_seconds";
/// The handler's run, by `task_type`, seconds.
pub const RUN_TIME: &str = "tareas_run_seconds";
/// One store's write (`store`: `postgres` or `s3`), seconds.
pub const STORE_TIME: &str = "tareas_store_seconds";
/// Received by the distribuidor → result written to S3, seconds.
pub const END_TO_END: &str = "tareas_end_to_end_seconds";
/// Run slots in use.
pub const BUSY_SLOTS: &str = "tareas_run_slots_busy";
/// Messages delivered to this worker and not yet settled.
pub const UNACKED: &str = "tareas_messages_unacked";

// Both.
/// 1 while the process's RabbitMQ link is up.
pub const RABBITMQ_UP: &str = "tareas_rabbitmq_link_up";

/// Bucket bounds of every histogram, seconds: 1 ms to 5 min.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The process's recorder, installed on first use (one per process: the
/// in-process test harness shares it between its distribuidores and workers).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .expect("the buckets are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed already (a library user's):
        // ours then renders nothing, which the log says.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics stays empty");
        }
        handle
    })
}

/// One up in gauge `name` until dropped (a panic included): for things in
/// progress, so the gauge never drifts.
pub struct InProgress(metrics::Gauge);

impl InProgress {
    pub fn start(name: &'static str) -> InProgress {
        let gauge = metrics::gauge!(name);
        gauge.increment(1.0);
        InProgress(gauge)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Drains the histograms' recent samples into their buckets; without it
/// they pile up until a scrape. Call every few seconds.
pub fn upkeep() {
    handle().run_upkeep();
}

/// The text exposition format, for `GET /metrics`.
pub fn render() -> String {
    handle().render()
}

/// Seconds from PostgreSQL timestamp `from` to `to` (both as `to_jsonb`
/// writes them: `2026-11-29T17:09:35.617174+00:00`); `None` if unreadable.
pub fn seconds_between(from: &str, to: &str) -> Option<f64> {
    Some(unix_seconds(to)? - unix_seconds(from)?)
}

/// Seconds since the epoch of a PostgreSQL timestamp (see [`seconds_between`]).
pub fn unix_seconds(text: &str) -> Option<f64> {
    let (date, rest) = text.split_once('T')?;
    let offset_at = rest.rfind(['+', '-'])?;
    let (time, offset) = rest.split_at(offset_at);
    let mut ymd = date.split('-').map(|part| part.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.split(':');
    let (h, min) = (
        hms.next()?.parse::<i64>().ok()?,
        hms.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = hms.next()?.parse().ok()?;
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut parts = offset[1..].split(':');
    let off_h: i64 = parts.next()?.parse().ok()?;
    let off_m: i64 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    // Days since the epoch of a civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    let local = days * 86_400 + h * 3600 + min * 60;
    let utc = local - sign * (off_h * 3600 + off_m * 60);
    Some(utc as f64 + s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_timestamps_are_read_with_their_offset() {
        let utc = unix_seconds("2026-11-29T17:09:35.5+00:00").unwrap();
        assert_eq!(utc, 1_795_972_175.5);
        assert_eq!(unix_seconds("2026-11-29T18:09:35.5+01:00"), Some(utc));
        assert_eq!(unix_seconds("1970-01-01T00:00:00+00:00"), Some(0.0));
        let wait = seconds_between("2026-02-28T23:59:59+00:00", "2026-03-01T00:00:01+00:00");
        assert_eq!(wait, Some(2.0));
        assert_eq!(unix_seconds("yesterday"), None);
    }
}
