//! One careless or hostile client never hurts another: each test measures a
//! well-behaved bystander while a bad client misbehaves.

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::json;
use tareas_common::amqp::{self, Envelope};
use tareas_common::protocol::{ErrorCode, Reply, Request};
use tareas_common::task::{TaskId, TaskMessage, TaskState};

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
    let topology = tareas_integration::topology(&deployment.queue);
    topology.declare(&connection).await.expect("declare");
    let poison = TaskMessage {
        task_id: TaskId::generate().into(),
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

/// Reads replies until the server closes the connection; returns them.
async fn read_to_end(client: &mut cliente::Client) -> Vec<Reply> {
    let mut replies = Vec::new();
    loop {
        match tokio::time::timeout(tareas_integration::LIMIT, client.recv()).await {
            Ok(Ok(Some(reply))) => replies.push(reply),
            Ok(Ok(None)) | Ok(Err(_)) => return replies,
            Err(_) => panic!(
                "the server never closed the connection; got {} replies",
                replies.len()
            ),
        }
    }
}

fn is_error(reply: &Reply, code: ErrorCode) -> bool {
    matches!(reply, Reply::Error(e) if e.code == code)
}

/// Pings on `client` `count` times, one at a time; returns the p99 in ms.
async fn ping_p99(client: &mut cliente::Client, count: usize) -> f64 {
    let mut millis = Vec::with_capacity(count);
    for _ in 0..count {
        let started = std::time::Instant::now();
        client.send(&Request::Ping).await.expect("send");
        assert_eq!(next(client).await, Reply::Pong);
        millis.push(started.elapsed().as_secs_f64() * 1e3);
    }
    millis.sort_by(f64::total_cmp);
    millis[(count * 99 / 100).min(count - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_past_the_output_limit_closes_with_slow_consumer() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.max_output_bytes = 4096; // one fibonacci(1000) result is ~100 KiB
    let distribuidor = deployment.start_distribuidor(config).await;
    deployment.start_worker(deployment.worker_config("w-slow", 2));
    let mut client = distribuidor.client().await;
    let id = submit_ok(&mut client, task("fibonacci", json!({"n": 1000}))).await;
    let replies = read_to_end(&mut client).await;
    assert!(
        replies.iter().any(|r| is_error(r, ErrorCode::SlowConsumer)),
        "{replies:?}"
    );
    // The result is not lost: `status` has it.
    let mut other = distribuidor.client().await;
    let done = tareas_integration::wait_for_status(&mut other, &id, |r| {
        matches!(
            r,
            Reply::Status {
                state: tareas_common::protocol::StatusState::Succeeded,
                ..
            }
        )
    })
    .await;
    assert!(matches!(
        done,
        Reply::Status {
            result: Some(_),
            ..
        }
    ));
    deployment.stop().await;
}

/// A client with a 4 KiB receive buffer, so that what it does not read
/// stays with the server instead of in its own kernel.
async fn tight_client(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket.connect(addr).await.expect("connect")
}

/// The pool of bytes all connections share, as the slow-reader test sets it.
const TEST_BUFFERED_BYTES: u64 = 32 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_are_closed_and_a_bystander_is_served() {
    use tokio::io::AsyncWriteExt;
    const CLIENTS: usize = 20;
    const TASKS: usize = 1100;
    const ROUND: usize = 50;
    let mut deployment = Deployment::new().await;
    let distribuidor = DistribuidorProcess::start(
        &deployment.queue,
        &[
            ("TAREAS_MAX_OUTSTANDING_PER_CLIENT", "0"),
            (
                "TAREAS_MAX_BUFFERED_BYTES",
                &TEST_BUFFERED_BYTES.to_string(),
            ),
        ],
    )
    .await;
    let baseline = distribuidor.peak_resident_bytes();
    deployment.start_worker(deployment.worker_config("w-slow-1", 4));
    deployment.start_worker(deployment.worker_config("w-slow-2", 4));
    let addr = distribuidor.addr.parse().expect("addr");
    let mut bad = Vec::new();
    for _ in 0..CLIENTS {
        bad.push(tight_client(addr).await);
    }
    // In rounds, so that every client's results come in at once; the server
    // reads all of it (~100 KB each): its limits are on what it holds.
    for round in 0..TASKS / ROUND {
        for (c, stream) in bad.iter_mut().enumerate() {
            let mut requests = Vec::new();
            for i in round * ROUND..(round + 1) * ROUND {
                let mut request = task("fibonacci", json!({"n": 1000}));
                request.task_id = Some(format!("slow-{}-{c}-{i}", deployment.queue));
                requests.extend(serde_json::to_vec(&Request::Task(request)).expect("json"));
                requests.push(b'\n');
            }
            stream.write_all(&requests).await.expect("send");
        }
    }
    let mut bystander = distribuidor.client().await;
    let p99 = ping_p99(&mut bystander, 1000).await;
    println!("bystander ping p99 while {CLIENTS} clients do not read: {p99:.2} ms");
    // The server closes each, as its log says, though none read a byte:
    // ~118 MB of results each, against 16 MiB per connection, 32 MiB for
    // all of them and a 30 s write deadline. It takes several hundred
    // results (each first fills its socket's kernel buffer), which
    // debug-built workers on a shared machine produce slowly.
    let within = std::time::Duration::from_secs(240);
    distribuidor
        .wait_for_log("slow_consumer", CLIENTS, within)
        .await;
    let log = distribuidor.log();
    for stream in &bad {
        let peer = format!("peer={}", stream.local_addr().expect("addr"));
        assert!(
            log.lines()
                .any(|line| line.contains(&peer) && line.contains("slow_consumer")),
            "{peer} was not closed as a slow consumer"
        );
    }
    let peak = distribuidor.peak_resident_bytes();
    println!(
        "distribuidor peak resident: {} MiB ({} MiB at start, pool {} MiB)",
        peak >> 20,
        baseline >> 20,
        TEST_BUFFERED_BYTES >> 20
    );
    // The bound docs/reliability.md states: the process at rest, twice the
    // pool (the allocator keeps freed result buffers for reuse), and 2 KiB
    // per task a connection waits for (its subscription, its submission).
    let awaited = (CLIENTS * TASKS) as u64;
    let bound = baseline + 2 * TEST_BUFFERED_BYTES + 2048 * awaited;
    assert!(peak < bound, "peak {peak} past the bound {bound}");
    bystander.send(&Request::Ping).await.expect("send");
    assert_eq!(next(&mut bystander).await, Reply::Pong);
    distribuidor.stop().await;
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_trickled_in_is_cut_off_and_whitespace_is_not_activity() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.message_timeout_secs = 1;
    config.limits.idle_timeout_secs = 1;
    let distribuidor = deployment.start_distribuidor(config).await;
    for (start, trickle, code) in [
        (&b"{\"type\":"[..], b" ", ErrorCode::RequestTimeout),
        (&b" "[..], b" ", ErrorCode::IdleTimeout),
    ] {
        let mut loris = distribuidor.client().await;
        loris.send_raw(start).await.expect("send");
        let trickling = async {
            // One byte every 200 ms, for longer than either timeout.
            for _ in 0..25 {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                if loris.send_raw(trickle).await.is_err() {
                    break;
                }
            }
        };
        trickling.await;
        let replies = read_to_end(&mut loris).await;
        assert!(
            replies.iter().any(|r| is_error(r, code)),
            "{code:?}: {replies:?}"
        );
        // A bystander (new: with a 1 s idle limit an old one would idle out).
        let mut bystander = distribuidor.client().await;
        bystander.send(&Request::Ping).await.expect("send");
        assert_eq!(next(&mut bystander).await, Reply::Pong);
    }
    let mut fresh = distribuidor.client().await;
    fresh.send(&Request::Ping).await.expect("send");
    assert_eq!(
        next(&mut fresh).await,
        Reply::Pong,
        "a new client is served"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_error_reaches_a_client_that_keeps_sending() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.max_message_bytes = 1024;
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut client = distribuidor.client().await;
    let mut big = b"{\"type\":\"task\",\"payload\":\"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 64 * 1024));
    // More than the limit, and the client goes on sending after it.
    let _ = client.send_raw(&big).await;
    let _ = client.send_raw(&big).await;
    let replies = read_to_end(&mut client).await;
    assert!(
        replies.iter().any(|r| is_error(r, ErrorCode::TooLarge)),
        "the error line was not lost to a reset: {replies:?}"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_queue_full_and_keeps_no_row() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.broker.queue_max_length = 3;
    let distribuidor = deployment.start_distribuidor(config).await;
    let mut client = distribuidor.client().await;
    // RabbitMQ's quorum queues take up to one message past the limit.
    let mut acked = 0;
    let refused = loop {
        let mut request = task("hash", json!({"text": "fill"}));
        let id = format!("full-{acked}-{}", deployment.queue);
        request.task_id = Some(id.clone());
        client.send(&Request::Task(request)).await.expect("send");
        match next(&mut client).await {
            Reply::Ack { .. } => acked += 1,
            reply => {
                assert!(is_error(&reply, ErrorCode::QueueFull), "{reply:?}");
                break id;
            }
        }
        assert!(acked <= 4, "the queue took {acked} of at most 3 (+1)");
    };
    assert!(acked >= 3, "refused before the limit: {acked}");
    let row = tareas_integration::db()
        .status(&refused)
        .await
        .expect("status");
    assert!(row.is_none(), "a refused task leaves no row: {row:?}");
    // Nothing else changed: the connection goes on.
    client.send(&Request::Ping).await.expect("send");
    assert_eq!(next(&mut client).await, Reply::Pong);
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_created_unbounded_is_used_as_it_is() {
    let deployment = Deployment::new().await;
    let connection = tareas_integration::rabbitmq().await;
    let unbounded = tareas_common::topology::Topology::new(&deployment.queue);
    unbounded
        .declare(&connection)
        .await
        .expect("an older deployment");
    let bounded = tareas_integration::topology(&deployment.queue);
    assert!(bounded.max_length.is_some());
    bounded
        .declare(&connection)
        .await
        .expect("the bounded declare falls back to the queue as it is");
    let _ = connection.close(200, "done".into()).await;
    deployment.stop().await;
}

/// Declares durable queue `name` with `arguments` on `channel`.
async fn declare_with(channel: &lapin::Channel, name: &str, arguments: &[(&str, AMQPValue)]) {
    let mut table = FieldTable::default();
    for (key, value) in arguments {
        table.insert((*key).into(), value.clone());
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), durable, table)
        .await
        .expect("declare");
}

/// The queues of the previous version (no `x-quorum-initial-group-size`)
/// are used as they are, retry queues too; a work queue of another type, or
/// with its own delivery limit behind another maximum length, is refused
/// rather than used as if it were what this version declares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_of_an_older_version_are_used_and_other_differences_are_refused() {
    let deployment = Deployment::new().await;
    let connection = tareas_integration::rabbitmq().await;
    let topology = tareas_integration::topology(&deployment.queue);
    let channel = connection.create_channel().await.expect("channel");
    let string = |text: &str| AMQPValue::LongString(LongString::from(text));
    let quorum = ("x-queue-type", string("quorum"));
    let max = i64::try_from(topology.max_length.expect("bounded")).expect("fits");
    let work = [
        quorum.clone(),
        ("x-delivery-limit", AMQPValue::LongLongInt(20)),
        (
            "x-dead-letter-exchange",
            string(&topology.dead_letter_exchange()),
        ),
        ("x-max-length", AMQPValue::LongLongInt(max)),
        ("x-overflow", string("reject-publish")),
    ];
    declare_with(&channel, &topology.queue, &work).await;
    declare_with(
        &channel,
        &topology.dead_letter_queue(),
        std::slice::from_ref(&quorum),
    )
    .await;
    let retry = [
        quorum,
        ("x-message-ttl", AMQPValue::LongLongInt(1000)),
        ("x-dead-letter-exchange", string("")),
        ("x-dead-letter-routing-key", string(&topology.queue)),
        ("x-dead-letter-strategy", string("at-least-once")),
        ("x-overflow", string("reject-publish")),
    ];
    declare_with(&channel, &topology.retry_queue(1000), &retry).await;

    topology
        .declare(&connection)
        .await
        .expect("the older queues are used");
    let retry_queue = topology
        .declare_retry_queue(&connection, 1000)
        .await
        .expect("the older retry queue is used");
    assert_eq!(retry_queue, topology.retry_queue(1000));

    let classic = tareas_integration::topology(&format!("{}-classic", deployment.queue));
    declare_with(&channel, &classic.queue, &[]).await;
    let refused = classic.declare(&connection).await;
    assert!(
        refused.is_err(),
        "a classic work queue must not be used as if it were a quorum queue"
    );
    // Another maximum length is kept; the delivery limit RabbitMQ compares
    // after it still counts.
    let limited = tareas_integration::topology(&format!("{}-limited", deployment.queue));
    let channel = connection.create_channel().await.expect("channel");
    let own_limit = [
        ("x-queue-type", string("quorum")),
        ("x-delivery-limit", AMQPValue::LongLongInt(5)),
        (
            "x-dead-letter-exchange",
            string(&limited.dead_letter_exchange()),
        ),
        ("x-max-length", AMQPValue::LongLongInt(7)),
        ("x-overflow", string("reject-publish")),
    ];
    declare_with(&channel, &limited.queue, &own_limit).await;
    let refused = limited.declare(&connection).await;
    assert!(
        refused.is_err(),
        "a work queue with its own delivery limit must not be used"
    );
    let cleanup = connection.create_channel().await.expect("channel");
    for queue in [
        topology.retry_queue(1000),
        classic.queue.clone(),
        classic.dead_letter_queue(),
        limited.queue.clone(),
        limited.dead_letter_queue(),
    ] {
        let _ = cleanup
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_past_its_quota_is_refused_and_a_bystander_is_served() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.limits.max_outstanding_per_client = 5;
    let distribuidor = deployment.start_distribuidor(config).await;
    // No worker yet: every acked task stays outstanding.
    let mut greedy = distribuidor.client().await;
    for i in 0..8 {
        let request = Request::Task(task("sleep", json!({"ms": 10 + i})));
        greedy.send(&request).await.expect("send");
    }
    let mut replies = Vec::new();
    for _ in 0..8 {
        replies.push(next(&mut greedy).await);
    }
    let acked = replies
        .iter()
        .filter(|r| matches!(r, Reply::Ack { .. }))
        .count();
    let over = replies
        .iter()
        .filter(|r| is_error(r, ErrorCode::QuotaExceeded))
        .count();
    assert_eq!((acked, over), (5, 3), "{replies:?}");
    greedy.send(&Request::Ping).await.expect("send");
    assert_eq!(
        next(&mut greedy).await,
        Reply::Pong,
        "the connection stays usable"
    );

    // Another client (another address) is not held back by the first's quota.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let stream = socket.connect(distribuidor.addr).await.expect("connect");
    let mut bystander = cliente::Client::over(stream).expect("client");
    submit_ok(&mut bystander, task("hash", json!({"text": "mine"}))).await;
    deployment.start_worker(deployment.worker_config("w-quota", 4));
    assert_eq!(
        next_result(&mut bystander).await.status,
        TaskState::Succeeded
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_balancer_each_client_has_its_own_quota() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let deployment = Deployment::new().await;
    let distribuidor = DistribuidorProcess::start_with_probe(
        &deployment.queue,
        &[
            ("TAREAS_PROXY_PROTOCOL", "true"),
            ("TAREAS_MAX_OUTSTANDING_PER_CLIENT", "1"),
            ("RUST_LOG", "info,tareas_distribuidor=debug"),
        ],
        Some(proxied("203.0.113.250:1")),
    )
    .await;
    let addr: std::net::SocketAddr = distribuidor.addr.parse().expect("addr");
    // What HAProxy's send-proxy-v2 does: a header naming the client, then
    // the client's bytes. Both clients come from 127.0.0.1 here.
    let connect = |client: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.write_all(&proxied(client)).await.expect("header");
        tokio::io::BufReader::new(stream)
    };
    let request = |id: &str| {
        let mut request = task("sleep", json!({"ms": 1}));
        request.task_id = Some(format!("{id}-{}", deployment.queue));
        let mut line = serde_json::to_vec(&Request::Task(request)).expect("json");
        line.push(b'\n');
        line
    };
    let reply = |line: String| -> Reply { serde_json::from_str(&line).expect("a reply") };
    let mut busy = connect("203.0.113.1:5000").await;
    let mut bystander = connect("203.0.113.2:5000").await;
    let mut lines = Vec::new();
    for (which, id) in [(0, "a1"), (0, "a2"), (1, "b1")] {
        let stream = if which == 0 {
            &mut busy
        } else {
            &mut bystander
        };
        stream
            .get_mut()
            .write_all(&request(id))
            .await
            .expect("send");
        let mut line = String::new();
        tokio::time::timeout(tareas_integration::LIMIT, stream.read_line(&mut line))
            .await
            .expect("a reply in time")
            .expect("read");
        lines.push(reply(line));
    }
    assert!(matches!(lines[0], Reply::Ack { .. }), "{:?}", lines[0]);
    assert!(
        is_error(&lines[1], ErrorCode::QuotaExceeded),
        "{:?}",
        lines[1]
    );
    assert!(
        matches!(lines[2], Reply::Ack { .. }),
        "the bystander has its own quota: {:?}",
        lines[2]
    );
    // The log names the client, not the balancer.
    distribuidor
        .wait_for_log("peer=203.0.113.1:5000", 1, tareas_integration::LIMIT)
        .await;
    // A connection from the host itself without a header (a container's
    // healthcheck) is served as what it is; a malformed header is refused.
    let mut local = distribuidor.client().await;
    local.send(&Request::Health).await.expect("send");
    assert!(matches!(next(&mut local).await, Reply::Health { .. }));
    let mut broken = distribuidor.client().await;
    broken
        .send_raw(b"PROXY TCP4 nonsense\r\n")
        .await
        .expect("send");
    let refused = read_to_end(&mut broken).await;
    assert!(
        refused
            .iter()
            .any(|r| is_error(r, ErrorCode::InvalidRequest)),
        "{refused:?}"
    );
    distribuidor.stop().await;
    deployment.stop().await;
}

/// The PROXY v2 header a balancer sends for `client`.
fn proxied(client: &str) -> Vec<u8> {
    tareas_distribuidor::proxy::v2_header(
        client.parse().expect("client address"),
        "127.0.0.1:8888".parse().expect("server address"),
    )
}
