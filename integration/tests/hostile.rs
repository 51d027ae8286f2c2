//! One careless or hostile client never hurts another: each test measures a
//! well-behaved bystander while a bad client misbehaves.

use serde_json::json;
use tareas_common::amqp::{self, Envelope};
use tareas_common::protocol::{ErrorCode, Reply, Request};
use tareas_common::task::{TaskId, TaskMessage, TaskState};
use tareas_common::topology::Topology;

use tareas_integration::{
    next, next_result, submit_ok, task, wait_for_ready_messages, Deployment, DistribuidorProcess,
};

/// Pipelines `count` requests on one connection and gathers every reply
/// (acks, results and errors) until each task has its ack or error and,
/// when acked, its result.
async fn pipeline(client: &mut cliente::Client, requests: Vec<Request>) -> Vec<Reply> {
    let count = requests.len();
    for request in &requests {
        client.send(request).await.expect("send");
    }
    let mut replies = Vec::new();
    let (mut answered, mut acked, mut results) = (0, 0, 0);
    while answered < count || results < acked {
        let reply = next(client).await;
        match &reply {
            Reply::Ack { .. } => {
                answered += 1;
                acked += 1;
            }
            Reply::Error(_) => answered += 1,
            Reply::Result(_) => results += 1,
            other => panic!("unexpected {other:?}"),
        }
        replies.push(reply);
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_payloads_are_refused_and_fail_nobody_else() {
    let mut deployment = Deployment::new().await;
    let distribuidor =
        DistribuidorProcess::start(&deployment.queue, &[("TAREAS_EXTRA_TASK_TYPES", "mine")]).await;
    deployment.start_worker(deployment.worker_config("w-nul", 4));
    let (mut bad, mut bystander) = (distribuidor.client().await, distribuidor.client().await);
    let nul: Vec<Request> = (0..500)
        .map(|i| match i % 3 {
            0 => Request::Task(task("echo", json!({"text": format!("a\u{0}{i}")}))),
            1 => Request::Task(task("hash", json!({"text": "\u{0}"}))),
            _ => Request::Task(task("mine", json!({"nested": [{"k\u{0}": i}]}))),
        })
        .collect();
    let good: Vec<Request> = (0..500)
        .map(|i| Request::Task(task("hash", json!({"text": format!("hola {i}")}))))
        .collect();
    let (bad_replies, good_replies) =
        tokio::join!(pipeline(&mut bad, nul), pipeline(&mut bystander, good));

    let refused = bad_replies
        .iter()
        .filter(|r| matches!(r, Reply::Error(e) if e.code == ErrorCode::InvalidPayload))
        .count();
    assert_eq!(refused, 500, "every NUL task is invalid_payload");
    let acks = good_replies
        .iter()
        .filter(|r| matches!(r, Reply::Ack { .. }))
        .count();
    let succeeded = good_replies
        .iter()
        .filter(|r| matches!(r, Reply::Result(report) if report.status == TaskState::Succeeded))
        .count();
    assert_eq!((acks, succeeded), (500, 500), "the bystander is unharmed");
    let log = distribuidor.log();
    assert!(
        !log.contains("PostgreSQL is unavailable"),
        "the log blames PostgreSQL for a client's data:\n{log}"
    );
    distribuidor.stop().await;
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_task_published_straight_to_the_queue_is_dead_lettered() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    deployment.start_worker(deployment.worker_config("w-nul", 2));
    let connection = tareas_integration::rabbitmq().await;
    let channel = amqp::confirm_channel(&connection).await.expect("channel");
    let topology = Topology::new(&deployment.queue);
    topology.declare(&channel).await.expect("declare");
    let poison = TaskMessage {
        task_id: TaskId::generate(),
        task_type: "echo".into(),
        payload: json!({"text": "a\u{0}b"}),
        notify: false,
    };
    let body = serde_json::to_vec(&poison).expect("json");
    amqp::publish_persistent(&channel, &topology.queue, &body, Envelope::default())
        .await
        .expect("published");
    wait_for_ready_messages(&topology.dead_letter_queue(), 1).await;
    // The worker goes on.
    let mut client = distribuidor.client().await;
    submit_ok(&mut client, task("hash", json!({"text": "after"}))).await;
    assert_eq!(next_result(&mut client).await.status, TaskState::Succeeded);
    let _ = connection.close(200, "done".into()).await;
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_message_does_not_swallow_the_next_ones() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let (mut bad, mut bystander) = (distribuidor.client().await, distribuidor.client().await);
    bad.send_raw(b"{\"type\": \"task\", \n{\"type\":\"ping\"}")
        .await
        .expect("send");
    let first = next(&mut bad).await;
    assert!(
        matches!(&first, Reply::Error(e) if e.code == ErrorCode::InvalidJson),
        "{first:?}"
    );
    assert_eq!(
        next(&mut bad).await,
        Reply::Pong,
        "the ping after it is answered"
    );
    bystander.send(&Request::Ping).await.expect("send");
    assert_eq!(next(&mut bystander).await, Reply::Pong);
    // The input ends inside an object: still an answer.
    bad.send_raw(b"{\"type\":\"pi").await.expect("send");
    bad.finish_sending().await.expect("shutdown");
    let last = next(&mut bad).await;
    assert!(
        matches!(&last, Reply::Error(e) if e.code == ErrorCode::InvalidJson),
        "{last:?}"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_are_refused_naming_the_limit() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.max_text_bytes = 8;
    config.limits.max_sum_numbers = 3;
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut client = distribuidor.client().await;
    for (request, limit) in [
        (
            task("reverse", json!({"text": "123456789"})),
            "TAREAS_MAX_TEXT_BYTES",
        ),
        (
            task("sum", json!({"numbers": [1, 2, 3, 4]})),
            "TAREAS_MAX_SUM_NUMBERS",
        ),
    ] {
        client.send(&Request::Task(request)).await.expect("send");
        match next(&mut client).await {
            Reply::Error(e) if e.code == ErrorCode::InvalidPayload => {
                assert!(e.message.contains(limit), "{}", e.message);
            }
            other => panic!("expected invalid_payload, got {other:?}"),
        }
    }
    client.send(&Request::Ping).await.expect("send");
    assert_eq!(
        next(&mut client).await,
        Reply::Pong,
        "the connection goes on"
    );
    deployment.stop().await;
}
