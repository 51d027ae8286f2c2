//! What an operator meets first: the pinned images, the operator commands
//! run with compose's credentials, and no password printed anywhere.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

use serde_json::json;

use tareas_integration::{binary, Deployment};

/// The value docker-compose.yml gives `key` in its `x-tareas-env` anchor,
/// with `${NAME:-default}` filled from `env` (as compose fills it from
/// `.env`) and `host` names of compose services replaced by 127.0.0.1.
fn compose_value(key: &str, env: &BTreeMap<&str, &str>) -> String {
    let compose = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docker-compose.yml"
    ))
    .expect("read docker-compose.yml");
    let line = compose
        .lines()
        .skip_while(|line| !line.starts_with("x-tareas-env:"))
        .find_map(|line| line.trim().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("x-tareas-env has no {key}"))
        .trim()
        .to_owned();
    let mut value = String::new();
    let mut rest = line.as_str();
    while let Some(start) = rest.find("${") {
        value.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace") + start;
        let (name, default) = rest[start + 2..end]
            .split_once(":-")
            .unwrap_or((&rest[start + 2..end], ""));
        value.push_str(env.get(name).copied().unwrap_or(default));
        rest = &rest[end + 1..];
    }
    value.push_str(rest);
    value
        .replace("@rabbitmq:", "@127.0.0.1:")
        .replace("@postgres:", "@127.0.0.1:")
}

/// Runs `rabbitmqctl -q args`; the test fails if it does.
fn rabbitmqctl(args: &[&str]) {
    let output = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The vhost compose's programs use (`tareas`), for one test: created, and
/// deleted on drop with everything in it.
struct RabbitVhost(&'static str);

impl RabbitVhost {
    fn create(name: &'static str) -> RabbitVhost {
        rabbitmqctl(&["add_vhost", name]);
        RabbitVhost(name)
    }
}

impl Drop for RabbitVhost {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", self.0])
            .output();
    }
}

/// A RabbitMQ user that exists for one test (`rabbitmqctl`), deleted on drop.
struct RabbitUser(String);

impl RabbitUser {
    /// A user with every permission in `vhost` and nothing elsewhere, as
    /// compose's rabbitmq-init creates one.
    fn create(name: &str, password: &str, vhost: &str) -> RabbitUser {
        rabbitmqctl(&["add_user", name, password]);
        let user = RabbitUser(name.to_owned());
        rabbitmqctl(&["set_permissions", "-p", vhost, name, ".*", ".*", ".*"]);
        user
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.0])
            .output();
    }
}

/// Puts one task message in the dead-letter queue of `queue`, over `amqp_url`.
async fn dead_letter(amqp_url: &str, queue: &str, task_id: &str) {
    let connection = tareas_common::amqp::connect(amqp_url, "operator-test")
        .await
        .expect("connect with the compose credentials");
    let channel = connection.create_channel().await.expect("channel");
    let topology = tareas_integration::topology(queue);
    topology.declare(&connection).await.expect("declare");
    let body = json!({"task_id": task_id, "task_type": "echo", "payload": {}});
    channel
        .basic_publish(
            "".into(),
            topology.dead_letter_queue().as_str().into(),
            Default::default(),
            body.to_string().as_bytes(),
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("sent");
    let _ = connection.close(200, "done".into()).await;
}

/// README: `docker compose exec worker cliente dlq list`. Run natively with
/// the worker container's environment: compose's AMQP_URL and DATABASE_URL
/// filled from an `.env` (a RabbitMQ user of its own, as compose creates
/// one), not cliente's development defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_works_with_the_compose_credentials() {
    let deployment = Deployment::new().await;
    let user = format!("compose-{}", uuid::Uuid::new_v4().simple());
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    // Compose's programs use the vhost `tareas` as a user of their own.
    let _vhost = RabbitVhost::create("tareas");
    let _user = RabbitUser::create(&user, &password, "tareas");
    let dotenv = BTreeMap::from([
        ("TAREAS_AMQP_USER", user.as_str()),
        ("TAREAS_AMQP_PASSWORD", password.as_str()),
        ("TAREAS_DB_USER", "postgres"),
    ]);
    let amqp_url = compose_value("AMQP_URL", &dotenv);
    assert!(amqp_url.contains(&password), "{amqp_url}");
    let task_id = format!("dead-{}", uuid::Uuid::new_v4().simple());
    dead_letter(&amqp_url, &deployment.queue, &task_id).await;

    let list = || {
        std::process::Command::new(binary("cliente"))
            .env_clear()
            .env("AMQP_URL", &amqp_url)
            .env("DATABASE_URL", compose_value("DATABASE_URL", &dotenv))
            .env("TAREAS_QUEUE", &deployment.queue)
            .args(["dlq", "list"])
            .output()
            .expect("run cliente")
    };
    // Listing twice: the first leaves the dead letter in place.
    for _ in 0..2 {
        let output = list();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "cliente dlq list failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains(&task_id), "{stdout}");
        assert!(stdout.contains("1 task(s)"), "{stdout}");
    }
    deployment.stop().await;
}

