//! Cache-aware placement against placement by free slots alone, side by side in one run: two
//! worker nodes (loopback, one pool of 4 slots each, 1 engine thread each) behind one
//! orchestratord, the shared-system-prompt workload spread over 16 system prompts. Method and
//! results: docs/PERFORMANCE.md, "Cache-aware placement".
//!
//! Each mode starts a fresh stack (nothing cached) and runs the same 96 native tasks (one of 16
//! system prompts of about 740 tokens, in a fixed shuffled order, and a short unique question;
//! greedy, 16 tokens out), `LLORCH_BENCH_CONCURRENCY` (default 4, half the slots) at a time:
//! below saturation, where placement has a choice (at 8, every task takes the one slot that
//! just freed, wherever it is). Reported per mode: tasks per second over the wall time,
//! time to first token (p50, p90, from submission to the first `token` event), the prompt tokens
//! served from cache, and each worker's share of the tasks.
//!
//! Run with `cargo build --release --bins && cargo bench -p orchestratord --bench
//! cache_placement`. `LLORCH_BENCH_MODES` (default `on,off`) picks the modes;
//! `LLORCH_BENCH_PREFIX_CACHE_MIB` (default 64) is each worker's host prefix cache: with about
//! 18 MiB a prompt state, each worker holds some 7 system prompts (4 slots, 3 in host memory),
//! fewer than the 16 in the workload, as in a cluster whose prompts outnumber one node's memory
//! (`default` leaves the pool default, which holds all of them).

mod common;
use common::stack::{NodeSpec, Stack, MODEL_ID};
use common::*;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use llorch_client::HttpClient;
use llorch_wire::engine::ChatMessage;
use llorch_wire::task::{TaskAccepted, TaskEnd, TaskRequest};

const TASKS: usize = 96;
const PROMPTS: usize = 16;

fn system_prompt(k: usize) -> String {
    let mut s =
        format!("You are the support assistant of shop number {k}. Follow these rules carefully. ");
    for i in 0..25 {
        s.push_str(&format!(
            "Rule {i} of shop {k}: be polite, answer in two sentences, mention warranty case {}, and never invent prices. ",
            k * 100 + i
        ));
    }
    s
}

struct Ran {
    ttft: f64,
    pool: String,
    end: TaskEnd,
}

async fn run_task(url: &str, i: usize) -> Ran {
    let client = HttpClient::new(url).expect("url");
    let k = (i * 7 + i / PROMPTS) % PROMPTS;
    let req = TaskRequest {
        model_ref: MODEL_ID.into(),
        messages: Some(vec![
            ChatMessage::new("system", system_prompt(k)),
            ChatMessage::new("user", format!("Question {i}: how do I reset it?")),
        ]),
        max_tokens: Some(16),
        temperature: Some(0.0),
        ..TaskRequest::default()
    };
    let sent = Instant::now();
    let accepted: TaskAccepted = client.post_json("/v2/tasks", &req).await.expect("task");
    let mut events = client.events(&accepted.streams.sse).await.expect("events");
    let (mut ttft, mut pool, mut end) = (None, None, None);
    while let Some(f) = events.next_frame().await {
        let f = f.expect("frame");
        match f.event.as_str() {
            "started" => {
                let v: serde_json::Value = serde_json::from_str(&f.data).expect("started");
                pool = v["pool_id"].as_str().map(str::to_string);
            }
            "token" => {
                ttft.get_or_insert_with(|| sent.elapsed().as_secs_f64() * 1e3);
            }
            "end" => {
                end = Some(serde_json::from_str::<TaskEnd>(&f.data).expect("end"));
                break;
            }
            "error" => panic!("task failed: {}", f.data),
            _ => {}
        }
    }
    Ran {
        ttft: ttft.unwrap_or_else(|| sent.elapsed().as_secs_f64() * 1e3),
        pool: pool.expect("a started event"),
        end: end.expect("an end event"),
    }
}

struct Outcome {
    rate: f64,
    ttft: Vec<f64>,
    cached: u64,
    prompt: u64,
    per_pool: BTreeMap<String, usize>,
}

async fn workload(url: &str, concurrency: usize) -> Outcome {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let next = Arc::clone(&next);
            let url = url.to_string();
            tokio::spawn(async move {
                let mut ran = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= TASKS {
                        return ran;
                    }
                    ran.push(run_task(&url, i).await);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    let rate = TASKS as f64 / started.elapsed().as_secs_f64();
    let mut per_pool = BTreeMap::new();
    for r in &all {
        *per_pool.entry(r.pool.clone()).or_insert(0) += 1;
    }
    Outcome {
        rate,
        ttft: all.iter().map(|r| r.ttft).collect(),
        cached: all.iter().map(|r| u64::from(r.end.cached_tokens)).sum(),
        prompt: all.iter().map(|r| u64::from(r.end.tokens_in)).sum(),
        per_pool,
    }
}

fn main() {
    let modes: String = env_or("LLORCH_BENCH_MODES", "on,off".to_string());
    let cache: String = env_or("LLORCH_BENCH_PREFIX_CACHE_MIB", "64".to_string());
    let concurrency: usize = env_or("LLORCH_BENCH_CONCURRENCY", 4);
    let cache_mib = match cache.as_str() {
        "default" => None,
        m => Some(
            m.parse()
                .expect("LLORCH_BENCH_PREFIX_CACHE_MIB: MiB or `default`"),
        ),
    };
    println!("load average before: {}", loadavg());
    println!(
        "cache-aware placement: 2 workers x 4 slots x 2048 tokens, 1 thread each, prefix cache {cache} MiB; {TASKS} tasks over {PROMPTS} system prompts, {concurrency} at a time"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut results = Vec::new();
    for mode in modes.split(',') {
        let flag = match mode {
            "on" => "true",
            "off" => "false",
            other => panic!("unknown mode {other} (on or off)"),
        };
        let outcome = rt.block_on(async {
            let specs = [
                NodeSpec {
                    id: "worker-1",
                    pool: "w1",
                    slots: 4,
                    threads: 1,
                    prefix_cache_mib: cache_mib,
                },
                NodeSpec {
                    id: "worker-2",
                    pool: "w2",
                    slots: 4,
                    threads: 1,
                    prefix_cache_mib: cache_mib,
                },
            ];
            let mut stack = Stack::start_nodes(&specs, &["--cache-aware-placement", flag]);
            stack.wait_ready().await;
            workload(&stack.url(), concurrency).await
        });
        let top = outcome.per_pool.values().max().copied().unwrap_or(0);
        println!(
            "  cache-aware {mode:<3}  {:>6.3} tasks/s   TTFT p50 {:>8.1} ms   p90 {:>8.1} ms   cached {:>5.1}% of prompt tokens   per pool {:?} (largest share {:.0}%)",
            outcome.rate,
            median(&outcome.ttft),
            quantile(&outcome.ttft, 0.9),
            100.0 * outcome.cached as f64 / outcome.prompt.max(1) as f64,
            outcome.per_pool,
            100.0 * top as f64 / TASKS as f64
        );
        results.push((mode.to_string(), outcome));
    }
    if let [(a, on), (b, off)] = &results[..] {
        if a == "on" && b == "off" {
            println!(
                "  on / off: tasks/s {:.2}x, TTFT p50 {:.2}x better",
                on.rate / off.rate,
                median(&off.ttft) / median(&on.ttft)
            );
        }
    }
    println!("load average after: {}", loadavg());
}
