//! Swapping models under a memory budget: the time to first token of a request whose model
//! must unload another first, against the same request when there is room (a plain cold
//! start). Method and results: docs/PERFORMANCE.md, "Swapping models".
//!
//! The real release `pool-managerd` (process launcher) runs three on-demand CPU pools, two of
//! the default model and one of Gemma 3 270M, under `memory_budget_mib` that holds any two and
//! `min_resident_secs = 0`. Each round takes the next pool as the target and measures:
//!
//! 1. **cold**: every pool unloaded, one other pool loaded (room for the target), then the
//!    request to the target, from sending to its first token: the model's load, the engine's
//!    start and a fresh context's first token.
//! 2. **swap**: the target unloaded again, both other pools loaded (no room), then the same
//!    request: the node unloads the least recently used pool, then loads the target.
//!
//! Reported: medians of each per model, and of the per-round swap overhead (swap - cold).
//!
//! Run with `cargo build --release --bins && cargo bench -p pool-managerd --bench swap`.
//! `LLORCH_BENCH_ROUNDS` (default 9, three per model) sets the rounds.

use std::path::Path;
use std::time::{Duration, Instant};

use llorch_client::HttpClient;
use llorch_tests::bench::{env_or, first_token, median, spawn_pool_managerd};
use llorch_tests::notify::NotifySocket;
use llorch_tests::stack::{free_port, terminate};
use llorch_tests::{bin, model_path, second_model_path};
use llorch_wire::node::{PoolState, PoolStatus};

// A plain prompt: the Gemma file has no chat template.
const REQUEST: &str = r#"{"prompt":"The capital of France is","max_tokens":8,"temperature":0}"#;
const POOLS: [&str; 3] = ["small-a", "gemma", "small-b"];

fn pool(id: &str, model_id: &str, model: &Path) -> String {
    format!(
        "[[pools]]\nid = \"{id}\"\nslots = 1\nctx = 1024\nthreads = 2\non_demand = true\nprefix_cache_mib = 0\n\n[pools.model]\nid = \"{model_id}\"\nsource = \"{}\"\n\n",
        model.display()
    )
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    let d = dir.display();
    let mut config = format!(
        "[node]\nid = \"bench\"\ncontrol_plane = \"http://127.0.0.1:{port}\"\nlisten = \"unix:{d}/node.sock\"\ncache_dir = \"{d}/cache\"\nruntime_dir = \"{d}/run\"\nheartbeat_secs = 60\nlauncher = \"process\"\nengine_bin = \"{engine}\"\nprovisioner_bin = \"{prov}\"\nmemory_budget_mib = 1700\nmin_resident_secs = 0\n\n",
        port = free_port(),
        engine = bin("llorch-engine").display(),
        prov = bin("engine-provisioner").display(),
    );
    config += &pool("small-a", "smollm2-a", &model_path());
    config += &pool("gemma", "gemma-270m", &second_model_path());
    config += &pool("small-b", "smollm2-b", &model_path());
    let path = dir.join("node.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// The request to `pool`: the time to its first token, after reading the answer.
async fn ask(client: &HttpClient, pool: &str) -> Duration {
    first_token(client, &format!("/v2/pools/{pool}/generate"), REQUEST).await
}

async fn unload(client: &HttpClient, pool: &str) {
    let st: PoolStatus = client
        .post_json(&format!("/v2/pools/{pool}/unload"), &serde_json::json!({}))
        .await
        .unwrap();
    assert!(!st.memory_charged, "{st:?}");
}

/// Waits, on pool-managerd's status lines, until every pool is on standby.
async fn wait_standby(client: &HttpClient, notify: &mut NotifySocket) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let all: Vec<PoolStatus> = client.get_json("/v2/pools").await.unwrap_or_default();
        if all.len() == 3 && all.iter().all(|p| p.state == PoolState::Standby) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            notify.next(left).is_some(),
            "the pools never reached standby"
        );
    }
}

/// One round for `target`: (cold, swap) first-token times.
async fn round(client: &HttpClient, target: &str) -> (Duration, Duration) {
    let others: Vec<&str> = POOLS.iter().copied().filter(|p| *p != target).collect();
    for p in POOLS {
        unload(client, p).await;
    }
    ask(client, others[0]).await;
    let cold = ask(client, target).await;
    unload(client, target).await;
    ask(client, others[1]).await;
    let swap = ask(client, target).await;
    (cold, swap)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = env_or("LLORCH_BENCH_ROUNDS", 9);
    let dir = tempfile::Builder::new()
        .prefix("swap-")
        .tempdir_in("/tmp")
        .unwrap();
    let config = write_config(dir.path());
    let mut notify = NotifySocket::bind(dir.path());
    let (mut node, client) = spawn_pool_managerd(dir.path(), &config, &notify);
    wait_standby(&client, &mut notify).await;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // Warm-up: every model read once (page cache).
    for p in POOLS {
        round(&client, p).await;
    }
    let mut by_model: Vec<(&str, Vec<f64>, Vec<f64>)> =
        POOLS.iter().map(|p| (*p, Vec::new(), Vec::new())).collect();
    let mut overhead = Vec::new();
    for r in 0..rounds {
        let (target, cold_ms, swap_ms) = {
            let target = POOLS[r % POOLS.len()];
            let (cold, swap) = round(&client, target).await;
            (target, ms(cold), ms(swap))
        };
        eprintln!("round {r}: {target}: cold {cold_ms:.0} ms, swap {swap_ms:.0} ms");
        let entry = by_model.iter_mut().find(|(p, _, _)| *p == target).unwrap();
        entry.1.push(cold_ms);
        entry.2.push(swap_ms);
        overhead.push(swap_ms - cold_ms);
    }
    let log = std::fs::read_to_string(dir.path().join("pool-managerd.log")).unwrap_or_default();
    terminate(&mut node, Duration::from_secs(20));
    println!("swapping models under a budget that holds two of three, {rounds} rounds (medians):");
    println!("| pool | cold first token (room free) | swap first token (unload LRU, then load) |");
    println!("| --- | --- | --- |");
    for (p, cold, swap) in &by_model {
        println!("| {p} | {:.0} ms | {:.0} ms |", median(cold), median(swap));
    }
    println!(
        "swap overhead (swap - cold, per round): {:.0} ms",
        median(&overhead)
    );
    let unloads = log
        .matches("Unloading the least recently used idle pool")
        .count();
    println!("unloads for room in the log: {unloads}");
}
