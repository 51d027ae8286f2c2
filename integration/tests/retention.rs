//! Result retention: a finished task past `TAREAS_RESULT_TTL` loses its S3
//! object and its row, and its status then answers `expired`; a task
//! still waiting to run is never removed.

use std::time::Duration;

use serde_json::json;
use tareas_common::protocol::{Reply, Request, StatusState};
use tareas_integration::{next, next_result, submit_ok, task, Deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_task_past_the_ttl_expires_with_its_object() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let mut config = deployment.worker_config("w-retention", 1);
    config.result_ttl = Duration::from_secs(1);
    config.retention_interval = Duration::from_millis(200);
    deployment.start_worker(config);
    let mut client = distribuidor.client().await;
    let id = submit_ok(&mut client, task("echo", json!({"text": "efímero"}))).await;
    next_result(&mut client).await;
    assert!(
        tareas_integration::s3_document(&id).await.is_some(),
        "stored first"
    );
    let expired = tareas_integration::wait_for_status(&mut client, &id, |reply| {
        matches!(
            reply,
            Reply::Status {
                state: StatusState::Expired,
                ..
            }
        )
    })
    .await;
    assert!(
        matches!(
            expired,
            Reply::Status {
                state: StatusState::Expired,
                ..
            }
        ),
        "{expired:?}"
    );
    assert!(
        tareas_integration::s3_document(&id).await.is_none(),
        "its S3 object went first"
    );
    let db = tareas_integration::db();
    assert!(db.row(&id).await.expect("row").is_none());
    client.send(&Request::Ping).await.expect("send");
    assert_eq!(next(&mut client).await, Reply::Pong);
    deployment.stop().await;
}
