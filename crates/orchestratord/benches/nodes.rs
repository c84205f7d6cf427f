//! The control plane at cluster scale without hardware: 1,000 synthetic nodes of 4 pools each.
//! Method and results: docs/PERFORMANCE.md, "Many nodes".
//!
//! 1. Placement (in process, the library's own code): a registry of 1,000 nodes × 4 pools
//!    (4,000 pools, 40 models); each sample builds the placement snapshot of one model's pools
//!    (`Registry::candidates_for`, as admission does for its task and the dispatcher for the
//!    models that wait) and places one task (`placement::place`), the model chosen in turn.
//!    Reported: p50/p99 of each and of both, and of the whole 4,000-pool snapshot.
//! 2. Heartbeats (the real release binary): 1,000 nodes register over HTTP, then heartbeat
//!    every `LLORCH_BENCH_HEARTBEAT_SECS` (5) seconds, staggered evenly, for
//!    `LLORCH_BENCH_SECS` (20) measured seconds. Reported: orchestratord's CPU (share of one
//!    core, and per node per second), heartbeats answered and their latency, and resident
//!    memory per registered node (`VmRSS` after registration minus before, over 1,000).
//!
//! Run with `cargo build --release --bins && cargo bench -p orchestratord --bench nodes`.
//! `LLORCH_BENCH_HEARTBEATS` (`http,beats`) names the heartbeat protocols run, in order.
//! `LLORCH_BENCH_NODES` (1000) and `LLORCH_BENCH_ONLY` (`placement` or `heartbeats`) change
//! the scale and the part; `LLORCH_BENCH_ORCHESTRATORD` runs another binary (an older build,
//! side by side).

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llorch_client::HttpClient;
use llorch_wire::beat;
use llorch_wire::node::{Heartbeat, NodeAck, PoolState, PoolStatus, Registration};
use orchestratord::placement::{place, Ask, Placement};
use orchestratord::registry::{Node, Registry};
use tokio_util::sync::CancellationToken;

const POOLS_PER_NODE: usize = 4;
const MODELS: usize = 40;

fn pools_of(node: usize) -> Vec<PoolStatus> {
    (0..POOLS_PER_NODE)
        .map(|p| {
            let mut s = PoolStatus::new(
                format!("p{p}"),
                format!("model-{}", (node * POOLS_PER_NODE + p) % MODELS),
                PoolState::Ready,
                4,
                4096,
            );
            s.engine_pid = Some(1000 + p as u32);
            s
        })
        .collect()
}

fn micros(d: &[Duration], q: f64) -> f64 {
    let mut v: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    quantile(&v, q)
}

fn placement(nodes: usize) {
    let mut r = Registry::default();
    for i in 0..nodes {
        r.register(Node {
            id: format!("node-{i:04}"),
            address: format!("unix:/nonexistent/node-{i}.sock"),
            version: "bench".into(),
            heartbeat: Duration::from_secs(5),
            last_seen: tokio::time::Instant::now(),
            online: true,
            pools: pools_of(i),
            staged_models: Vec::new(),
            gpus: Default::default(),
            client: HttpClient::new("unix:/nonexistent.sock").expect("address"),
            lost: CancellationToken::new(),
            draining: false,
            offline_beats: 3,
            beat: None,
            memory: Vec::new(),
        });
    }
    let models: Vec<String> = (0..MODELS).map(|m| format!("model-{m}")).collect();
    let (mut snap, mut decide, mut both) = (Vec::new(), Vec::new(), Vec::new());
    // The whole snapshot, for comparison: what the status line and metrics take.
    let mut whole = Vec::new();
    for _ in 0..1000 {
        let t = Instant::now();
        let c = r.candidates();
        whole.push(t.elapsed());
        assert_eq!(c.len(), nodes * POOLS_PER_NODE);
    }
    let samples = 5_000;
    for i in 0..samples + 500 {
        let model = &models[i % MODELS];
        let t0 = Instant::now();
        // What the dispatcher takes for a queue of one model's tasks, and admission for one.
        let candidates = r.candidates_for(|m| m == model);
        let t1 = Instant::now();
        let ask = Ask {
            model,
            ..Ask::default()
        };
        let placed = place(&candidates, &ask);
        let t2 = Instant::now();
        assert!(matches!(placed, Placement::Place { .. }), "{placed:?}");
        if i >= 500 {
            snap.push(t1 - t0);
            decide.push(t2 - t1);
            both.push(t2 - t0);
        }
    }
    println!(
        "whole snapshot of {} pools: p50 {:.1} us p99 {:.1} us",
        nodes * POOLS_PER_NODE,
        micros(&whole, 0.5),
        micros(&whole, 0.99)
    );
    println!(
        "placement, {} pools on {nodes} nodes, {samples} samples: snapshot (one model's pools) p50 {:.1} us p99 {:.1} us; place p50 {:.1} us p99 {:.1} us; both p50 {:.1} us p99 {:.1} us",
        nodes * POOLS_PER_NODE,
        micros(&snap, 0.5),
        micros(&snap, 0.99),
        micros(&decide, 0.5),
        micros(&decide, 0.99),
        micros(&both, 0.5),
        micros(&both, 0.99),
    );
}

