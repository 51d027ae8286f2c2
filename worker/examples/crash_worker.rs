//! A worker whose `crash` task kills the whole process, like a segfault or
//! an out-of-memory kill would: used by the tests of poison messages.
//!
//! ```text
//! cargo run -p tareas-worker --example crash_worker
//! ```

use tareas_worker::{builtins, Registry, Worker, WorkerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: WorkerConfig = tareas_common::config::parse();
    let _telemetry = tareas_common::telemetry::init(&config.log, "worker");
    let mut registry = Registry::new();
    builtins::register(&mut registry);
    registry.register_blocking("crash", |_| std::process::abort());
    Worker::new(&config, registry)?
        .run(tareas_common::shutdown::on_signal())
        .await;
    Ok(())
}
