//! Liveness for container healthchecks: while the worker is connected and
//! consuming, it touches a heartbeat file every few seconds; `worker
//! --check-health` succeeds only if that file is fresh. A worker that lost
//! RabbitMQ, or hangs, turns unhealthy.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often the heartbeat is written.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// How old a heartbeat may be and still count as healthy.
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// Writes the heartbeat while alive; removes it when dropped.
pub struct Heartbeat {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    pub fn start(path: PathBuf) -> Heartbeat {
        let file = path.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(INTERVAL);
            loop {
                tick.tick().await;
                if let Err(err) = tokio::fs::write(&file, b"ok\n").await {
                    tracing::warn!(path = %file.display(), cause = %err, "cannot write the health file");
                }
            }
        });
        Heartbeat { path, task }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Is the heartbeat at `path` fresh? The error says why not.
pub fn check(path: &Path) -> Result<(), String> {
    let modified = std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .map_err(|err| {
            format!(
                "no heartbeat at {} ({err}): the worker is not consuming",
                path.display()
            )
        })?;
    let age = SystemTime::now()
        .duration_since(modified)
        .unwrap_or_default();
    if age > MAX_AGE {
        return Err(format!(
            "heartbeat is {}s old: the worker is stuck or disconnected",
            age.as_secs()
        ));
    }
    Ok(())
}
