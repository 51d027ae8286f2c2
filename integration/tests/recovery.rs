//! The sweep that runs after every reconnect to RabbitMQ: awaited tasks that
//! finished meanwhile are pushed from PostgreSQL, the others keep waiting.

use serde_json::json;
use tareas_common::db::Finish;
use tareas_common::protocol::Reply;
use tareas_common::task::{TaskId, TaskMessage, TaskState};
use tareas_distribuidor::recovery;
use tareas_distribuidor::router::{self, Router};
use tokio_util::sync::CancellationToken;

fn message() -> TaskMessage {
    TaskMessage {
        task_id: TaskId::generate().into(),
        task_type: "echo".into(),
        payload: json!({"text": "hola"}),
        notify: true,
    }
}

/// Claims `task` and stores it succeeded, as a worker would.
async fn succeed(db: &tareas_common::db::Db, task: &TaskMessage) {
    db.claim(task, "w-sweep", false).await.expect("claim");
    db.finish(Finish {
        task_id: task.task_id.to_string(),
        state: TaskState::Succeeded,
        result: Some(json!({"text": "hola"})),
        error: None,
        worker_id: "w-sweep".into(),
        duration_ms: 1,
    })
    .await
    .expect("finish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_pushes_finished_tasks_and_keeps_waiting_for_the_rest() {
    let db = tareas_integration::db();
    db.migrate().await.expect("migrate");
    let (finished, queued) = (message(), message());
    for task in [&finished, &queued] {
        db.insert_queued(task).await.expect("insert");
    }
    succeed(&db, &finished).await;

    let router = Router::new();
    let (sender, mut pushed, _budget) = router::result_queue(
        1 << 20,
        std::sync::Arc::new(tareas_distribuidor::memory::Memory::new(1 << 20)),
    );
    router.subscribe(&finished.task_id, 1, &sender);
    router.subscribe(&queued.task_id, 1, &sender);
    let count = recovery::sweep(&router, &db, &CancellationToken::new()).await;

    assert_eq!(count, 1);
    let line = pushed.try_recv().expect("the finished task's result").line;
    let Ok(Reply::Result(report)) = serde_json::from_slice::<Reply>(&line) else {
        panic!("a result line: {line:?}");
    };
    assert_eq!(report.task_id, finished.task_id);
    assert_eq!(report.status, TaskState::Succeeded);
    assert_eq!(report.result, Some(json!({"text": "hola"})));
    assert!(pushed.try_recv().is_err(), "nothing for the queued task");
    assert_eq!(router.waiting(), vec![queued.task_id.clone()]);
}

/// The connection named `name`'s pid on the default node (`rabbitmqctl`).
fn connection_pid(name: &str) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&output.stdout);
    let pids: Vec<&str> = listing
        .lines()
        .filter(|line| line.contains(name))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(pids.len(), 1, "one connection named {name}: {listing}");
    pids[0].to_owned()
}

/// While RabbitMQ still holds a distribuidor's reply queue for another
/// connection, the link comes up with a reply queue of its own name; once
/// the name changes back, results of the tasks awaited from before are
/// looked up in PostgreSQL until they finish (none would arrive by AMQP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_reply_queue_gets_another_name_and_its_tasks_are_looked_up() {
    use tareas_distribuidor::broker::Broker;
    use tareas_integration::{topology, LIMIT};
    let db = tareas_integration::db();
    db.migrate().await.expect("migrate");
    let queue = format!("test-{}", uuid::Uuid::new_v4());
    let instance = uuid::Uuid::new_v4().simple().to_string();
    let url = tareas_worker::WorkerConfig::defaults().broker.amqp_url;
    let shutdown = CancellationToken::new();

    // A holds `<queue>.reply.<instance>`; B, the same instance, gets another name.
    let holder_stop = shutdown.child_token();
    let (holder, holder_link) = Broker::start(
        url.clone(),
        topology(&queue),
        std::sync::Arc::new(Router::new()),
        instance.clone(),
        holder_stop.clone(),
    );
    tokio::time::timeout(LIMIT, holder.wait_connected())
        .await
        .expect("A connects");
    let base = holder.reply_queue().expect("A's reply queue");
    let router = std::sync::Arc::new(Router::new());
    let (broker, _) = Broker::start(
        url.clone(),
        topology(&queue),
        router.clone(),
        instance.clone(),
        shutdown.child_token(),
    );
    tokio::time::timeout(LIMIT, broker.wait_connected())
        .await
        .expect("B connects");
    let own = broker.reply_queue().expect("B's reply queue");
    assert!(
        own.starts_with(&format!("{base}.")),
        "{own} is not a name of its own next to {base}"
    );
    tokio::spawn(recovery::run(
        broker.clone(),
        router.clone(),
        db.clone(),
        shutdown.clone(),
    ));

    // A task B's client awaits, still queued.
    let task = message();
    db.insert_queued(&task).await.expect("insert");
    let (sender, mut pushed, _budget) = router::result_queue(
        1 << 20,
        std::sync::Arc::new(tareas_distribuidor::memory::Memory::new(1 << 20)),
    );
    router.subscribe(&task.task_id, 1, &sender);

    // A goes (its connection closed, its queue with it); B's connection is
    // cut and comes back with the base name.
    holder_stop.cancel();
    tokio::time::timeout(LIMIT, holder_link)
        .await
        .expect("A closes")
        .expect("A's supervisor");
    let mut connects = broker.connects();
    connects.borrow_and_update();
    let pid = connection_pid(&format!("distribuidor-{instance}"));
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &pid, "test: reconnect"])
        .status()
        .expect("rabbitmqctl");
    assert!(closed.success());
    tokio::time::timeout(LIMIT, async {
        while broker.reply_queue().as_deref() != Some(base.as_str()) {
            connects.changed().await.expect("the link supervisor runs");
        }
    })
    .await
    .expect("B takes the base name back");

    // The task finishes after the reconnect, with no result sent by AMQP:
    // it reaches the client from PostgreSQL. (Should the reconnect's own
    // sweep run after this, it pushes the result instead; the test then
    // proves less but does not fail. Without the orphans' sweep it fails.)
    succeed(&db, &task).await;
    let line = tokio::time::timeout(LIMIT, pushed.recv())
        .await
        .expect("the orphan's result within the limit")
        .expect("a pushed line")
        .line;
    let Ok(Reply::Result(report)) = serde_json::from_slice::<Reply>(&line) else {
        panic!("a result line: {line:?}");
    };
    assert_eq!(report.task_id, task.task_id);
    shutdown.cancel();
    tareas_integration::delete_queues(&queue).await;
}
