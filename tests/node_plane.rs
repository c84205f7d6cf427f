//! The node plane holds under what any client (or anyone who can send a datagram) can do to
//! the control plane: a node registered with the real stack stays online while 4,096 idle
//! client connections are held and renewed, and while 20,000 forged beats a second arrive at
//! the beats socket for ten heartbeat intervals (docs/SECURITY.md, "A client with a key" and
//! "The network").
//!
//! Each test holds `serial()` for its whole run (see engine.rs).
#![allow(clippy::await_holding_lock)]

use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use llorch_client::HttpClient;
use llorch_tests::stack::{Stack, StackOptions};
use llorch_tests::{prom, serial};
use serde_json::Value;

/// Raises this process's soft limit on open files (the daemons it starts inherit it).
fn raise_nofile(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    if lim.current.is_some_and(|c| c < want) {
        lim.current = Some(want.min(hard));
        let _ = setrlimit(Resource::Nofile, lim);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// One more idle connection, when the listener takes it within a moment (a full backlog
/// does not stop the flood).
fn more(addr: &str) -> Option<TcpStream> {
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    TcpStream::connect_timeout(&addr, Duration::from_millis(50)).ok()
}

/// The node's state as the control plane sees it, with its last news.
async fn node_state(c: &HttpClient) -> (String, u64) {
    let nodes: Value = c.get_json("/v2/nodes").await.expect("GET /v2/nodes");
    let n = &nodes[0];
    (
        n["state"].as_str().unwrap_or_default().to_string(),
        n["last_seen_ms"].as_u64().unwrap_or(u64::MAX),
    )
}

/// Checks every 200 ms for `intervals` heartbeat intervals (of 1 s) that the node is online;
/// `pressure` runs between checks.
async fn stays_online(c: &HttpClient, intervals: u64, mut pressure: impl FnMut()) {
    let until = Instant::now() + Duration::from_secs(intervals);
    let mut checks = 0;
    while Instant::now() < until {
        pressure();
        let (state, last_seen_ms) = node_state(c).await;
        assert_eq!(
            state, "online",
            "after {checks} checks (last seen {last_seen_ms} ms ago)"
        );
        checks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(checks >= intervals * 3, "{checks} checks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_connections_cannot_starve_the_node_plane() {
    let _g = serial();
    const HELD: usize = 4096;
    let limit = raise_nofile(3 * HELD as u64);
    assert!(
        limit >= 2 * HELD as u64 + 1024,
        "need {} open files, may have {limit}",
        2 * HELD + 1024
    );
    // Heartbeats over HTTP every second, through the listener clients share (no beats). The
    // header deadline is long, as if the flood renewed each connection before it ran out: what
    // holds the permits must be idle connections, not the test's patience.
    let mut stack = Stack::start(StackOptions {
        slots: 1,
        orch_args: vec!["--header-read-secs".into(), "600".into()],
        ..StackOptions::default()
    });
    let c = stack.client();
    assert_eq!(node_state(&c).await.0, "online");
    let addr = format!("127.0.0.1:{}", stack.port);
    // 4,096 connections that never send a byte (as many as --max-connections serves), each
    // taken by orchestratord, and 256 more waiting behind them in the listen backlog, as a
    // flood that never stops leaves.
    let orch = stack.orch.as_ref().expect("orchestratord").pid();
    let fds = || std::fs::read_dir(format!("/proc/{orch}/fd")).map_or(0, |d| d.count());
    let before = fds();
    let mut idle: Vec<TcpStream> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // (A few of the earlier connections, the test client's among them, may be the oldest idle
    // ones and make room already.)
    while fds() < before + HELD - 16 {
        if idle.len() < HELD {
            idle.extend((0..256).map(|_| TcpStream::connect(&addr).expect("connect")));
        }
        assert!(
            Instant::now() < deadline,
            "orchestratord took {} connections",
            fds() - before
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    idle.extend((0..256).filter_map(|_| more(&addr)));
    // A node's established connection is not what suffers: a node that must connect anew
    // does (after a restart, or when its report comes after the keep-alive ended, as with
    // beats). Restarted now, the node agent registers through the held listener.
    stack.node.take().expect("a node").stop();
    stack.start_node();
    let restarted = Instant::now();
    loop {
        let (state, last_seen_ms) = node_state(&c).await;
        if state == "online" && last_seen_ms < 1000 && restarted.elapsed() > Duration::from_secs(2)
        {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(60),
            "the restarted node did not get through: {state}, last seen {last_seen_ms} ms ago\n{}",
            stack.logs()
        );
        idle.extend((0..20).filter_map(|_| more(&addr)));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then for five intervals the flood goes on (100 new idle connections between checks, none
    // let go), and the node never misses a heartbeat.
    stays_online(&c, 5, || {
        idle.extend((0..100).filter_map(|_| more(&addr)));
    })
    .await;
    assert!(idle.len() > HELD + 256, "{}", idle.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_beats_loses_no_node() {
    let _g = serial();
    let beats_port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap()
        .port();
    let stack = Stack::start(StackOptions {
        slots: 1,
        orch_args: vec!["--beats-listen".into(), format!("127.0.0.1:{beats_port}")],
        ..StackOptions::default()
    });
    let c = stack.client();
    let metrics =
        |s: &prom::Scrape, outcome: &str| s.sum("llorch_node_beats_total", &[("outcome", outcome)]);
    // The node beats (its registration was granted a session).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = prom::scrape(&c).await;
        if metrics(&s, "ok") >= 2.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no beat was taken");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = prom::scrape(&c).await;
    // 20,000 forged beats a second (the magic and length of a beat, random sessions and
    // tags: anyone can send them), for ten intervals, from a thread of their own.
    let flood = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let mut sent = 0u64;
        let mut datagram = [0u8; llorch_wire::beat::BEAT_LEN];
        datagram[..4].copy_from_slice(&llorch_wire::beat::MAGIC);
        while start.elapsed() < Duration::from_secs(10) {
            let due = start.elapsed().as_micros() as u64 * 20_000 / 1_000_000;
            while sent < due {
                datagram[4..12].copy_from_slice(&llorch_wire::id::random_u64().to_be_bytes());
                datagram[20..28].copy_from_slice(&sent.to_be_bytes());
                let _ = socket.send_to(&datagram, ("127.0.0.1", beats_port));
                sent += 1;
            }
            // Answers (report requests) are read and dropped, so they never back up.
            let mut buf = [0u8; 64];
            while socket.recv_from(&mut buf).is_ok() {}
            std::thread::sleep(Duration::from_micros(500));
        }
        sent
    });
    stays_online(&c, 10, || {}).await;
    let sent = flood.join().unwrap();
    assert!(sent >= 190_000, "the flood sent only {sent}");
    let after = prom::scrape(&c).await;
    let read = metrics(&after, "report_asked") - metrics(&before, "report_asked");
    // Most of the flood was read (not left to crowd the buffer), and the node's beats or
    // heartbeats kept coming.
    assert!(read >= sent as f64 * 0.5, "read {read} of {sent}");
    let log = stack.logs();
    assert!(!log.contains("marked offline"), "{log}");
}
