//! With `OTEL_EXPORTER_OTLP_ENDPOINT`, a task is one trace: the
//! distribuidor's `submit` span and the worker's `delivery` span reach the
//! collector with the same trace id, the delivery a descendant of the
//! distribuidor's span. The collector here is a small OTLP/HTTP (JSON)
//! receiver; both programs run as their own processes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tareas_integration::{
    binary, next_result, submit_ok, task, Deployment, DistribuidorProcess, LIMIT,
};

/// Every span the collector received: (name, trace id, span id, parent id).
type Spans = Arc<Mutex<Vec<(String, String, String, String)>>>;

async fn collector() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let received = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::Json<Value>| async move {
            let mut spans = received.lock().expect("lock");
            for resource in body["resourceSpans"].as_array().into_iter().flatten() {
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    for span in scope["spans"].as_array().into_iter().flatten() {
                        let field = |name: &str| span[name].as_str().unwrap_or_default().to_owned();
                        spans.push((
                            field("name"),
                            field("traceId"),
                            field("spanId"),
                            field("parentSpanId"),
                        ));
                    }
                }
            }
            axum::Json(json!({}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_one_trace_from_the_distribuidor_to_the_worker() {
    let deployment = Deployment::new().await;
    let (endpoint, spans) = collector().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
    ];
    let distribuidor = DistribuidorProcess::start(&deployment.queue, &otel).await;
    let _worker = tokio::process::Command::new(binary("worker"))
        .env("TAREAS_QUEUE", &deployment.queue)
        .env("WORKER_ID", "w-traced")
        .env("WORKER_METRICS_ADDR", "")
        .env(
            "WORKER_HEALTH_FILE",
            std::env::temp_dir().join(format!("{}.health", deployment.queue)),
        )
        .envs(otel)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the worker binary");
    let mut client = distribuidor.client().await;
    let id = submit_ok(&mut client, task("echo", json!({"text": "trazado"}))).await;
    next_result(&mut client).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    // Each process exports on its own schedule: wait until both spans are in.
    loop {
        {
            let spans = spans.lock().expect("lock");
            let delivery = spans.iter().find(|s| s.0 == "delivery");
            let submit =
                delivery.and_then(|d| spans.iter().find(|s| s.0 == "submit" && s.1 == d.1));
            if let (Some(delivery), Some(submit)) = (delivery, submit) {
                // The delivery descends from the submit span (through the
                // publish context it carried).
                let ids: Vec<&str> = spans
                    .iter()
                    .filter(|s| s.1 == submit.1)
                    .map(|s| s.2.as_str())
                    .collect();
                assert!(
                    ids.contains(&delivery.3.as_str()) || delivery.3 == submit.2,
                    "the delivery's parent {} is a span of the task's trace: {spans:?}",
                    delivery.3
                );
                println!(
                    "task {id}: one trace {} across the distribuidor and the worker",
                    delivery.1
                );
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no submit and delivery of one trace reached the collector: {:?}",
            spans.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    distribuidor.stop().await;
    deployment.stop().await;
}
