//! The path of a task: ack, result, PostgreSQL, S3; idempotency; status; pipelining.

use serde_json::json;
use tareas_common::builtin;
use tareas_common::protocol::{Reply, Request, StatusState, TaskRequest};
use tareas_common::task::TaskState;

use tareas_integration::{
    self, next, next_result, s3_document, submit_ok, task, wait_for_status, Deployment, LIMIT,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_type_is_acked_run_and_stored() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-all", 4));

    let summary = cliente::demo::run(
        &cliente::Endpoint::anonymous(distribuidor.addr.to_string()),
        LIMIT,
        false,
    )
    .await
    .expect("demo run");
    assert_eq!(summary.acked, builtin::ALL.len());
    assert!(summary.errors.is_empty(), "{:?}", summary.errors);
    for task_type in builtin::ALL {
        let report = &summary.results[task_type];
        assert_eq!(
            report.status,
            TaskState::Succeeded,
            "{task_type}: {report:?}"
        );
        assert_eq!(report.worker_id.as_deref(), Some("w-all"));
        let row = tareas_integration::db()
            .status(report.task_id.as_str())
            .await
            .unwrap()
            .expect("row in PostgreSQL");
        assert_eq!(row.state, TaskState::Succeeded);
        assert_eq!(
            row.result, report.result,
            "{task_type}: PostgreSQL holds the pushed result"
        );
        let document = s3_document(report.task_id.as_str())
            .await
            .expect("object in S3");
        assert_eq!(document["state"], "succeeded");
        assert_eq!(document["task_type"], task_type);
        assert_eq!(
            Some(&document["result"]),
            report.result.as_ref(),
            "{task_type}: S3 holds the pushed result"
        );
    }
    let hash = summary.results["hash"].result.clone().unwrap();
    assert_eq!(
        hash["sha256"],
        "b221d9dbb083a7f33428d7c2a3c3198ae925614d70210e28716ccaa7cd4ddb79"
    );
    assert_eq!(
        summary.results["reverse"].result.clone().unwrap()["text"],
        "!odnum ,aloH¡"
    );
    assert_eq!(
        summary.results["sum"].result.clone().unwrap()["sum"],
        json!(10.5)
    );
    assert_eq!(
        summary.results["echo"].result.clone().unwrap()["text"],
        "Renderizar escena"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn course_clients_without_newline_or_task_type_work() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-course", 2));
    let mut client = distribuidor.client().await;
    // What `sock.send(json.dumps(msg).encode())` sends: no newline.
    client
        .send_raw(br#"{"type": "task", "payload": "Renderizar escena"}"#)
        .await
        .unwrap();
    let Reply::Ack { task_id, status } = next(&mut client).await else {
        panic!("expected an ack")
    };
    assert_eq!(status, TaskState::Queued);
    let report = next_result(&mut client).await;
    assert_eq!(report.task_id, task_id.into());
    assert_eq!(report.result, Some(json!({"text": "Renderizar escena"})));
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmitting_a_task_id_runs_it_once() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-idem", 4));
    let mut client = distribuidor.client().await;
    let id = format!("idem-{}", uuid::Uuid::new_v4());
    let request = TaskRequest {
        task_id: Some(id.clone()),
        ..task("hash", json!({"text": "una vez"}))
    };

    // Twice back to back, pipelined: two acks, one run, one result push.
    client.send(&Request::Task(request.clone())).await.unwrap();
    client.send(&Request::Task(request.clone())).await.unwrap();
    let mut acks = 0;
    let mut results = Vec::new();
    while acks < 2 || results.is_empty() {
        match next(&mut client).await {
            Reply::Ack { task_id, .. } => {
                assert_eq!(task_id.as_str(), id);
                acks += 1;
            }
            Reply::Result(report) => results.push(report),
            other => panic!("unexpected {other:?}"),
        }
    }
    let first_document = s3_document(&id).await.expect("object in S3");

    // Once more after it finished: acked, answered from the store, not rerun.
    assert_eq!(submit_ok(&mut client, request).await, id);
    let again = next_result(&mut client).await;
    assert_eq!(again.result, results[0].result);
    let document = s3_document(&id).await.expect("object in S3");
    assert_eq!(document, first_document, "the S3 object did not change");
    assert_eq!(document["attempts"], 1, "the task ran once");
    client.send(&Request::Ping).await.unwrap();
    assert_eq!(
        next(&mut client).await,
        Reply::Pong,
        "no second result was pushed"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_goes_through_every_state() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let mut client = distribuidor.client().await;

    client
        .send(&Request::Status {
            task_id: "never-submitted".into(),
        })
        .await
        .unwrap();
    let Reply::Status { state, .. } = next(&mut client).await else {
        panic!("expected status")
    };
    assert_eq!(state, StatusState::Unknown);

    // No worker yet: acked means queued, never unknown.
    let slow = submit_ok(&mut client, task("sleep", json!({"ms": 1500}))).await;
    client
        .send(&Request::Status {
            task_id: slow.clone(),
        })
        .await
        .unwrap();
    let Reply::Status { state, .. } = next(&mut client).await else {
        panic!("expected status")
    };
    assert_eq!(state, StatusState::Queued);
    let too_slow = submit_ok(&mut client, task("sleep", json!({"ms": 5000}))).await;

    let mut config = deployment.worker_config("w-status", 2);
    config.task_time_limits = vec!["sleep=3".parse().unwrap()];
    deployment.start_worker(config);
    let mut observer = distribuidor.client().await;
    wait_for_status(&mut observer, &slow, |r| {
        matches!(
            r,
            Reply::Status {
                state: StatusState::Running,
                ..
            }
        )
    })
    .await;
    let done = wait_for_status(&mut observer, &slow, |r| {
        matches!(
            r,
            Reply::Status {
                state: StatusState::Succeeded,
                ..
            }
        )
    })
    .await;
    let Reply::Status { result, .. } = done else {
        unreachable!()
    };
    assert_eq!(result, Some(json!({"slept_ms": 1500})));
    let failed = wait_for_status(&mut observer, &too_slow, |r| {
        matches!(
            r,
            Reply::Status {
                state: StatusState::Failed,
                ..
            }
        )
    })
    .await;
    let Reply::Status { error, .. } = failed else {
        unreachable!()
    };
    assert!(error.unwrap_or_default().contains("time limit"));
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_get_ordered_acks_and_every_result() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-pipe", 4));
    let mut client = distribuidor.client().await;
    let ids: Vec<String> = (0..100)
        .map(|i| format!("pipe-{i}-{}", uuid::Uuid::new_v4()))
        .collect();
    let mut burst = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let request = Request::Task(TaskRequest {
            task_id: Some(id.clone()),
            ..task("reverse", json!({"text": format!("n{i}")}))
        });
        burst.extend(serde_json::to_vec(&request).unwrap());
        if i % 2 == 0 {
            burst.push(b'\n');
        }
    }
    client.send_raw(&burst).await.unwrap();
    let mut acked = Vec::new();
    let mut results = std::collections::HashMap::new();
    while acked.len() < ids.len() || results.len() < ids.len() {
        match next(&mut client).await {
            Reply::Ack { task_id, .. } => acked.push(task_id.to_string()),
            Reply::Result(report) => {
                assert!(
                    acked.contains(&report.task_id.to_string()),
                    "result before its ack"
                );
                results.insert(report.task_id.to_string(), report);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acked, ids, "acks come in request order");
    for (i, id) in ids.iter().enumerate() {
        let expected: String = format!("n{i}").chars().rev().collect();
        assert_eq!(results[id].result, Some(json!({"text": expected})));
    }
    deployment.stop().await;
}
