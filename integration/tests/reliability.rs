//! Failure handling that needs no service restarts: retries through the
//! broker, the dead-letter queue, panics, unroutable publishes, shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tareas_common::protocol::{ErrorCode, Reply, Request, TaskRequest};
use tareas_common::task::{TaskMessage, TaskState};
use tareas_common::topology::Topology;
use tareas_worker::registry::TaskError;
use tareas_worker::Registry;

use tareas_integration::{drain_queue, next, next_result, submit_ok, task, Deployment, LIMIT};

/// A registry with `flaky` (fails transiently `fail_first` times per task,
/// then succeeds), `broken` (always transient), `refused` (permanent) and
/// `explodes` (panics).
fn registry(fail_first: u32) -> Registry {
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut registry = Registry::new();
    registry
        .register_blocking("flaky", move |payload| {
            let key = payload["key"].as_str().unwrap_or_default().to_owned();
            let mut runs = runs.lock().expect("lock");
            let run = runs.entry(key).or_default();
            *run += 1;
            if *run <= fail_first {
                return Err(TaskError::transient(format!("upstream busy (run {run})")));
            }
            Ok(json!({"runs": *run}))
        })
        .register_blocking("broken", |_| {
            Err(TaskError::transient("the remote service is down"))
        })
        .register_blocking("refused", |_| {
            Err(TaskError::permanent("this payload can never work"))
        })
        .register_blocking("explodes", |_| panic!("handler bug"));
    registry
}