/// `scripts/check-images` on the real files passes; on copies with an image
/// that cannot be pulled any more, or that floats, it fails and says why.
#[test]
fn check_images_refuses_unpinned_and_gone_images() {
    let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let check = |file: &std::path::Path| {
        std::process::Command::new(root.join("scripts/check-images"))
            .arg(file)
            .output()
            .expect("run scripts/check-images")
    };
    let real = root.join("docker-compose.yml");
    let passed = check(&real);
    assert!(
        passed.status.success(),
        "{}",
        String::from_utf8_lossy(&passed.stderr)
    );
    let compose = std::fs::read_to_string(&real).expect("read docker-compose.yml");
    let minio = compose
        .lines()
        .find(|line| line.trim_start().starts_with("image: quay.io/minio/minio:"))
        .expect("the minio image line")
        .trim()
        .to_owned();
    let dir = std::env::temp_dir().join(format!("check-images-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (broken, why) in [
        ("image: minio/minio:latest", "no longer serves images"),
        ("image: quay.io/minio/minio:latest", "uses latest"),
        ("image: quay.io/minio/minio", "has no tag"),
        ("image: rabbitmq:4-management", "floats"),
    ] {
        let copy = dir.join("docker-compose.yml");
        std::fs::write(&copy, compose.replace(&minio, broken)).expect("write copy");
        let output = check(&copy);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{broken} passed: {stderr}");
        assert!(stderr.contains(why), "{broken}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Neither `--help`, nor an error, nor a log line shows a password from
/// AMQP_URL, DATABASE_URL or the S3 secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_printed() {
    const SECRET: &str = "pw-that-must-not-show";
    let secret_env = |command: &mut std::process::Command| {
        command
            .env_clear()
            .env(
                "AMQP_URL",
                format!("amqp://tareas:{SECRET}@127.0.0.1:1/%2f"),
            )
            .env(
                "DATABASE_URL",
                format!("postgres://tareas:{SECRET}@127.0.0.1:1/tareas"),
            )
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("DISTRIBUIDOR_ADDR", "127.0.0.1:0")
            .env("DISTRIBUIDOR_HTTP_ADDR", "127.0.0.1:0");
    };
    let shows = |output: &std::process::Output| {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (text.contains(SECRET), text)
    };
    for (name, args) in [
        ("distribuidor", vec!["--help"]),
        ("worker", vec!["--help"]),
        ("cliente", vec!["dlq", "list", "--help"]),
        ("cliente", vec!["dlq", "list"]),
    ] {
        let mut command = std::process::Command::new(binary(name));
        secret_env(&mut command);
        let output = command.args(&args).output().expect("run");
        let (leaked, text) = shows(&output);
        assert!(!leaked, "{name} {args:?} printed the secret: {text}");
        if args == ["dlq", "list"] {
            assert!(!output.status.success());
            assert!(text.contains("tareas:***@127.0.0.1:1"), "{text}");
        }
    }
    // The distribuidor's log, up to the line saying RabbitMQ is unavailable.
    let mut command = std::process::Command::new(binary("distribuidor"));
    secret_env(&mut command);
    let mut child = command
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start distribuidor");
    let stderr = child.stderr.take().expect("stderr");
    let mut log = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line.expect("log line");
        log.push_str(&line);
        log.push('\n');
        if line.contains("RabbitMQ is unavailable") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(log.contains("tareas:***@127.0.0.1:1"), "{log}");
    assert!(!log.contains(SECRET), "the log shows the secret: {log}");
}
