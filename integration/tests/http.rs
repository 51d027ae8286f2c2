//! The HTTP API against the real services: the socket's rules and codes
//! (tokens, scoping, conflict), long polls answered by the finish
//! notification on a replica that did not accept the task, pagination, and
//! an OpenAPI document whose every route answers.

use std::net::SocketAddr;

use serde_json::{json, Value};
use tareas_integration::http::{request, Response};
use tareas_integration::Deployment;

const ALPHA: &str = "Bearer alpha-http-0123456789";
const BETA: &str = "Bearer beta-http-0123456789";

/// Clients of their own for this run (the `tasks` table outlives it, and
/// a listing shows all of a client's tasks).
fn tokens() -> Vec<tareas_distribuidor::config::Secret> {
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    [("alpha", ALPHA), ("beta", BETA)]
        .map(|(name, bearer)| {
            let token = bearer.trim_start_matches("Bearer ");
            tareas_distribuidor::config::Secret(format!("{name}-{run}={token}"))
        })
        .into()
}

async fn post(addr: SocketAddr, auth: &str, extra: &[(&str, &str)], body: Value) -> Response {
    let mut headers = vec![
        ("Authorization", auth),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    let body = serde_json::to_vec(&body).expect("json");
    request(addr, "POST", "/tasks", &headers, &body).await
}

async fn get(addr: SocketAddr, auth: &str, path: &str) -> Response {
    request(addr, "GET", path, &[("Authorization", auth)], b"").await
}

fn code(response: &Response) -> &str {
    response.json["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_keeps_the_sockets_rules() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.tokens = tokens();
    let (_a, http_a) = deployment
        .start_distribuidor_with_http(config.clone())
        .await;
    let (_b, http_b) = deployment.start_distribuidor_with_http(config).await;
    deployment.start_worker(deployment.worker_config("w-http", 2));
    let id = format!("http-{}", uuid::Uuid::new_v4());

    let anonymous = request(http_a, "POST", "/tasks", &[], b"{}").await;
    assert_eq!(
        (anonymous.status, code(&anonymous)),
        (401, "unauthenticated")
    );
    // The Idempotency-Key names the task; 202 only after the confirm.
    let body = json!({"task_type": "sleep", "payload": {"ms": 1500}});
    let accepted = post(http_a, ALPHA, &[("Idempotency-Key", &id)], body.clone()).await;
    assert_eq!(accepted.status, 202, "{accepted:?}");
    assert_eq!(accepted.json, json!({"task_id": id, "status": "queued"}));
    assert_eq!(
        accepted.header("location"),
        Some(format!("/tasks/{id}").as_str())
    );
    // A long poll on the other replica answers when the task finishes.
    let waited = get(http_b, ALPHA, &format!("/tasks/{id}?wait=30")).await;
    assert_eq!(waited.status, 200, "{waited:?}");
    assert_eq!(waited.json["state"], "succeeded", "{waited:?}");
    assert_eq!(waited.json["result"], json!({"slept_ms": 1500}));
    // Another client does not see it; the same id with another payload conflicts.
    let other = get(http_a, BETA, &format!("/tasks/{id}")).await;
    assert_eq!(
        (other.status, other.json["state"].as_str()),
        (404, Some("unknown"))
    );
    let conflict = post(
        http_a,
        ALPHA,
        &[],
        json!({"task_id": id, "task_type": "sleep", "payload": {"ms": 1}}),
    )
    .await;
    assert_eq!((conflict.status, code(&conflict)), (409, "conflict"));
    let again = post(
        http_b,
        ALPHA,
        &[],
        json!({"task_id": id, "task_type": "sleep", "payload": {"ms": 1500}}),
    )
    .await;
    assert_eq!(again.status, 202, "the same task again is idempotent");
    // Bad input gets the socket's codes.
    let garbage = request(
        http_a,
        "POST",
        "/tasks",
        &[("Authorization", ALPHA)],
        b"{nope",
    )
    .await;
    assert_eq!((garbage.status, code(&garbage)), (400, "invalid_json"));
    let unknown = post(http_a, ALPHA, &[], json!({"task_type": "nope"})).await;
    assert_eq!((unknown.status, code(&unknown)), (422, "unknown_task_type"));
    let bad_id = get(http_a, ALPHA, "/tasks/no%20spaces").await;
    assert_eq!((bad_id.status, code(&bad_id)), (400, "invalid_request"));
    // Listing: beta's own tasks only, newest first, a page at a time.
    for text in ["uno", "dos", "tres"] {
        let sent = post(
            http_a,
            BETA,
            &[],
            json!({"task_type": "echo", "payload": {"text": text}}),
        )
        .await;
        assert_eq!(sent.status, 202);
    }
    let mut seen = Vec::new();
    let mut path = "/tasks?task_type=echo&limit=2".to_owned();
    loop {
        let page = get(http_a, BETA, &path).await;
        assert_eq!(page.status, 200, "{page:?}");
        for task in page.json["tasks"].as_array().expect("tasks") {
            seen.push(task["task_id"].as_str().expect("id").to_owned());
        }
        match page.json["next"].as_str() {
            Some(next) => path = format!("/tasks?task_type=echo&limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let alpha_list = get(http_a, ALPHA, "/tasks?task_type=echo").await;
    assert_eq!(
        alpha_list.json["tasks"],
        json!([]),
        "alpha sees none of beta's"
    );
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_answers() {
    let mut deployment = Deployment::new().await;
    let (_d, http) = deployment
        .start_distribuidor_with_http(deployment.distribuidor_config())
        .await;
    let document = get(http, "", "/openapi.json").await;
    assert_eq!(document.status, 200);
    assert!(document.json["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.1")));
    let paths = document.json["paths"].as_object().expect("paths");
    let mut documented: Vec<String> = Vec::new();
    for (path, operations) in paths {
        for method in operations.as_object().expect("operations").keys() {
            documented.push(format!("{} {path}", method.to_uppercase()));
            let concrete = path.replace("{task_id}", "never-submitted");
            let body = if method == "post" {
                &b"{\"task_type\":\"echo\",\"payload\":{\"text\":\"x\"}}"[..]
            } else {
                b""
            };
            let answer = request(http, &method.to_uppercase(), &concrete, &[], body).await;
            let expected: &[u16] = match (method.as_str(), path.as_str()) {
                ("get", "/tasks/{task_id}") => &[404],
                ("post", "/tasks") => &[202],
                _ => &[200],
            };
            assert!(
                expected.contains(&answer.status),
                "{method} {path}: {answer:?}"
            );
        }
    }
    documented.sort();
    assert_eq!(
        documented,
        [
            "GET /healthz",
            "GET /metrics",
            "GET /readyz",
            "GET /tasks",
            "GET /tasks/{task_id}",
            "POST /tasks"
        ],
        "every route is documented, and only those"
    );
    deployment.stop().await;
}
