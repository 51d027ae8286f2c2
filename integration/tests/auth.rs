//! Clients with tokens: nothing is served before a right token, failures
//! are slowed down, and a client that authenticates is served meanwhile.

use std::time::Duration;

use tareas_common::protocol::{ErrorCode, Reply, Request, StatusState};
use tareas_integration::{next, Deployment, DistribuidorProcess, LIMIT};

const TOKENS: &str = "alpha=alpha-secret-0123456789,beta=beta-secret-0123456789";

fn auth(token: &str) -> Request {
    Request::Auth {
        token: token.to_owned(),
    }
}

/// Every reply until the server closes the connection.
async fn until_closed(client: &mut cliente::Client) -> Vec<Reply> {
    let mut replies = Vec::new();
    while let Ok(Some(reply)) = tokio::time::timeout(LIMIT, client.recv())
        .await
        .expect("the server closes the connection")
    {
        replies.push(reply);
    }
    replies
}

fn unauthenticated(replies: &[Reply]) -> bool {
    matches!(replies, [Reply::Error(error)] if error.code == ErrorCode::Unauthenticated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_right_token_is_served_and_failures_never_slow_a_bystander() {
    let deployment = Deployment::new().await;
    let mut probe = serde_json::to_vec(&auth("alpha-secret-0123456789")).expect("json");
    probe.push(b'\n');
    let distribuidor = DistribuidorProcess::start_with_probe(
        &deployment.queue,
        &[("TAREAS_TOKENS", TOKENS), ("TAREAS_AUTH_TIMEOUT_SECS", "1")],
        Some(probe),
    )
    .await;
    // A request before auth, a wrong token, and silence: each closed.
    let mut early = distribuidor.client().await;
    early.send(&Request::Ping).await.expect("send");
    assert!(unauthenticated(&until_closed(&mut early).await));
    let mut silent = distribuidor.client().await;
    assert!(unauthenticated(&until_closed(&mut silent).await));
    // A guesser hammers wrong tokens while a client with the right one
    // authenticates and is served.
    let guessing = {
        let addr = distribuidor.addr.clone();
        tokio::spawn(async move {
            let mut refused = 0;
            for attempt in 0..4 {
                let mut guesser = cliente::Client::connect(&addr).await.expect("connect");
                guesser
                    .send(&auth(&format!("guess-{attempt}")))
                    .await
                    .expect("send");
                if unauthenticated(&until_closed(&mut guesser).await) {
                    refused += 1;
                }
            }
            refused
        })
    };
    let mut alpha = distribuidor.client().await;
    let started = std::time::Instant::now();
    alpha
        .send(&auth("beta-secret-0123456789"))
        .await
        .expect("send");
    assert_eq!(
        next(&mut alpha).await,
        Reply::Auth {
            ok: true,
            client: "beta".into()
        }
    );
    println!(
        "a right token answered in {:?} while a guesser was refused",
        started.elapsed()
    );
    alpha.send(&Request::Ping).await.expect("send");
    assert_eq!(next(&mut alpha).await, Reply::Pong);
    assert_eq!(guessing.await.expect("guesser"), 4);
    // The failures from that address were answered ever more slowly.
    let mut slowed = distribuidor.client().await;
    let started = std::time::Instant::now();
    slowed.send(&auth("guess-again")).await.expect("send");
    assert!(unauthenticated(&until_closed(&mut slowed).await));
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "the 5th failure from one address waits 1.6 s: {:?}",
        started.elapsed()
    );
    // The command-line client presents its token from the environment, or
    // from a compose `.env` in its working directory.
    let dir = std::env::temp_dir().join(format!("{}-cliente", deployment.queue));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join(".env"),
        format!(
            "# compose settings\nTAREAS_TOKEN=\"alpha-secret-0123456789\"\nDISTRIBUIDOR_ADDR={}\n",
            distribuidor.addr
        ),
    )
    .expect(".env");
    for from_env_file in [false, true] {
        let mut command = tokio::process::Command::new(tareas_integration::binary("cliente"));
        command
            .env_remove("TAREAS_TOKEN")
            .env_remove("DISTRIBUIDOR_ADDR");
        if from_env_file {
            command.current_dir(&dir).arg("ping");
        } else {
            command
                .args(["--addr", &distribuidor.addr, "ping"])
                .env("TAREAS_TOKEN", "alpha-secret-0123456789");
        }
        let output = command.output().await.expect("run cliente");
        assert!(output.status.success(), "{from_env_file}: {output:?}");
        assert!(String::from_utf8_lossy(&output.stdout).contains("pong"));
    }
    let _ = std::fs::remove_dir_all(dir);
    distribuidor.stop().await;
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_an_auth_is_answered_anonymous() {
    let mut deployment = Deployment::new().await;
    let distribuidor = deployment
        .start_distribuidor(deployment.distribuidor_config())
        .await;
    let mut client = distribuidor.client().await;
    client.send(&auth("anything")).await.expect("send");
    assert_eq!(
        next(&mut client).await,
        Reply::Auth {
            ok: true,
            client: "anonymous".into()
        }
    );
    client.send(&Request::Ping).await.expect("send");
    assert_eq!(next(&mut client).await, Reply::Pong);
    deployment.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_cliente_token_new_works_from_a_tokens_file() {
    let deployment = Deployment::new().await;
    let output = tokio::process::Command::new(tareas_integration::binary("cliente"))
        .args(["token", "new", "zeta"])
        .output()
        .await
        .expect("run cliente");
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).expect("utf-8");
    let field = |prefix: &str| {
        printed
            .lines()
            .find_map(|line| {
                line.split_once(prefix)
                    .map(|(_, rest)| rest.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no {prefix:?} in {printed}"))
    };
    let token = field("it is not stored anywhere): ");
    let line = field("line for TAREAS_TOKENS_FILE: ");
    let file = std::env::temp_dir().join(format!("{}-tokens", deployment.queue));
    std::fs::write(&file, format!("{line}\n")).expect("tokens file");
    let mut probe = serde_json::to_vec(&auth(&token)).expect("json");
    probe.push(b'\n');
    let distribuidor = DistribuidorProcess::start_with_probe(
        &deployment.queue,
        &[("TAREAS_TOKENS_FILE", file.to_str().expect("path"))],
        Some(probe),
    )
    .await;
    let mut client = distribuidor.client().await;
    client.send(&auth(&token)).await.expect("send");
    assert_eq!(
        next(&mut client).await,
        Reply::Auth {
            ok: true,
            client: "zeta".into()
        }
    );
    distribuidor.stop().await;
    let _ = std::fs::remove_file(file);
    deployment.stop().await;
}

/// Connects to `addr` as the client `token` names.
async fn connect_as(addr: std::net::SocketAddr, token: &str) -> cliente::Client {
    let endpoint = cliente::Endpoint {
        addr: addr.to_string(),
        token: Some(token.to_owned()),
        tls: None,
    };
    endpoint.connect().await.expect("authenticate")
}

fn echo(id: &str, text: &str) -> tareas_common::protocol::TaskRequest {
    tareas_common::protocol::TaskRequest {
        task_id: Some(id.to_owned()),
        ..tareas_integration::task("echo", serde_json::json!({ "text": text }))
    }
}

/// Sends `request`; its ack and then its result, or the error reply.
async fn submit(
    client: &mut cliente::Client,
    request: tareas_common::protocol::TaskRequest,
) -> Vec<Reply> {
    client.send(&Request::Task(request)).await.expect("send");
    let first = next(client).await;
    if !matches!(first, Reply::Ack { .. }) {
        return vec![first];
    }
    vec![first, next(client).await]
}

fn result_text(replies: &[Reply]) -> Option<String> {
    match replies {
        [Reply::Ack { .. }, Reply::Result(report)] => {
            Some(report.result.as_ref()?.get("text")?.as_str()?.to_owned())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_id_belongs_to_its_client() {
    let mut deployment = Deployment::new().await;
    let mut config = deployment.distribuidor_config();
    config.tokens = TOKENS
        .split(',')
        .map(|entry| tareas_distribuidor::config::Secret(entry.to_owned()))
        .collect();
    let distribuidor = deployment.start_distribuidor(config).await;
    deployment.start_worker(deployment.worker_config("w-scoped", 2));
    let mut alpha = connect_as(distribuidor.addr, "alpha-secret-0123456789").await;
    let mut beta = connect_as(distribuidor.addr, "beta-secret-0123456789").await;
    let id = format!("pedido-{}", uuid::Uuid::new_v4());

    let first = submit(&mut alpha, echo(&id, "de alpha")).await;
    assert_eq!(
        result_text(&first).as_deref(),
        Some("de alpha"),
        "{first:?}"
    );
    beta.send(&Request::Status {
        task_id: id.clone(),
    })
    .await
    .expect("send");
    assert!(
        matches!(
            next(&mut beta).await,
            Reply::Status {
                state: StatusState::Unknown,
                ..
            }
        ),
        "another client's task is unknown to beta"
    );
    // Beta's task of the same id is its own: it runs, and beta gets its result.
    let second = submit(&mut beta, echo(&id, "de beta")).await;
    assert_eq!(
        result_text(&second).as_deref(),
        Some("de beta"),
        "{second:?}"
    );
    // Alpha got nothing of beta's: its next reply answers its next request.
    alpha.send(&Request::Ping).await.expect("send");
    assert_eq!(next(&mut alpha).await, Reply::Pong);
    // The same id with other fields is a conflict, in alpha's scope too;
    // the same fields get alpha's stored result.
    let other = submit(&mut alpha, echo(&id, "otro")).await;
    assert!(
        matches!(&other[..], [Reply::Error(e)] if e.code == ErrorCode::Conflict
            && e.task_id.as_deref() == Some(id.as_str())),
        "{other:?}"
    );
    let again = submit(&mut alpha, echo(&id, "de alpha")).await;
    assert_eq!(
        result_text(&again).as_deref(),
        Some("de alpha"),
        "{again:?}"
    );
    // Each client's result has its own S3 object.
    for (client, text) in [("alpha", "de alpha"), ("beta", "de beta")] {
        let document = tareas_integration::s3_document(&format!("{client}/{id}"))
            .await
            .unwrap_or_else(|| panic!("results/{client}/{id}.json"));
        assert_eq!(document["result"]["text"], text);
    }
    deployment.stop().await;
}
