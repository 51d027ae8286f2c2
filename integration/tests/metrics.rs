//! `/metrics` counts exactly: N tasks (some failing, some retried, some
//! refused) move every counter by exactly what happened, and the
//! histograms count each task once. Scraped over HTTP from the distribuidor
//! and the worker, parsed from the text format.

use std::collections::BTreeMap;

use serde_json::json;
use tareas_common::protocol::{Reply, Request};
use tareas_integration::http::request;
use tareas_integration::{next, task, Deployment};
use tareas_worker::{Registry, TaskError};

/// Every sample of a scrape: `name{label="value",…}` (labels sorted) → value.
async fn scrape(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let scraped = request(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(scraped.status, 200, "{scraped:?}");
    scraped
        .body
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((canonical(series), value.parse().ok()?))
        })
        .collect()
}

/// A series with its labels sorted by name.
fn canonical(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return series.to_owned();
    };
    let mut labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
    labels.sort_unstable();
    format!("{name}{{{}}}", labels.join(","))
}

fn delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    let series = canonical(series);
    after.get(&series).copied().unwrap_or(0.0) - before.get(&series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_counter_moves_by_exactly_what_happened() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.extra_task_types = vec!["flaky".into(), "broken".into()];
    let (distribuidor, http) = deployment.start_distribuidor_with_http(config).await;
    let mut registry = Registry::new();
    tareas_worker::builtins::register(&mut registry);
    // Each fails its first attempt (transiently) and succeeds the second.
    let tried = std::sync::Mutex::new(std::collections::HashSet::new());
    registry.register_blocking("flaky", move |payload| {
        let n = payload["n"].as_u64().unwrap_or_default();
        match tried.lock().expect("lock").insert(n) {
            true => Err(TaskError::transient("not yet")),
            false => Ok(json!({"ok": true})),
        }
    });
    registry.register_blocking("broken", |_| Err(TaskError::permanent("always")));
    let mut worker_config = deployment.worker_config("w-metrics", 1);
    worker_config.retry_base_ms = 50;
    worker_config.retry_max_ms = 100;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let worker_http = listener.local_addr().expect("addr");
    deployment.start_observed_worker(worker_config, registry, Some(listener));
    let (before, worker_before) = (scrape(http).await, scrape(worker_http).await);
    let mut client = distribuidor.client().await;
    let mut requests = Vec::new();
    requests.extend((0..20).map(|i| task("echo", json!({"text": format!("t{i}")}))));
    requests.extend((0..5).map(|n| task("flaky", json!({ "n": n }))));
    requests.extend((0..5).map(|_| task("broken", json!({}))));
    for request in &requests {
        client
            .send(&Request::Task(request.clone()))
            .await
            .expect("send");
    }
    for _ in 0..3 {
        client
            .send(&Request::Task(task("nope", json!({}))))
            .await
            .expect("send");
    }
    let (mut acks, mut results, mut refused) = (0, 0, 0);
    while acks < 30 || results < 30 || refused < 3 {
        match next(&mut client).await {
            Reply::Ack { .. } => acks += 1,
            Reply::Result(_) => results += 1,
            Reply::Error(_) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    let (after, worker_after) = (scrape(http).await, scrape(worker_http).await);
    let d = |series: &str| delta(&before, &after, series);
    assert_eq!(d("tareas_tasks_received_total"), 33.0);
    assert_eq!(d("tareas_tasks_acked_total"), 30.0);
    assert_eq!(
        d(r#"tareas_tasks_refused_total{code="unknown_task_type"}"#),
        3.0
    );
    assert_eq!(d("tareas_ack_latency_seconds_count"), 30.0);
    let w = |series: &str| delta(&worker_before, &worker_after, series);
    let finished = |task_type: &str, outcome: &str| {
        w(&format!(
            r#"tareas_tasks_finished_total{{task_type="{task_type}",outcome="{outcome}"}}"#
        ))
    };
    assert_eq!(finished("echo", "succeeded"), 20.0);
    assert_eq!(finished("flaky", "succeeded"), 5.0);
    assert_eq!(finished("broken", "failed"), 5.0);
    assert_eq!(w(r#"tareas_tasks_retried_total{task_type="flaky"}"#), 5.0);
    assert_eq!(w(r#"tareas_tasks_started_total{task_type="flaky"}"#), 10.0);
    assert_eq!(w("tareas_end_to_end_seconds_count"), 30.0);
    assert_eq!(w("tareas_queue_wait_seconds_count"), 30.0);
    assert_eq!(w(r#"tareas_store_seconds_count{store="s3"}"#), 30.0);
    let ready = request(worker_http, "GET", "/readyz", &[], b"").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    deployment.stop().await;
}
