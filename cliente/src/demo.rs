//! `cliente` with no arguments: one task of each built-in type, every ack
//! and result printed as it arrives, then a summary.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use tareas_common::builtin;
use tareas_common::protocol::{Reply, TaskRequest};
use tareas_common::task::{TaskReport, TaskState};

use crate::Endpoint;

/// What the demo saw.
#[derive(Debug, Default)]
pub struct Summary {
    /// task_type → its result report.
    pub results: HashMap<String, TaskReport>,
    pub acked: usize,
    pub errors: Vec<String>,
}

/// Sends one task of every built-in type on one connection and waits (up
/// to `limit`) for all results. Prints as it goes when `print` is set.
pub async fn run(endpoint: &Endpoint, limit: Duration, print: bool) -> anyhow::Result<Summary> {
    let mut client = endpoint.connect().await?;
    let mut task_types: HashMap<String, String> = HashMap::new();
    for task_type in builtin::ALL {
        client
            .submit(TaskRequest {
                task_type: Some(task_type.to_owned()),
                payload: Some(builtin::sample_payload(task_type)),
                ..TaskRequest::default()
            })
            .await?;
    }
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut order = builtin::ALL.iter();
    while summary.results.len() + summary.errors.len() < builtin::ALL.len() {
        let Some(left) = limit.checked_sub(started.elapsed()) else {
            bail!(
                "only {} of {} results arrived within {limit:?}",
                summary.results.len(),
                builtin::ALL.len()
            );
        };
        match client.recv_within(left).await? {
            Reply::Ack { task_id, .. } => {
                // Acks come in request order.
                let task_type = order.next().copied().unwrap_or("?");
                task_types.insert(task_id.to_string(), task_type.to_owned());
                summary.acked += 1;
                if print {
                    println!("ack     {task_type:<10} {task_id}");
                }
            }
            Reply::Result(report) => {
                let task_type = task_types
                    .get(report.task_id.as_str())
                    .cloned()
                    .unwrap_or_default();
                if print {
                    print_result(&task_type, &report);
                }
                summary.results.insert(task_type, report);
            }
            Reply::Error(error) => {
                order.next();
                if print {
                    println!("error   {} {}", error.code.as_str(), error.message);
                }
                summary
                    .errors
                    .push(format!("{}: {}", error.code.as_str(), error.message));
            }
            other => bail!("unexpected reply: {other:?}"),
        }
    }
    if print {
        let succeeded = summary
            .results
            .values()
            .filter(|r| r.status == TaskState::Succeeded)
            .count();
        println!(
            "\n{} sent, {} acked, {} succeeded, {} failed, {} refused in {:.2}s",
            builtin::ALL.len(),
            summary.acked,
            succeeded,
            summary.results.len() - succeeded,
            summary.errors.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(summary)
}

fn print_result(task_type: &str, report: &TaskReport) {
    let shown = match (&report.result, &report.error) {
        (Some(result), _) => abbreviate(&result.to_string(), 100),
        (None, Some(error)) => error.clone(),
        (None, None) => String::new(),
    };
    println!(
        "result  {task_type:<10} {} {} by {} in {} ms: {shown}",
        report.task_id,
        report.status,
        report.worker_id.as_deref().unwrap_or("?"),
        report.duration_ms.unwrap_or(0),
    );
}

fn abbreviate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let head: String = text.chars().take(max).collect();
    format!("{head}…")
}
