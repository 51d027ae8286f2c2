//! Stopping and starting the shared services for the outage tests; each
//! stop returns a guard that starts the service again, even on failure.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tareas_integration::LIMIT;

/// Runs a command to completion; panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Runs its restore action when dropped, so a failing test still brings the service back.
pub struct Restore(fn());

impl Drop for Restore {
    fn drop(&mut self) {
        (self.0)();
    }
}

pub fn rabbitmq_stop() -> Restore {
    run("rabbitmqctl", &["-q", "stop_app"]);
    Restore(|| {
        run("rabbitmqctl", &["-q", "start_app"]);
        run("rabbitmqctl", &["-q", "await_startup"]);
    })
}

fn postgres_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .next()
        .expect("a PostgreSQL cluster")
}

pub fn postgres_stop() -> Restore {
    run(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &postgres_version(),
            "main",
            "stop",
            "-m",
            "fast",
        ],
    );
    Restore(|| {
        run(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &postgres_version(),
                "main",
                "start",
            ],
        )
    })
}

pub fn s3_stop() -> Restore {
    // The S3 server that scripts/services started; it starts it again.
    let _ = Command::new("pkill")
        .args(["-f", "s3s-fs --host 127.0.0.1"])
        .status();
    let deadline = std::time::Instant::now() + LIMIT;
    while std::net::TcpStream::connect("127.0.0.1:9000").is_ok() {
        assert!(std::time::Instant::now() < deadline, "s3s-fs did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    Restore(|| {
        run(
            &repo_root().join("scripts/services").display().to_string(),
            &[],
        )
    })
}
