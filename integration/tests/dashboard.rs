//! The dashboard in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, over WebDriver): a task submitted over the socket
//! appears as succeeded on the overview without a reload; its page shows
//! its result; a dead-lettered task appears under Dead letters, Replay
//! makes it run and succeed; no page logs an error. Screenshots go to
//! `.local/screenshots/`.

use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use tareas_common::protocol::{Reply, StatusState};
use tareas_integration::{next_result, submit_ok, task, Deployment, LIMIT};
use tareas_worker::{Registry, TaskError};

/// `chromedriver` on a free port, and a headless Chromium session on it.
async fn browser() -> (tokio::process::Child, Client) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|probe| probe.local_addr())
        .expect("a free port")
        .port();
    let driver = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver: install it with `apt-get install chromium chromium-driver` (scripts/test does)");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]}),
    );
    let url = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let connecting = ClientBuilder::rustls()
            .expect("rustls")
            .capabilities(capabilities.clone())
            .connect(&url)
            .await;
        match connecting {
            Ok(client) => return (driver, client),
            Err(err) if tokio::time::Instant::now() > deadline => {
                panic!("no WebDriver session from chromedriver: {err}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn screenshot(client: &Client, name: &str) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.local/screenshots");
    std::fs::create_dir_all(&dir).expect("screenshots dir");
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

/// Evaluates `script` (a function body returning JSON) in the page.
async fn eval(client: &Client, script: &str) -> serde_json::Value {
    client.execute(script, vec![]).await.expect("execute")
}

/// Waits (polling the page, up to `LIMIT`) until `script` returns `true`.
async fn until(client: &Client, script: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while eval(client, script).await != json!(true) {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn no_errors(client: &Client, page: &str) {
    let errors = eval(client, "return window.__errors || ['no dashboard script'];").await;
    assert_eq!(errors, json!([]), "{page} logged errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_tasks_live_and_replays_dead_letters() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.extra_task_types = vec!["second_time_lucky".into()];
    let (distribuidor, http) = deployment.start_distribuidor_with_http(config).await;
    let mut registry = Registry::new();
    tareas_worker::builtins::register(&mut registry);
    let runs = std::sync::atomic::AtomicU32::new(0);
    registry.register_blocking("second_time_lucky", move |_| {
        match runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            0 => Err(TaskError::transient("not this time")),
            _ => Ok(json!({"lucky": true})),
        }
    });
    let mut worker_config = deployment.worker_config("w-dashboard", 2);
    worker_config.max_attempts = 1;
    deployment.start_worker_with(worker_config, registry);
    let (_driver, browser) = browser().await;
    let base = format!("http://{http}");

    browser.goto(&format!("{base}/")).await.expect("open /");
    eval(&browser, "window.__marker = 42; return true;").await;
    let text = format!("visto-{}", uuid::Uuid::new_v4());
    let mut client = distribuidor.client().await;
    let id = submit_ok(&mut client, task("echo", json!({ "text": text }))).await;
    next_result(&mut client).await;
    let row = format!("document.querySelector('[data-task=\"{id}\"] .state-succeeded') !== null");
    until(
        &browser,
        &format!("return {row};"),
        "the task shows as succeeded on the overview",
    )
    .await;
    assert_eq!(
        eval(&browser, "return window.__marker;").await,
        json!(42),
        "the page was not reloaded"
    );
    screenshot(&browser, "overview").await;
    no_errors(&browser, "the overview").await;

    browser
        .goto(&format!("{base}/ui/tasks/{id}"))
        .await
        .expect("open the task");
    let result = browser.find(Locator::Id("result")).await.expect("#result");
    assert!(result.text().await.expect("text").contains(&text));
    screenshot(&browser, "task").await;
    no_errors(&browser, "the task's page").await;

    let unlucky = submit_ok(&mut client, task("second_time_lucky", json!({}))).await;
    let listed = format!("return document.querySelector('[data-task=\"{unlucky}\"]') !== null;");
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        browser
            .goto(&format!("{base}/ui/dead-letters"))
            .await
            .expect("open dead letters");
        if eval(&browser, &listed).await == json!(true) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    screenshot(&browser, "dead-letters").await;
    no_errors(&browser, "the dead letters").await;
    let replay = format!("[data-task=\"{unlucky}\"] button.replay");
    browser
        .find(Locator::Css(&replay))
        .await
        .expect("Replay")
        .click()
        .await
        .expect("click");
    let replayed = browser
        .wait()
        .for_element(Locator::Id("replayed"))
        .await
        .expect("#replayed after the replay");
    assert!(replayed.text().await.expect("text").contains("1 task"));
    let done = tareas_integration::wait_for_status(&mut client, &unlucky, |reply| {
        matches!(
            reply,
            Reply::Status {
                state: StatusState::Succeeded,
                ..
            }
        )
    })
    .await;
    assert!(matches!(
        done,
        Reply::Status {
            state: StatusState::Succeeded,
            ..
        }
    ));
    browser
        .goto(&format!("{base}/ui/tasks/{unlucky}"))
        .await
        .expect("open");
    let state = browser.find(Locator::Id("state")).await.expect("#state");
    assert_eq!(state.text().await.expect("text"), "succeeded");
    screenshot(&browser, "replayed").await;
    browser.close().await.expect("close the browser");
    deployment.stop().await;
}
