//! Liveness for container healthchecks: `worker --check-health` asks the
//! worker's own `/readyz` when it serves one (`WORKER_METRICS_ADDR`), else
//! checks a heartbeat file the worker touches every few seconds while it is
//! connected and consuming. A worker that lost RabbitMQ, or hangs, turns
//! unhealthy.

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

/// `worker --check-health`: with `WORKER_METRICS_ADDR`, the worker's own
/// `/readyz` (on loopback, its port) must answer 200; without, the
/// heartbeat file must be fresh.
pub async fn check_config(config: &crate::WorkerConfig) -> Result<(), String> {
    let addr = config.metrics_addr().map_err(|err| err.to_string())?;
    let Some(addr) = addr else {
        return check(&config.health_file);
    };
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()));
    let ask = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(local).await?;
        let request = format!("GET /readyz HTTP/1.1\r\nHost: {local}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(5), ask).await {
        Ok(Ok(answer)) if answer.starts_with("HTTP/1.1 200") => Ok(()),
        Ok(Ok(answer)) => Err(format!(
            "not ready: {}",
            answer.lines().last().unwrap_or_default()
        )),
        Ok(Err(err)) => Err(format!(
            "nothing answers on {local} ({err}): is the worker running?"
        )),
        Err(_) => Err(format!(
            "{local} did not answer within 5 s: the worker is stuck"
        )),
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