async fn deployment_with_custom_types() -> (Deployment, tareas_integration::RunningDistribuidor) {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.extra_task_types = ["flaky", "broken", "refused", "explodes"]
        .map(String::from)
        .to_vec();
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut worker = deployment.worker_config("w-retry", 4);
    worker.max_attempts = 3;
    worker.retry_base_ms = 25;
    deployment.start_worker_with(worker, registry(2));
    (deployment, distribuidor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_through_the_broker() {
    let (deployment, distribuidor) = deployment_with_custom_types().await;
    let mut client = distribuidor.client().await;
    let id = submit_ok(
        &mut client,
        task("flaky", json!({"key": uuid::Uuid::new_v4().to_string()})),
    )
    .await;
    let report = next_result(&mut client).await;
    assert_eq!(report.status, TaskState::Succeeded, "{report:?}");
    assert_eq!(report.result, Some(json!({"runs": 3})));
    let document = tareas_integration::s3_document(&id)
        .await
        .expect("S3 object");
    assert_eq!(document["attempts"], 3, "two failed attempts, then success");
    assert!(
        drain_queue(&Topology::new(&deployment.queue).dead_letter_queue())
            .await
            .is_empty()
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_fail_the_task_and_dead_letter_it() {
    let (deployment, distribuidor) = deployment_with_custom_types().await;
    let mut client = distribuidor.client().await;
    let broken = submit_ok(&mut client, task("broken", json!({}))).await;
    let report = next_result(&mut client).await;
    assert_eq!(report.status, TaskState::Failed);
    let error = report.error.unwrap_or_default();
    assert!(
        error.contains("failed after 3 attempts") && error.contains("remote service is down"),
        "{error}"
    );
    let row = tareas_integration::db()
        .status(&broken)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, TaskState::Failed);
    assert_eq!(
        tareas_integration::s3_document(&broken)
            .await
            .expect("S3 object")["error"],
        json!(error)
    );

    let dead = drain_queue(&Topology::new(&deployment.queue).dead_letter_queue()).await;
    let ids: Vec<String> = dead
        .iter()
        .map(|m| {
            serde_json::from_slice::<TaskMessage>(&m.delivery.data)
                .expect("task message")
                .task_id
                .to_string()
        })
        .collect();
    assert_eq!(ids, vec![broken], "the message is in the dead-letter queue");
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_are_not_retried_and_panics_are_attempts() {
    let (deployment, distribuidor) = deployment_with_custom_types().await;
    let mut client = distribuidor.client().await;
    let refused = submit_ok(&mut client, task("refused", json!({}))).await;
    let report = next_result(&mut client).await;
    assert_eq!(report.status, TaskState::Failed);
    assert_eq!(report.error.as_deref(), Some("this payload can never work"));
    assert_eq!(
        tareas_integration::s3_document(&refused).await.unwrap()["attempts"],
        1
    );

    let explodes = submit_ok(&mut client, task("explodes", json!({}))).await;
    let report = next_result(&mut client).await;
    assert_eq!(report.status, TaskState::Failed);
    assert!(report
        .error
        .unwrap_or_default()
        .contains("panicked: handler bug"));
    assert_eq!(
        tareas_integration::s3_document(&explodes).await.unwrap()["attempts"],
        3,
        "a panic is a failed attempt"
    );

    // The worker survived its handler's panics.
    submit_ok(
        &mut client,
        task("flaky", json!({"key": "after-panic", "x": 1})),
    )
    .await;
    assert_eq!(next_result(&mut client).await.status, TaskState::Succeeded);
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_publish_is_unavailable_not_an_ack() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    // The queue vanishes (an operator deletes it): RabbitMQ returns the
    // mandatory message, and the distribuidor must not ack.
    let connection = tareas_integration::rabbitmq().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(deployment.queue.as_str().into(), Default::default())
        .await
        .unwrap();
    let mut client = distribuidor.client().await;
    client
        .send(&Request::Task(task("hash", json!({"text": "x"}))))
        .await
        .unwrap();
    match next(&mut client).await {
        Reply::Error(error) => {
            assert_eq!(error.code, ErrorCode::Unavailable);
            assert!(error.message.contains("unroutable"), "{}", error.message);
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    tareas_integration::topology(&deployment.queue)
        .declare(&connection)
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_hands_unfinished_tasks_back_without_counting_them() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let mut impatient = deployment.worker_config("w-leaving", 1);
    impatient.shutdown_timeout_secs = 0;
    let leaving = deployment.start_worker(impatient);
    let mut client = distribuidor.client().await;
    let id = submit_ok(&mut client, task("sleep", json!({"ms": 2000}))).await;
    let mut observer = distribuidor.client().await;
    tareas_integration::wait_for_status(&mut observer, &id, |r| {
        matches!(
            r,
            Reply::Status {
                state: tareas_common::protocol::StatusState::Running,
                ..
            }
        )
    })
    .await;
    leaving.cancel(); // SIGTERM, with no time to finish: the task is handed back
    tareas_integration::wait_for_status(&mut observer, &id, |r| {
        matches!(
            r,
            Reply::Status {
                state: tareas_common::protocol::StatusState::Queued,
                ..
            }
        )
    })
    .await;
    deployment.start_worker(deployment.worker_config("w-staying", 1));
    let report = next_result(&mut client).await;
    assert_eq!(report.status, TaskState::Succeeded);
    assert_eq!(report.worker_id.as_deref(), Some("w-staying"));
    assert_eq!(
        tareas_integration::s3_document(&id).await.unwrap()["attempts"],
        1,
        "the handed-back run does not count"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_and_replays_the_dead_letter_queue() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.extra_task_types = vec!["broken".into()];
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut worker = deployment.worker_config("w-old", 2);
    worker.max_attempts = 2;
    worker.retry_base_ms = 25;
    let old = deployment.start_worker_with(worker, registry(0));
    let mut client = distribuidor.client().await;
    let id = submit_ok(&mut client, task("broken", json!({}))).await;
    assert_eq!(next_result(&mut client).await.status, TaskState::Failed);

    let mut broker = tareas_worker::WorkerConfig::defaults().broker;
    broker.queue = deployment.queue.clone();
    let listed = cliente::dlq::list(&broker, usize::MAX).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].task_id.as_deref(), Some(id.as_str()));
    assert_eq!(listed[0].reason, "rejected");
    assert_eq!(
        cliente::dlq::list(&broker, usize::MAX)
            .await
            .expect("list again")
            .len(),
        1,
        "listing leaves them in place"
    );

    // The fix is deployed: `broken` works now. Replay it.
    old.cancel();
    let mut fixed = Registry::new();
    fixed.register_blocking("broken", |_| Ok(json!({"fixed": true})));
    deployment.start_worker_with(deployment.worker_config("w-new", 2), fixed);
    let database = tareas_worker::WorkerConfig::defaults().database;
    let db = tareas_common::db::Db::new(&database.database_url, 2).expect("db");
    let replayed = cliente::dlq::replay(
        &broker,
        &db,
        &cliente::dlq::Selection::One(cliente::dlq::key(None, &id).expect("key")),
    )
    .await
    .expect("replay");
    assert_eq!(replayed, vec![id.clone()]);
    let mut observer = distribuidor.client().await;
    let done = tareas_integration::wait_for_status(&mut observer, &id, |r| {
        matches!(
            r,
            Reply::Status {
                state: tareas_common::protocol::StatusState::Succeeded,
                ..
            }
        )
    })
    .await;
    let Reply::Status { result, .. } = done else {
        unreachable!()
    };
    assert_eq!(result, Some(json!({"fixed": true})));
    assert!(
        cliente::dlq::list(&broker, usize::MAX)
            .await
            .expect("list")
            .is_empty(),
        "replayed tasks leave the dead-letter queue"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_distribuidor() {
    let deployment = Deployment::new().await;
    let stop = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let distribuidor =
        tareas_distribuidor::Distribuidor::start(deployment.distribuidor_config(), stop.clone())
            .unwrap();
    tokio::time::timeout(LIMIT, distribuidor.ready())
        .await
        .expect("ready");
    let serving = tokio::spawn(distribuidor.serve(listener, stop.clone()));
    let mut client = cliente::Client::connect(&addr).await.unwrap();
    for _ in 0..50 {
        let request = TaskRequest {
            notify: Some(false),
            ..task("hash", json!({"text": "drain"}))
        };
        client.send(&Request::Task(request)).await.unwrap();
    }
    // The first reply proves requests are in progress; then SIGTERM.
    let mut acked = Vec::new();
    if let Reply::Ack { task_id, .. } = next(&mut client).await {
        acked.push(task_id.to_string());
    }
    stop.cancel();
    // Requests in progress are answered, then the connection closes.
    loop {
        match tokio::time::timeout(LIMIT, client.recv())
            .await
            .expect("closed in time")
        {
            Ok(Some(Reply::Ack { task_id, .. })) => acked.push(task_id.to_string()),
            Ok(Some(other)) => panic!("expected only acks while draining, got {other:?}"),
            Ok(None) | Err(_) => break,
        }
    }
    tokio::time::timeout(LIMIT, serving)
        .await
        .expect("the server stopped")
        .unwrap();
    assert!(
        cliente::Client::connect(&addr).await.is_err(),
        "no new connections after shutdown"
    );
    let db = tareas_integration::db();
    for id in &acked {
        assert!(
            db.status(id).await.unwrap().is_some(),
            "acked task {id} was recorded"
        );
    }
    let queued = drain_queue(&deployment.queue).await.len();
    assert_eq!(
        queued,
        acked.len(),
        "every acked task, and only those, is in the queue"
    );
    deployment.stop().await;
}

/// Two submissions of one id race a RabbitMQ failure: A wrote the row and
/// its publish was refused, B found the row queued and its publish went
/// through. Whatever order their last writes come in, the row B was acked
/// on stays; A alone removes its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_submission_never_removes_a_row_another_one_published() {
    use tareas_common::db::Submission;
    use tareas_common::task::{TaskId, TaskKey};

    let db = tareas_integration::db();
    db.migrate().await.expect("migrate");
    let message = || TaskMessage {
        task_id: TaskId::generate().into(),
        task_type: "echo".into(),
        payload: json!({"text": "twice"}),
        notify: false,
    };
    let state = |id: TaskKey| {
        let db = db.clone();
        async move {
            db.status(id.as_str())
                .await
                .expect("status")
                .map(|r| r.state)
        }
    };
    for b_first in [true, false] {
        let task = message();
        let Submission::New(version) = db.insert_queued(&task).await.expect("A") else {
            panic!("A writes the row")
        };
        let b = db.insert_queued(&task).await.expect("B");
        assert!(matches!(b, Submission::Existing(_)), "{b:?}");
        if b_first {
            db.keep_queued(&task).await.expect("B keeps");
            db.forget_unpublished(task.task_id.as_str(), &version)
                .await
                .expect("A forgets");
        } else {
            db.forget_unpublished(task.task_id.as_str(), &version)
                .await
                .expect("A forgets");
            db.keep_queued(&task).await.expect("B keeps");
        }
        assert_eq!(
            state(task.task_id.clone()).await,
            Some(TaskState::Queued),
            "B's ack stands (B first: {b_first})"
        );
    }
    let alone = message();
    let Submission::New(version) = db.insert_queued(&alone).await.expect("insert") else {
        panic!("a new row")
    };
    db.forget_unpublished(alone.task_id.as_str(), &version)
        .await
        .expect("forget");
    assert_eq!(
        state(alone.task_id.clone()).await,
        None,
        "no row outlives a refusal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_the_finish_does_not_run_the_handler_again() {
    use tareas_common::amqp::{self, Envelope};
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let mut registry = Registry::new();
    let counted = runs.clone();
    registry.register_blocking("counted", move |payload| {
        let key = payload["key"].as_str().unwrap_or_default().to_owned();
        *counted.lock().expect("lock").entry(key).or_default() += 1;
        Ok(json!({"ok": true}))
    });
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.extra_task_types = vec!["counted".into()];
    let distribuidor = deployment.start_distribuidor(config).await;
    // One at a time, one message in hand: a marker task behind the
    // duplicates runs only after they were handled and acked.
    let mut worker = deployment.worker_config("w-once", 1);
    worker.prefetch = Some(1);
    deployment.start_worker_with(worker, registry);
    let mut client = distribuidor.client().await;
    let id = submit_ok(&mut client, task("counted", json!({"key": "k"}))).await;
    assert_eq!(next_result(&mut client).await.status, TaskState::Succeeded);
    // The same message again, twice, straight to the queue: what a publish
    // repeated by the outbox relay or a client's resubmission race delivers.
    let connection = tareas_integration::rabbitmq().await;
    let channel = amqp::confirm_channel(&connection).await.expect("channel");
    let message = TaskMessage {
        task_id: tareas_common::task::TaskId::parse(&id)
            .expect("task id")
            .into(),
        task_type: "counted".into(),
        payload: json!({"key": "k"}),
        notify: false,
    };
    let body = serde_json::to_vec(&message).expect("json");
    for _ in 0..2 {
        amqp::publish_persistent(&channel, &deployment.queue, &body, Envelope::default())
            .await
            .expect("published");
    }
    // A marker task behind them: once it ran, the duplicates were handled.
    submit_ok(&mut client, task("counted", json!({"key": "marker"}))).await;
    assert_eq!(next_result(&mut client).await.status, TaskState::Succeeded);
    let runs = runs.lock().expect("lock").clone();
    assert_eq!(runs.get("k"), Some(&1), "the handler ran once: {runs:?}");
    let _ = connection.close(200, "done".into()).await;
    deployment.stop().await;
}
