//! A worker of your own: the built-ins plus a `word_count` task type.
//!
//! ```text
//! cargo run -p tareas-worker --example custom_worker
//! # and start the distribuidor with TAREAS_EXTRA_TASK_TYPES=word_count
//! cargo run -p cliente -- submit word_count --payload '{"text":"uno dos tres"}' --wait
//! ```

use serde_json::json;
use tareas_worker::registry::TaskError;
use tareas_worker::{builtins, Registry, Worker, WorkerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: WorkerConfig = tareas_common::config::parse();
    let _telemetry = tareas_common::telemetry::init(&config.log, "worker");
    let mut registry = Registry::new();
    builtins::register(&mut registry);
    registry.register_blocking("word_count", |payload| {
        let text = payload
            .get("text")
            .and_then(|text| text.as_str())
            .ok_or_else(|| TaskError::permanent("word_count needs {\"text\": string}"))?;
        Ok(json!({ "words": text.split_whitespace().count() }))
    });
    Worker::new(&config, registry)?
        .run(tareas_common::shutdown::on_signal())
        .await;
    Ok(())
}
