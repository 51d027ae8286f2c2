//! The load generator: `connections` connections, each keeping at most
//! `window` tasks unacknowledged, optionally paced to a total `rate`.
//! Records when each task was sent, acked and finished.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tareas_common::protocol::{Reply, Request, TaskRequest};
use tokio::sync::Semaphore;

use super::latency::histogram;
use super::BenchArgs;
use crate::Client;

/// What the load run measured.
#[derive(Debug)]
pub struct LoadResult {
    pub sent: usize,
    pub acked: usize,
    pub results: usize,
    /// From the first send to the last ack.
    pub ack_elapsed: Duration,
    /// From the first send to the last result.
    pub result_elapsed: Duration,
    /// Microseconds from send to ack.
    pub ack_latency: Histogram<u64>,
    /// Microseconds from send to result.
    pub end_to_end_latency: Histogram<u64>,
    /// Error replies by code (an `unavailable` that was retried counts too).
    pub errors: BTreeMap<String, usize>,
    /// Tasks whose result was pushed more than once.
    pub duplicate_results: usize,
    /// Connections opened again after the distribuidor dropped them.
    pub reconnects: usize,
    /// Results whose status was `failed`.
    pub failed: usize,
    /// Worker ids seen in results, with counts.
    pub workers: BTreeMap<String, usize>,
}

/// Per-connection bookkeeping shared by its sender and receiver.
#[derive(Default)]
struct Pending {
    /// task id → when it was (last) sent.
    sent_at: HashMap<String, Instant>,
    /// task id → when it was acked, until its result arrives.
    acked: HashMap<String, Instant>,
    /// Every task acked on this connection (to resend the rest after a reconnect).
    acked_ids: std::collections::HashSet<String>,
}

/// Shared figures, merged from every connection.
struct Totals {
    result: Mutex<LoadResult>,
    first_send: Instant,
    acked_ids: Mutex<Vec<String>>,
}

pub async fn run(addr: &str, args: &BenchArgs, limit: Duration) -> anyhow::Result<LoadResult> {
    let payload = args.payload()?;
    let prefix = args
        .id_prefix
        .clone()
        .unwrap_or_else(|| format!("bench-{}", &uuid::Uuid::new_v4().to_string()[..8]));
    let connections = args.connections.max(1);
    let progress = progress_bar(args);
    let totals = Arc::new(Totals {
        result: Mutex::new(LoadResult {
            sent: 0,
            acked: 0,
            results: 0,
            ack_elapsed: Duration::ZERO,
            result_elapsed: Duration::ZERO,
            ack_latency: histogram(),
            end_to_end_latency: histogram(),
            errors: BTreeMap::new(),
            duplicate_results: 0,
            reconnects: 0,
            failed: 0,
            workers: BTreeMap::new(),
        }),
        first_send: Instant::now(),
        acked_ids: Mutex::new(Vec::new()),
    });
    // Pacing: one permit per task at `rate` per second, shared by all connections.
    let pacer = args.rate.map(spawn_pacer);
    let mut handles = Vec::new();
    for connection in 0..connections {
        let count = args.tasks / connections + usize::from(connection < args.tasks % connections);
        let ids: Vec<String> = (0..count)
            .map(|i| format!("{prefix}-{connection}-{i}"))
            .collect();
        let client = Client::connect(addr).await?;
        let job = Job {
            addr: addr.to_owned(),
            ids,
            task_type: args.task_type.clone(),
            payload: payload.clone(),
            window: args.window.max(1),
            notify: !args.acks_only,
            retry_unavailable: args.retry_unavailable,
            pacer: pacer.clone(),
            totals: totals.clone(),
            progress: progress.clone(),
        };
        handles.push(tokio::spawn(job.run(client)));
    }
    let all = futures::future::try_join_all(handles);
    match tokio::time::timeout(limit, all).await {
        Err(_) => bail!("the bench did not finish within {limit:?}"),
        Ok(joined) => {
            for outcome in joined.context("a bench connection panicked")? {
                outcome?;
            }
        }
    }
    progress.finish_and_clear();
    if let Some(path) = &args.record_acked {
        let ids = totals
            .acked_ids
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .join("\n");
        std::fs::write(path, ids + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    let totals =
        Arc::try_unwrap(totals).map_err(|_| anyhow::anyhow!("bench connections still running"))?;
    totals
        .result
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))
}