/// The heartbeat part, with nodes that heartbeat over HTTP every interval (`beats` false, as
/// before liveness beats) or beat over UDP and send a full heartbeat every
/// [`beat::REPORT_EVERY`] intervals, as pool-managerd does when granted a session.
async fn heartbeats(nodes: usize, beats: bool) {
    let secs: u64 = env_or("LLORCH_BENCH_SECS", 20);
    let interval: u64 = env_or("LLORCH_BENCH_HEARTBEAT_SECS", 5);
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("orchestratord.log");
    let port = free_port();
    let exe = std::env::var_os("LLORCH_BENCH_ORCHESTRATORD")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| bin("orchestratord"));
    // The node list is an operator's: the bench holds the operator's token.
    let admin = dir.path().join("admin-token");
    std::fs::write(&admin, "bench-admin-0123456789abcdef\n").expect("admin token");
    std::fs::set_permissions(&admin, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod admin token");
    let mut cmd = Command::new(exe);
    // Through the environment, so an older binary (LLORCH_BENCH_ORCHESTRATORD) still starts.
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .env("LLORCH_ADMIN_TOKEN_FILE", &admin);
    if beats {
        cmd.args(["--beats-listen", &format!("127.0.0.1:{port}")]);
    }
    let mut child = cmd
        .env("LLORCH_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn orchestratord");
    let pid = child.id();
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(start.elapsed() < Duration::from_secs(30), "not listening");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = Arc::new(
        HttpClient::new(&format!("http://127.0.0.1:{port}"))
            .expect("url")
            .with_token(Some("bench-admin-0123456789abcdef".into())),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = status_mb(pid, "VmRSS:");
    let mut grants = Vec::new();
    for i in 0..nodes {
        let reg = Registration {
            node_id: format!("node-{i:04}"),
            address: format!("unix:/nonexistent/node-{i}.sock"),
            version: "bench".into(),
            heartbeat_secs: interval,
            pools: pools_of(i),
            staged_models: Vec::new(),
            gpus: Default::default(),
            memory: Vec::new(),
        };
        let ack: NodeAck = client
            .post_json("/v2/nodes/register", &reg)
            .await
            .expect("registered");
        assert_eq!(
            ack.beat.is_some(),
            beats,
            "a beat session iff beats are read"
        );
        grants.push(ack.beat);
    }
    let udp = Arc::new(
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("udp"),
    );
    let beats_to = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let rss_after = status_mb(pid, "VmRSS:");
    // One task per node, each waiting its offset in the interval, then beating every interval.
    let tck = clock_ticks();
    let stop = CancellationToken::new();
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let period = Duration::from_secs(interval);
    let warmup = period;
    for (i, grant) in grants.into_iter().enumerate() {
        let (client, stop, latencies) = (client.clone(), stop.clone(), latencies.clone());
        let udp = udp.clone();
        let session = grant.map(|g| {
            (
                g.session,
                beat::BeatKey::from_hex(&g.key).expect("granted key"),
            )
        });
        tasks.push(tokio::spawn(async move {
            // Beating, a node sends `BEATS_PER_INTERVAL` beats an interval and every
            // `REPORT_EVERY`th interval a heartbeat instead, as pool-managerd does; the nodes'
            // heartbeats are spread over that cycle, so any window sees their steady rate.
            let per = if session.is_some() {
                beat::BEATS_PER_INTERVAL
            } else {
                1
            };
            let cycle = u64::from(beat::REPORT_EVERY * beat::BEATS_PER_INTERVAL);
            let step = period / per;
            let offset = step.mul_f64(i as f64 / nodes as f64);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, step);
            let hb = Heartbeat {
                pools: pools_of(i),
                staged_models: Vec::new(),
                gpus: Default::default(),
                memory: Vec::new(),
            };
            let path = format!("/v2/nodes/node-{i:04}/heartbeat");
            let mut answered = 0u64;
            let mut counter = 0u64;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return answered,
                }
                counter += 1;
                if let Some((id, key)) = session
                    .as_ref()
                    .filter(|_| (counter + i as u64) % cycle != 0)
                {
                    udp.send_to(&beat::encode(*id, counter, key), beats_to)
                        .await
                        .expect("beat");
                    continue;
                }
                let t = Instant::now();
                let _: NodeAck = client.post_json(&path, &hb).await.expect("heartbeat");
                latencies.lock().unwrap().push(t.elapsed());
                answered += 1;
            }
        }));
    }
    tokio::time::sleep(warmup).await;
    latencies.lock().unwrap().clear();
    let (cpu0, bench0, t0) = (
        cpu_secs(&pid.to_string(), tck),
        cpu_secs("self", tck),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (cpu1, bench1, wall) = (
        cpu_secs(&pid.to_string(), tck),
        cpu_secs("self", tck),
        t0.elapsed().as_secs_f64(),
    );
    let lat = latencies.lock().unwrap().clone();
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    // 0 from an older binary without beats.
    let taken = llorch_tests::prom::scrape(&client)
        .await
        .sum("llorch_node_beats_total", &[("outcome", "ok")]);
    let nodes_online: Vec<serde_json::Value> = client.get_json("/v2/nodes").await.expect("nodes");
    let online = nodes_online
        .iter()
        .filter(|n| n["state"] == "online")
        .count();
    terminate(&mut child, Duration::from_secs(5));
    let share = (cpu1 - cpu0) / wall;
    println!(
        "{}, {nodes} nodes every {interval} s, {secs} s measured: {} heartbeats answered ({:.0}/s), latency p50 {:.0} us p99 {:.0} us, {taken} beats taken in all; orchestratord CPU {:.2}% of a core ({:.2} us per node per second); bench process {:.2}% of a core; {online} of {nodes} nodes online at the end",
        if beats { "beats (UDP, 2 an interval) + a heartbeat every 12th interval" } else { "HTTP heartbeats" },
        lat.len(),
        lat.len() as f64 / wall,
        micros(&lat, 0.5),
        micros(&lat, 0.99),
        share * 100.0,
        share * 1e6 / nodes as f64,
        (bench1 - bench0) / wall * 100.0,
    );
    println!(
        "memory: VmRSS {rss_before:.1} MB before registration, {rss_after:.1} MB after {nodes} nodes: {:.1} kB per node",
        (rss_after - rss_before) * 1e3 / nodes as f64
    );
}

fn main() {
    let nodes: usize = env_or("LLORCH_BENCH_NODES", 1000);
    let only: String = env_or("LLORCH_BENCH_ONLY", String::new());
    println!("load average before: {}", loadavg());
    if only.is_empty() || only == "placement" {
        placement(nodes);
    }
    if only.is_empty() || only == "heartbeats" {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // Both protocols, one after the other in one run, unless one is chosen.
        let modes: String = env_or("LLORCH_BENCH_HEARTBEATS", "http,beats".to_string());
        for mode in modes.split(',') {
            rt.block_on(heartbeats(nodes, mode == "beats"));
        }
    }
}
