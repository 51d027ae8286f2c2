//! The bench's figures: printed as a table, optionally written as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use super::baseline::Baseline;
use super::latency::Latency;
use super::load::LoadResult;
use super::BenchArgs;

/// Everything one bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub task_type: String,
    pub tasks: usize,
    pub connections: usize,
    pub window: usize,
    pub rate: Option<f64>,
    pub acked: usize,
    pub results: usize,
    pub failed: usize,
    pub duplicate_results: usize,
    /// Connections opened again after the distribuidor dropped them.
    pub reconnects: usize,
    pub acks_per_sec: f64,
    pub results_per_sec: f64,
    pub ack_latency_ms: Latency,
    pub end_to_end_latency_ms: Latency,
    pub errors: BTreeMap<String, usize>,
    pub workers: BTreeMap<String, usize>,
    pub baseline: Option<Baseline>,
    /// results/s (or acks/s when only acks were measured) over the slowest baseline.
    pub ratio_to_slowest: Option<f64>,
    /// The dependency with the lowest baseline.
    pub bounded_by: Option<String>,
    /// RabbitMQ alone at the same rate: publish to confirm (`--confirm-baseline`).
    pub rabbitmq_confirm_latency_ms: Option<Latency>,
}

impl Report {
    pub fn new(
        args: &BenchArgs,
        load: LoadResult,
        baseline: Option<Baseline>,
        rabbitmq_confirm_latency_ms: Option<Latency>,
    ) -> Report {
        let rate = |count: usize, elapsed: std::time::Duration| {
            if count == 0 {
                0.0
            } else {
                count as f64 / elapsed.as_secs_f64().max(1e-9)
            }
        };
        let acks_per_sec = rate(load.acked, load.ack_elapsed);
        let results_per_sec = rate(load.results, load.result_elapsed);
        let measured = if args.acks_only {
            acks_per_sec
        } else {
            results_per_sec
        };
        let slowest = baseline.as_ref().map(Baseline::slowest);
        Report {
            task_type: args.task_type.clone(),
            tasks: args.tasks,
            connections: args.connections,
            window: args.window,
            rate: args.rate,
            acked: load.acked,
            results: load.results,
            failed: load.failed,
            duplicate_results: load.duplicate_results,
            reconnects: load.reconnects,
            acks_per_sec,
            results_per_sec,
            ack_latency_ms: Latency::of(&load.ack_latency),
            end_to_end_latency_ms: Latency::of(&load.end_to_end_latency),
            errors: load.errors,
            workers: load.workers,
            ratio_to_slowest: slowest.map(|(_, per_sec)| measured / per_sec),
            bounded_by: slowest.map(|(name, _)| name.to_owned()),
            baseline,
            rabbitmq_confirm_latency_ms,
        }
    }

    /// The report as a table for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line(
            &mut out,
            format!(
                "tareas bench: {} × {} over {} connection(s), window {}{}",
                self.tasks,
                self.task_type,
                self.connections,
                self.window,
                self.rate
                    .map(|r| format!(", offered {r:.0}/s"))
                    .unwrap_or_default()
            ),
        );
        if let Some(b) = &self.baseline {
            line(&mut out, format!("baseline ({} each)      RabbitMQ {:>9.0}/s   PostgreSQL {:>9.0}/s   S3 {:>9.0}/s", b.count, b.rabbitmq_per_sec, b.postgres_per_sec, b.s3_per_sec));
        }
        line(
            &mut out,
            format!(
                "acked      {:>8}   {:>9.0} acks/s",
                self.acked, self.acks_per_sec
            ),
        );
        line(
            &mut out,
            format!(
                "results    {:>8}   {:>9.0} results/s   ({} failed, {} duplicate pushes)",
                self.results, self.results_per_sec, self.failed, self.duplicate_results
            ),
        );
        let row = |name: &str, l: &Latency| {
            format!(
                "{name:<18} p50 {:>8.2}  p90 {:>8.2}  p99 {:>8.2}  p99.9 {:>8.2}  max {:>8.2} ms",
                l.p50, l.p90, l.p99, l.p999, l.max
            )
        };
        line(&mut out, row("ack latency", &self.ack_latency_ms));
        if let Some(floor) = &self.rabbitmq_confirm_latency_ms {
            line(&mut out, row("RabbitMQ confirm", floor));
            line(
                &mut out,
                format!(
                    "           ack p99 = {:.2} × RabbitMQ's own confirm p99 alone at this rate",
                    self.ack_latency_ms.p99 / floor.p99.max(1e-9)
                ),
            );
        }
        if self.end_to_end_latency_ms.samples > 0 {
            line(
                &mut out,
                row("end-to-end latency", &self.end_to_end_latency_ms),
            );
        }
        if !self.errors.is_empty() {
            line(&mut out, format!("errors     {:?}", self.errors));
        }
        if !self.workers.is_empty() {
            line(&mut out, format!("workers    {:?}", self.workers));
        }
        if let (Some(ratio), Some(bound)) = (self.ratio_to_slowest, &self.bounded_by) {
            line(
                &mut out,
                format!(
                    "ratio      {:.2} of the slowest dependency alone ({bound})",
                    ratio
                ),
            );
        }
        out
    }
}
