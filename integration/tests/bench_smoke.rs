//! A small run of the benchmark harness, so that it never rots. It asserts
//! counts, never timings.

use clap::Parser;

use tareas_integration::Deployment;

#[derive(Parser)]
struct Bench {
    #[command(flatten)]
    args: cliente::bench::BenchArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_harness_smoke() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-bench", 4));
    let queue = deployment.queue.clone();
    let args = Bench::parse_from([
        "bench",
        "--tasks",
        "300",
        "--connections",
        "3",
        "--window",
        "16",
        "--baseline",
        "--baseline-tasks",
        "200",
        "--quiet",
        "--queue",
        queue.as_str(),
    ])
    .args;
    let report = cliente::bench::run(&distribuidor.addr.to_string(), &args)
        .await
        .expect("bench run");
    assert_eq!(report.acked, 300);
    assert_eq!(report.results, 300);
    assert_eq!(report.duplicate_results, 0);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.ack_latency_ms.samples, 300);
    assert_eq!(report.end_to_end_latency_ms.samples, 300);
    let baseline = report.baseline.as_ref().expect("baseline measured");
    assert!(
        baseline.rabbitmq_per_sec > 0.0
            && baseline.postgres_per_sec > 0.0
            && baseline.s3_per_sec > 0.0
    );
    assert!(report.ratio_to_slowest.is_some() && report.bounded_by.is_some());
    let rendered = report.render();
    assert!(
        rendered.contains("results") && rendered.contains("ratio"),
        "{rendered}"
    );

    // Submission only, paced: acks without results, and RabbitMQ's own
    // confirm latency at that rate first.
    let args = Bench::parse_from([
        "bench",
        "--tasks",
        "100",
        "--acks-only",
        "--rate",
        "500",
        "--confirm-baseline",
        "--baseline-tasks",
        "50",
        "--quiet",
    ])
    .args;
    let report = cliente::bench::run(&distribuidor.addr.to_string(), &args)
        .await
        .expect("acks-only run");
    assert_eq!(report.acked, 100);
    assert_eq!(report.results, 0);
    let floor = report
        .rabbitmq_confirm_latency_ms
        .as_ref()
        .expect("confirm latency measured");
    assert_eq!(floor.samples, 50);
    assert!(report.render().contains("RabbitMQ confirm"));
    deployment.stop().await;
}
