//! Every bad-input case gets a clear error reply, and hurts nobody else.

use serde_json::json;
use tareas_common::protocol::{ErrorCode, Reply, Request, TaskRequest};

use tareas_integration::{next, task, Deployment, LIMIT};

fn code(reply: &Reply) -> ErrorCode {
    match reply {
        Reply::Error(error) => error.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_request_gets_its_error_and_the_connection_goes_on() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let mut client = distribuidor.client().await;
    let cases: Vec<(&[u8], ErrorCode)> = vec![
        (b"this is not json\n", ErrorCode::InvalidJson),
        (
            b"{\"type\": \"task\", \"payload\": }\n",
            ErrorCode::InvalidJson,
        ),
        (b"[1, 2, 3]\n", ErrorCode::InvalidJson),
        (br#"{"task_type":"hash"}"#, ErrorCode::InvalidRequest),
        (br#"{"type":"launch"}"#, ErrorCode::InvalidRequest),
        (
            br#"{"type":"task","task_id":"has spaces","task_type":"hash","payload":{"text":"x"}}"#,
            ErrorCode::InvalidRequest,
        ),
        (
            br#"{"type":"task","task_type":"hash","payload":{"text":"x"},"notify":"yes"}"#,
            ErrorCode::InvalidRequest,
        ),
        (
            br#"{"type":"status","task_id":"bad id!"}"#,
            ErrorCode::InvalidRequest,
        ),
        (
            br#"{"type":"task","task_type":"mine","payload":{}}"#,
            ErrorCode::UnknownTaskType,
        ),
        (
            br#"{"type":"task","task_type":"fibonacci","payload":{"n":5000}}"#,
            ErrorCode::InvalidPayload,
        ),
        (
            br#"{"type":"task","task_type":"hash","payload":{"text":42}}"#,
            ErrorCode::InvalidPayload,
        ),
        (
            br#"{"type":"task","payload":{"text":"no type"}}"#,
            ErrorCode::InvalidPayload,
        ),
    ];
    for (input, expected) in cases {
        client.send_raw(input).await.unwrap();
        let reply = next(&mut client).await;
        assert_eq!(
            code(&reply),
            expected,
            "for {}",
            String::from_utf8_lossy(input)
        );
        if let Reply::Error(error) = &reply {
            assert!(!error.message.is_empty());
        }
        client.send(&Request::Ping).await.unwrap();
        assert_eq!(
            next(&mut client).await,
            Reply::Pong,
            "usable after {}",
            String::from_utf8_lossy(input)
        );
    }
    // A refused task carries its task_id.
    client
        .send(&Request::Task(TaskRequest {
            task_id: Some("mine-1".into()),
            ..task("mine", json!({}))
        }))
        .await
        .unwrap();
    let Reply::Error(error) = next(&mut client).await else {
        panic!("expected an error")
    };
    assert_eq!(error.task_id.as_deref(), Some("mine-1"));
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_closes_only_that_connection() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.max_message_bytes = 4096;
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut bystander = distribuidor.client().await;
    let mut client = distribuidor.client().await;
    let big = serde_json::to_vec(&Request::Task(task(
        "echo",
        json!({"text": "x".repeat(10_000)}),
    )))
    .unwrap();
    client.send_raw(&big).await.unwrap();
    assert_eq!(code(&next(&mut client).await), ErrorCode::TooLarge);
    let closed = tokio::time::timeout(LIMIT, client.recv())
        .await
        .expect("closed in time");
    assert!(
        matches!(closed, Ok(None) | Err(_)),
        "connection closed after too_large"
    );
    bystander.send(&Request::Ping).await.unwrap();
    assert_eq!(next(&mut bystander).await, Reply::Pong);
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_one_client_does_not_disturb_another() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let mut noisy = distribuidor.client().await;
    let mut quiet = distribuidor.client().await;
    // An unterminated object: the distribuidor waits for its end...
    noisy
        .send_raw(b"{\"type\":\"task\",\"payload\":\"")
        .await
        .unwrap();
    // ...while other clients are served as usual.
    quiet.send(&Request::Ping).await.unwrap();
    assert_eq!(next(&mut quiet).await, Reply::Pong);
    noisy
        .send_raw(&[0xff, 0xfe, b'"', b'}', b'\n'])
        .await
        .unwrap();
    assert_eq!(code(&next(&mut noisy).await), ErrorCode::InvalidJson);
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_means_unavailable_never_a_false_ack() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.broker.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    let distribuidor = deployment.start_distribuidor_unready(config).await;
    let mut client = distribuidor.client().await;
    let request = TaskRequest {
        task_id: Some(format!("nobroker-{}", uuid::Uuid::new_v4())),
        ..task("hash", json!({"text": "x"}))
    };
    client.send(&Request::Task(request.clone())).await.unwrap();
    let reply = next(&mut client).await;
    assert_eq!(code(&reply), ErrorCode::Unavailable, "{reply:?}");
    client.send(&Request::Health).await.unwrap();
    assert_eq!(
        next(&mut client).await,
        Reply::Health {
            ready: false,
            rabbitmq: false,
            postgres: true
        }
    );
    let id = request.task_id.unwrap();
    assert_eq!(
        tareas_integration::db().status(&id).await.unwrap(),
        None,
        "no row is left for a task that was not accepted"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_means_unavailable() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.database.database_url = "postgres://postgres@127.0.0.1:1/tareas".into();
    let distribuidor = deployment.start_distribuidor_unready(config).await;
    let mut client = distribuidor.client().await;
    client
        .send(&Request::Task(task("hash", json!({"text": "x"}))))
        .await
        .unwrap();
    assert_eq!(code(&next(&mut client).await), ErrorCode::Unavailable);
    client
        .send(&Request::Status {
            task_id: "x".into(),
        })
        .await
        .unwrap();
    assert_eq!(code(&next(&mut client).await), ErrorCode::Unavailable);
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_pipelined_twice_gets_both_acks_before_its_result_and_an_error_naming_it_harms_neither(
) {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-twice", 2));
    let mut client = distribuidor.client().await;
    let id = format!("twice-{}", deployment.queue);
    let submission = |payload| TaskRequest {
        task_id: Some(id.clone()),
        ..task("sleep", payload)
    };
    // The same id three times before any reply: a valid one, a bad one
    // naming it, and a valid twin.
    for payload in [
        json!({"ms": 300}),
        json!({"ms": "soon"}),
        json!({"ms": 300}),
    ] {
        client
            .send(&Request::Task(submission(payload)))
            .await
            .expect("send");
    }
    let mut replies = Vec::new();
    while !replies.iter().any(|r| matches!(r, Reply::Result(_))) {
        replies.push(next(&mut client).await);
    }
    let acked =
        |reply: &Reply| matches!(reply, Reply::Ack { task_id, .. } if task_id.as_str() == id);
    assert!(acked(&replies[0]), "{replies:?}");
    assert_eq!(code(&replies[1]), ErrorCode::InvalidPayload, "{replies:?}");
    assert!(acked(&replies[2]), "the twin is acked: {replies:?}");
    assert!(
        matches!(&replies[3], Reply::Result(report) if report.task_id.as_str() == id),
        "the result comes after both acks: {replies:?}"
    );
    deployment.stop().await;
}
