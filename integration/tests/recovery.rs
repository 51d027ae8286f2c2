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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_pushes_finished_tasks_and_keeps_waiting_for_the_rest() {
    let db = tareas_integration::db();
    db.migrate().await.expect("migrate");
    let (finished, queued) = (message(), message());
    for task in [&finished, &queued] {
        db.insert_queued(task).await.expect("insert");
    }
    db.claim(&finished, "w-sweep", false).await.expect("claim");
    db.finish(Finish {
        task_id: finished.task_id.to_string(),
        state: TaskState::Succeeded,
        result: Some(json!({"text": "hola"})),
        error: None,
        worker_id: "w-sweep".into(),
        duration_ms: 1,
    })
    .await
    .expect("finish");

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
