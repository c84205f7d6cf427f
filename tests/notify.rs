//! What each daemon tells its service manager (the sd_notify protocol), recorded on a notify
//! socket the test owns: `STATUS=` and `EXTEND_TIMEOUT_USEC=` while starting, `READY=1` only when
//! it can serve, `WATCHDOG=1` from its work loop at half of `WatchdogSec`, `STOPPING=1` on
//! SIGTERM. (That systemd itself acts on them is the appliance test's part.)

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use llorch_tests::notify::NotifySocket;
use llorch_tests::stack::{free_port, signal, Stack, StackOptions};
use llorch_tests::{bin, model_path, serial};

#[test]
fn the_engine_reports_loading_ready_watchdog_and_stopping() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let handoff = dir.path().join("handoff/p0.json");
    let mut engine = Command::new(bin("llorch-engine"))
        .arg("--model")
        .arg(model_path())
        .arg("--socket")
        .arg(dir.path().join("e.sock"))
        .arg("--handoff-dir")
        .arg(dir.path().join("handoff"))
        .args([
            "--pool",
            "p0",
            "--model-id",
            "smollm2",
            "--threads",
            "2",
            "--slots",
            "1",
        ])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = notify.wait_for("STATUS=loading model smollm2", Duration::from_secs(30));
    let extend = notify.wait_for("EXTEND_TIMEOUT_USEC=", Duration::from_secs(5));
    let ready = notify.wait_for("READY=1", Duration::from_secs(60));
    assert!(!first.contains("READY=1") && !extend.contains("READY=1"));
    // READY only once the handoff file is there: the engine can serve.
    assert!(handoff.exists());
    assert!(
        ready.contains("STATUS=serving smollm2 on cpu: 1 slots"),
        "{ready}"
    );
    // The idle decode loop keeps a 1 s watchdog fed.
    notify.assert_watchdog(Duration::from_secs(3), Duration::from_secs(1));
    signal(engine.id(), libc::SIGTERM);
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(engine.wait().unwrap().success());
}

/// The status code of `GET path` with a bearer key, over a plain TCP connection.
fn status_with_key(port: u16, path: &str, key: &str) -> u16 {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut head = String::new();
    c.read_to_string(&mut head).unwrap();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn orchestratord_reports_ready_status_watchdog_reload_and_stopping() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let port = free_port();
    let keys = dir.path().join("api-keys");
    llorch_tests::write_secret(&keys, "alice alice-key-0123456789abcdef\n");
    let mut orch = Command::new(bin("orchestratord"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--api-keys")
        .arg(&keys)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "1000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ready = notify.wait_for("READY=1", Duration::from_secs(30));
    assert!(
        ready.contains("STATUS=0 of 0 pools ready on 0 nodes; queue 0/256"),
        "{ready}"
    );
    // READY means it accepts connections.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("orchestratord accepts");
    notify.assert_watchdog(Duration::from_secs(3), Duration::from_secs(1));
    // SIGHUP re-reads the key file: RELOADING=1, then READY=1, and the new key is in force.
    assert_eq!(
        status_with_key(port, "/v1/models", "alice-key-0123456789abcdef"),
        200
    );
    std::fs::write(&keys, "bob bob-key-0123456789abcdef\n").unwrap();
    signal(orch.id(), libc::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1", Duration::from_secs(10));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    notify.wait_for("READY=1", Duration::from_secs(10));
    assert_eq!(
        status_with_key(port, "/v1/models", "alice-key-0123456789abcdef"),
        401
    );
    assert_eq!(
        status_with_key(port, "/v1/models", "bob-key-0123456789abcdef"),
        200
    );
    // A broken file keeps the keys in force.
    std::fs::write(&keys, "bob short\n").unwrap();
    signal(orch.id(), libc::SIGHUP);
    notify.wait_for("RELOADING=1", Duration::from_secs(10));
    notify.wait_for("READY=1", Duration::from_secs(10));
    assert_eq!(
        status_with_key(port, "/v1/models", "bob-key-0123456789abcdef"),
        200
    );
    signal(orch.id(), libc::SIGTERM);
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(orch.wait().unwrap().success());
}

#[test]
fn pool_managerd_is_ready_once_registered_and_keeps_its_engines_off_the_socket() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::bind(dir.path());
    let stack = Stack::start(StackOptions {
        node_env: vec![
            ("NOTIFY_SOCKET".into(), notify.path.display().to_string()),
            ("WATCHDOG_USEC".into(), "1000000".into()),
        ],
        ..StackOptions::default()
    });
    notify.wait_for("READY=1", Duration::from_secs(30));
    notify.wait_for("default ready (0/4 busy)", Duration::from_secs(30));
    notify.assert_watchdog(Duration::from_secs(3), Duration::from_secs(1));
    // The engine is pool-managerd's child: it must not talk to pool-managerd's manager.
    assert!(
        !notify.seen.iter().any(|m| m.contains("STATUS=serving")),
        "{:?}",
        notify.seen
    );
    drop(stack);
    notify.wait_for("STOPPING=1", Duration::from_secs(10));
}

#[test]
fn orchestratord_takes_the_socket_named_api_among_several() {
    let _g = serial();
    let (decoy, api, own) = (free_port(), free_port(), free_port());
    let mut activator = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{decoy}")])
        .args(["-l", &format!("127.0.0.1:{api}")])
        .arg("--fdname=metrics:api")
        .arg(bin("orchestratord"))
        .args(["--listen", &format!("127.0.0.1:{own}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate is installed (scripts/setup.sh installs systemd)");
    // It says when both sockets listen; then the first connection starts orchestratord with
    // both, and it serves the one named `api` and binds nothing of its own.
    let mut lines = BufReader::new(activator.stderr.take().unwrap()).lines();
    for _ in 0..2 {
        let line = lines
            .next()
            .expect("systemd-socket-activate said nothing")
            .unwrap();
        assert!(line.starts_with("Listening on"), "{line}");
    }
    let status = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", api)).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut head = String::new();
        let _ = c.read_to_string(&mut head);
        head
    };
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", own)).is_err());
    signal(activator.id(), libc::SIGTERM);
    let _ = activator.wait();
}
