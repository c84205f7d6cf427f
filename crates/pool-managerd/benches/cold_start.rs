//! Cold start of an on-demand pool: how long the first request to a pool on `standby` waits for
//! its first token, next to the plain model load time. Method and results: docs/PERFORMANCE.md,
//! "Cold start of on-demand pools".
//!
//! The real release `pool-managerd` (process launcher) runs one on-demand pool of the default
//! model with a one-second keep-alive. Each round measures, one after the other:
//!
//! 1. **plain load**: `llorch-engine` started by hand on the same plan (its own socket, no
//!    idle exit), from spawn until it tells its service manager `READY=1` (model loaded, slots
//!    ready, handoff written); then the request below sent to it directly, timed to its first
//!    token (a fresh context's first request); then it is stopped with SIGTERM.
//! 2. **cold**: with the pool on `standby` (no engine runs), a generation request to the node
//!    API, from sending it until the first token event arrives. The node's socket holds the
//!    request, pool-managerd starts the engine, the engine loads the model and answers.
//! 3. **warm**: the same request again right away, to the loaded pool.
//!
//! Then the pool unloads (keep-alive) and the next round starts. Reported: the median of each,
//! the median per-round cold-start overhead (cold - warm), and cold against what a cold start
//! cannot beat (plain load, then that engine's first token).
//!
//! Run with `cargo build --release --bins && cargo bench -p pool-managerd --bench cold_start`.
//! `LLORCH_BENCH_ROUNDS` (default 10) sets the rounds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llorch_client::HttpClient;
use llorch_tests::bench::{env_or, first_token, median, spawn_pool_managerd};
use llorch_tests::notify::NotifySocket;
use llorch_tests::stack::{free_port, terminate};
use llorch_tests::{bin, model_path};
use llorch_wire::node::{PoolState, PoolStatus};

const REQUEST: &str = r#"{"messages":[{"role":"user","content":"What city is the capital of France?"}],"max_tokens":8,"temperature":0}"#;

fn write_config(dir: &Path) -> PathBuf {
    let config = format!(
        r#"[node]
id = "bench"
control_plane = "http://127.0.0.1:{port}"
listen = "unix:{dir}/node.sock"
cache_dir = "{dir}/cache"
runtime_dir = "{dir}/run"
heartbeat_secs = 60
launcher = "process"
engine_bin = "{engine}"
provisioner_bin = "{provisioner}"

[[pools]]
id = "ondemand"
slots = 1
ctx = 1024
threads = 2
on_demand = true
keep_alive_secs = 1

[pools.model]
id = "smollm2-135m"
source = "{model}"
"#,
        port = free_port(),
        dir = dir.display(),
        engine = bin("llorch-engine").display(),
        provisioner = bin("engine-provisioner").display(),
        model = model_path().display(),
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Waits, on pool-managerd's status lines, until the pool is in `want`.
async fn wait_state(client: &HttpClient, notify: &mut NotifySocket, want: PoolState) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(st) = client.get_json::<PoolStatus>("/v2/pools/ondemand").await {
            if st.state == want {
                return;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(notify.next(left).is_some(), "the pool never reached {want}");
    }
}

/// Starts the engine by hand on the pool's plan and times it until READY=1, then times its
/// first request's first token.
async fn plain_load(dir: &Path, plan: &Path, round: usize) -> (Duration, Duration) {
    let own = dir.join(format!("plain-{round}"));
    std::fs::create_dir_all(&own).unwrap();
    let mut notify = NotifySocket::bind(&own);
    let started = Instant::now();
    let mut child: Child = Command::new(bin("llorch-engine"))
        .arg("--plan")
        .arg(plan)
        .arg("--pool")
        .arg("plain")
        .arg("--socket")
        .arg(own.join("e.sock"))
        .arg("--handoff-dir")
        .arg(dir.join("plain-handoff"))
        .arg("--idle-exit-secs")
        .arg("0")
        .env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    notify.wait_for("READY=1", Duration::from_secs(120));
    let load = started.elapsed();
    let engine = HttpClient::new(&format!("unix:{}", own.join("e.sock").display())).unwrap();
    let first = first_token(&engine, "/generate", REQUEST).await;
    terminate(&mut child, Duration::from_secs(10));
    (load, first)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = env_or("LLORCH_BENCH_ROUNDS", 10);
    let dir = tempfile::Builder::new()
        .prefix("cold-")
        .tempdir_in("/tmp")
        .unwrap();
    let config = write_config(dir.path());
    let mut notify = NotifySocket::bind(dir.path());
    let (mut node, client) = spawn_pool_managerd(dir.path(), &config, &notify);
    wait_state(&client, &mut notify, PoolState::Standby).await;
    let plan = dir.path().join("run/plans/ondemand.json");

    let (mut plain, mut plain_first, mut cold, mut warm, mut overhead, mut node_load) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for round in 0..=rounds {
        let (p, pf) = plain_load(dir.path(), &plan, round).await;
        wait_state(&client, &mut notify, PoolState::Standby).await;
        let path = "/v2/pools/ondemand/generate";
        let c = first_token(&client, path, REQUEST).await;
        let w = first_token(&client, path, REQUEST).await;
        let st: PoolStatus = client.get_json("/v2/pools/ondemand").await.unwrap();
        wait_state(&client, &mut notify, PoolState::Standby).await;
        if round == 0 {
            continue; // warm-up: page cache, first process start
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        eprintln!(
            "round {round}: plain load {:.0} ms + first token {:.0} ms, cold first token {:.0} ms, warm {:.0} ms, node-measured load {:?} ms",
            ms(p),
            ms(pf),
            ms(c),
            ms(w),
            st.load_ms
        );
        plain.push(ms(p));
        plain_first.push(ms(p) + ms(pf));
        cold.push(ms(c));
        warm.push(ms(w));
        overhead.push(ms(c) - ms(w));
        node_load.push(st.load_ms.unwrap_or(0) as f64);
    }
    terminate(&mut node, Duration::from_secs(20));
    println!("cold start of an on-demand pool, {rounds} rounds (medians):");
    println!(
        "  plain model load (spawn to READY=1):      {:7.0} ms",
        median(&plain)
    );
    println!(
        "  plain load, then its first token:         {:7.0} ms",
        median(&plain_first)
    );
    println!(
        "  load measured by pool-managerd:           {:7.0} ms",
        median(&node_load)
    );
    println!(
        "  cold request, send to first token:        {:7.0} ms",
        median(&cold)
    );
    println!(
        "  warm request, send to first token:        {:7.0} ms",
        median(&warm)
    );
    println!(
        "  cold-start overhead (cold - warm):        {:7.0} ms",
        median(&overhead)
    );
    println!(
        "  cold / (plain load + its first token):    {:7.2}",
        median(&cold) / median(&plain_first)
    );
}