fn progress_bar(args: &BenchArgs) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let total = if args.acks_only {
        args.tasks
    } else {
        args.tasks * 2
    };
    let bar = ProgressBar::new(total as u64);
    let style = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} acks+results {per_sec}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar
}

/// Releases one permit per task at `rate` per second, for as long as the
/// run lasts (resent tasks need permits too).
fn spawn_pacer(rate: f64) -> Arc<Semaphore> {
    let permits = Arc::new(Semaphore::new(0));
    let feed = Arc::downgrade(&permits);
    tokio::spawn(async move {
        let start = Instant::now();
        let mut released = 0usize;
        loop {
            let Some(feed) = feed.upgrade() else { return };
            let due = (start.elapsed().as_secs_f64() * rate) as usize;
            if due > released {
                feed.add_permits(due - released);
                released = due;
            }
            drop(feed);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    permits
}

/// One connection's share of the load.
struct Job {
    /// Where to connect again when the distribuidor goes away.
    addr: String,
    ids: Vec<String>,
    task_type: String,
    payload: serde_json::Value,
    window: usize,
    notify: bool,
    retry_unavailable: bool,
    pacer: Option<Arc<Semaphore>>,
    totals: Arc<Totals>,
    progress: ProgressBar,
}

impl Job {
    /// Sends every task of the job. With `retry_unavailable` in an
    /// acks-only run, a connection the distribuidor dropped (a crash, a
    /// restart) is opened again and the tasks not acked yet are sent again
    /// with the same ids (safe: a task runs once).
    async fn run(self, client: Client) -> anyhow::Result<()> {
        let reconnect = self.retry_unavailable && !self.notify;
        let mut remaining = self.ids.clone();
        let mut client = client;
        // Connections in a row that got no ack: past it, give up.
        let mut fruitless = 0;
        loop {
            let pending = Arc::new(Mutex::new(Pending::default()));
            match self.run_once(client, &remaining, &pending).await {
                Ok(()) => return Ok(()),
                Err(err) if reconnect => {
                    let acked = std::mem::take(&mut lock(&pending).acked_ids);
                    fruitless = if acked.is_empty() { fruitless + 1 } else { 0 };
                    if fruitless > 50 {
                        return Err(err.context("50 connections in a row got no ack"));
                    }
                    remaining.retain(|id| !acked.contains(id));
                    lock(&self.totals.result).reconnects += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    client = self.connect_again().await?;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Connects until the distribuidor answers again (at most a minute).
    async fn connect_again(&self) -> anyhow::Result<Client> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Client::connect(&self.addr).await {
                Ok(client) => return Ok(client),
                Err(err) if Instant::now() > deadline => return Err(err),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    async fn run_once(
        &self,
        client: Client,
        ids: &[String],
        pending: &Arc<Mutex<Pending>>,
    ) -> anyhow::Result<()> {
        let (mut writer, mut reader) = client.into_split();
        let window = Arc::new(Semaphore::new(self.window));
        let (resend_tx, mut resend_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let count = ids.len();
        // Receiver: acks free window slots; results complete tasks.
        let mut receiving = {
            let window = window.clone();
            let pending = pending.clone();
            let totals = self.totals.clone();
            let progress = self.progress.clone();
            let retry = self.retry_unavailable.then_some(resend_tx);
            let notify = self.notify;
            tokio::spawn(async move {
                let received = receive(
                    &mut reader,
                    count,
                    notify,
                    retry,
                    &window,
                    &pending,
                    &totals,
                    &progress,
                )
                .await;
                if received.is_err() {
                    // The connection is gone: a sender waiting for a window
                    // slot must not wait for ever.
                    window.close();
                }
                received
            })
        };
        for id in ids {
            self.send(&mut writer, &window, pending, id).await?;
        }
        writer.flush().await?;
        // Resend what was refused as `unavailable` until the receiver is done.
        let received = loop {
            tokio::select! {
                received = &mut receiving => break received,
                Some(id) = resend_rx.recv() => {
                    self.send(&mut writer, &window, pending, &id).await?;
                    writer.flush().await?;
                }
            }
        };
        received.context("bench receiver panicked")?
    }

    async fn send(
        &self,
        writer: &mut crate::client::RequestWriter,
        window: &Arc<Semaphore>,
        pending: &Mutex<Pending>,
        id: &str,
    ) -> anyhow::Result<()> {
        if let Some(pacer) = &self.pacer {
            match pacer.try_acquire() {
                Ok(permit) => permit.forget(),
                Err(_) => {
                    writer.flush().await?;
                    pacer.acquire().await?.forget();
                }
            }
        }
        match window.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => {
                writer.flush().await?;
                window.acquire().await?.forget();
            }
        } // the slot is given back by the receiver on the ack or error
        lock(pending).sent_at.insert(id.to_owned(), Instant::now());
        let request = Request::Task(TaskRequest {
            task_id: Some(id.to_owned()),
            task_type: Some(self.task_type.clone()),
            payload: Some(self.payload.clone()),
            notify: Some(self.notify),
        });
        writer.send(&request).await?;
        lock(&self.totals.result).sent += 1;
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
async fn receive(
    reader: &mut crate::client::ReplyReader,
    count: usize,
    notify: bool,
    retry_unavailable: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    window: &Semaphore,
    pending: &Mutex<Pending>,
    totals: &Totals,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let mut acked = 0usize;
    let mut finished = 0usize;
    let mut seen_results: std::collections::HashSet<String> = std::collections::HashSet::new();
    while acked < count || (notify && finished < count) {
        let Some(reply) = reader.recv().await? else {
            bail!(
                "the distribuidor closed the connection with {} of {count} tasks acked",
                acked
            );
        };
        let now = Instant::now();
        match reply {
            Reply::Ack { task_id, .. } => {
                window.add_permits(1);
                acked += 1;
                progress.inc(1);
                record_ack(task_id.to_string(), now, notify, pending, totals);
            }
            Reply::Result(report) => {
                if !seen_results.insert(report.task_id.to_string()) {
                    lock(&totals.result).duplicate_results += 1;
                    continue;
                }
                finished += 1;
                progress.inc(1);
                record_result(report, now, pending, totals);
            }
            Reply::Error(error) => {
                window.add_permits(1);
                if !record_error(error, retry_unavailable.as_ref(), pending, totals) {
                    // Refused for good: it will never be acked nor finish.
                    acked += 1;
                    finished += 1;
                }
            }
            other => bail!("unexpected reply during the bench: {other:?}"),
        }
    }
    Ok(())
}

/// Counts an ack and its latency; remembers when the task was sent, for
/// its end-to-end latency.
fn record_ack(id: String, now: Instant, notify: bool, pending: &Mutex<Pending>, totals: &Totals) {
    let sent = {
        let mut pending = lock(pending);
        pending.acked_ids.insert(id.clone());
        pending.sent_at.remove(&id)
    };
    let mut result = lock(&totals.result);
    result.acked += 1;
    result.ack_elapsed = now - totals.first_send;
    if let Some(sent) = sent {
        let _ = result.ack_latency.record(micros(now - sent));
        if notify {
            lock(pending).acked.insert(id.clone(), sent);
        }
    }
    drop(result);
    lock(&totals.acked_ids).push(id);
}

/// Counts a (first) result, its worker and its end-to-end latency.
fn record_result(
    report: tareas_common::task::TaskReport,
    now: Instant,
    pending: &Mutex<Pending>,
    totals: &Totals,
) {
    let mut result = lock(&totals.result);
    result.results += 1;
    result.result_elapsed = now - totals.first_send;
    if report.status == tareas_common::task::TaskState::Failed {
        result.failed += 1;
    }
    if let Some(worker) = report.worker_id {
        *result.workers.entry(worker).or_default() += 1;
    }
    if let Some(sent) = lock(pending).acked.remove(report.task_id.as_str()) {
        let _ = result.end_to_end_latency.record(micros(now - sent));
    }
}

/// Counts an error reply; an `unavailable` or `uncertain` task is sent
/// again (same id: safe either way) after a moment when retrying is on.
/// Returns whether it will be sent again.
fn record_error(
    error: tareas_common::protocol::ErrorReply,
    retry_unavailable: Option<&tokio::sync::mpsc::UnboundedSender<String>>,
    pending: &Mutex<Pending>,
    totals: &Totals,
) -> bool {
    *lock(&totals.result)
        .errors
        .entry(error.code.as_str().to_owned())
        .or_default() += 1;
    let id = error.task_id.unwrap_or_default();
    lock(pending).sent_at.remove(&id);
    let unavailable = matches!(
        error.code,
        tareas_common::protocol::ErrorCode::Unavailable
            | tareas_common::protocol::ErrorCode::Uncertain
    );
    let (Some(resend), true, false) = (retry_unavailable, unavailable, id.is_empty()) else {
        return false;
    };
    // Give the system a moment to come back before trying again.
    let resend = resend.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = resend.send(id);
    });
    true
}

fn micros(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
