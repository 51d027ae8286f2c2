//! A TLS-only client port: a task goes through `cliente --tls --ca` with a
//! self-signed certificate, and a plaintext client gets no JSON reply.

use tareas_common::protocol::Request;
use tareas_integration::{Deployment, LIMIT};

/// A self-signed certificate for `localhost` and 127.0.0.1, written as
/// PEM files in a fresh directory: (certificate, key).
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let certified = rcgen::generate_simple_self_signed(names).expect("rcgen");
    std::fs::create_dir_all(dir).expect("dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).expect("cert.pem");
    std::fs::write(&key, certified.signing_key.serialize_pem()).expect("key.pem");
    (cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_port_serves_cliente_with_its_ca_and_no_plaintext() {
    let mut deployment = Deployment::new().await;
    let dir = std::env::temp_dir().join(format!("{}-tls", deployment.queue));
    let (cert, key) = self_signed(&dir);
    let mut config = deployment.distribuidor_config();
    config.tls_cert = Some(cert.clone());
    config.tls_key = Some(key);
    let distribuidor = deployment.start_distribuidor(config).await;
    deployment.start_worker(deployment.worker_config("w-tls", 1));
    let addr = distribuidor.addr.to_string();

    // A plaintext client: no JSON comes back, whatever it sends.
    let mut plain = cliente::Client::connect(&addr).await.expect("connect");
    plain.send(&Request::Ping).await.expect("send");
    let answer = tokio::time::timeout(LIMIT, plain.recv())
        .await
        .expect("the server answers or closes");
    assert!(
        !matches!(answer, Ok(Some(_))),
        "a plaintext client got a JSON reply: {answer:?}"
    );

    // cliente with --tls --ca: a task and its result.
    let output = tokio::process::Command::new(tareas_integration::binary("cliente"))
        .args(["--addr", &addr, "--tls", "--ca"])
        .arg(&cert)
        .args([
            "submit",
            "echo",
            "--payload",
            r#"{"text":"cifrado"}"#,
            "--wait",
        ])
        .env_remove("TAREAS_TOKEN")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(LIMIT, output)
        .await
        .expect("cliente finishes")
        .expect("run cliente");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains("ack") && stdout.contains("cifrado") && stdout.contains("succeeded"),
        "{stdout}"
    );
    // Without --ca the self-signed certificate is not trusted.
    let untrusted = tokio::process::Command::new(tareas_integration::binary("cliente"))
        .args(["--addr", &addr, "--tls", "--timeout", "5", "ping"])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run cliente");
    assert!(!untrusted.status.success());
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("TAREAS_CA"),
        "{untrusted:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
    deployment.stop().await;
}
