//! Chat traffic as users send it, side by side in one run: llama-orch's home stack against
//! llama-server on the same model, threads, slots and context. Method and results:
//! docs/PERFORMANCE.md, "Chat traffic".
//!
//! Two workloads, each a series of greedy streamed `POST /v1/chat/completions` timed by the
//! client:
//! - `shared`: 8 system prompts of about 740 tokens and 48 requests, each one of the system
//!   prompts (in a fixed shuffled order) and a short unique question, 4 at a time, 16 tokens
//!   out.
//! - `multiturn`: 16 conversations of 6 turns, all 16 active at once (each sends its next turn
//!   when its last answer is in, resending its whole history), 48 tokens out.
//! - `burst`: 8 rounds, each a new system prompt of about 740 tokens sent by 4 clients at once
//!   with their own short questions (an agent fanning out, or users arriving together), 16
//!   tokens out; a round starts when the last one's answers are in.
//!
//! Reported per target: requests (turns) per second over the workload's wall time and time to
//! first token (p50, p90). Each target starts fresh (nothing cached) before each workload.
//!
//! Run with `cargo build --release --bins && cargo bench -p orchestratord --bench chat_traffic`.
//! Settings come from the environment:
//! - `LLORCH_BENCH_LLAMA_SERVER`: the llama-server binary (default: `llama-server` on `PATH`);
//!   without one only llama-orch is measured and the comparison says SKIPPED.
//! - `LLORCH_BENCH_WORKLOADS` (default `shared,multiturn,burst`).
//! - `LLORCH_BENCH_THREADS` (default 2), `LLORCH_BENCH_SLOTS` (default 4; 2048 tokens each).
//! - `LLORCH_BENCH_MODEL` / `LLORCH_TEST_MODEL`: the GGUF (default: the bundled model).

mod common;
use common::stack::{bench_model, Stack, MODEL_ID};
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use llorch_client::{EventStream, HttpClient};
use serde_json::{json, Value};

const CTX_PER_SLOT: u32 = 2048;

/// A server under test: its OpenAI base URL and what keeps it running.
enum Running {
    Orch(Box<Stack>),
    LlamaServer {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    },
}

impl Running {
    fn url(&self) -> String {
        match self {
            Running::Orch(s) => s.url(),
            Running::LlamaServer { port, .. } => format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::LlamaServer { child, .. } = self {
            terminate(child, Duration::from_secs(10));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Orch,
    LlamaServer,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Orch => "llama-orch",
            Target::LlamaServer => "llama-server",
        }
    }
}

fn llama_server_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LLORCH_BENCH_LLAMA_SERVER") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("llama-server"))
            .find(|p| p.is_file())
    })
}

async fn start(target: Target, slots: u32, threads: u32, server: Option<&Path>) -> Running {
    match target {
        Target::Orch => {
            let mut stack = Stack::start(slots, threads);
            stack.wait_ready().await;
            Running::Orch(Box::new(stack))
        }
        Target::LlamaServer => {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            let log = std::fs::File::create(dir.path().join("llama-server.log")).expect("log");
            let child = Command::new(server.expect("llama-server binary"))
                .arg("-m")
                .arg(bench_model())
                .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
                .args(["-np", &slots.to_string()])
                .args(["-c", &(slots * CTX_PER_SLOT).to_string()])
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("spawn llama-server");
            let running = Running::LlamaServer {
                child,
                port,
                _dir: dir,
            };
            let client = HttpClient::new(&running.url()).expect("url");
            let started = Instant::now();
            loop {
                let req = client
                    .build(client.request(hyper::Method::GET, "/health"), Bytes::new())
                    .expect("request");
                if client
                    .send(req)
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "llama-server not ready after 60 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            running
        }
    }
}

/// What a client saw of one streamed chat completion.
struct Answer {
    ttft: f64,
    text: String,
    /// Prompt tokens the server computed (`prompt_tokens - cached_tokens` from `usage`; the
    /// whole prompt when the server does not report cached tokens).
    computed: u64,
}

/// One streamed chat completion on a new connection (llama-server closes kept-alive
/// connections on its own schedule).
async fn chat(url: &str, messages: &[Value], max_tokens: u32) -> Answer {
    let client = HttpClient::new(url).expect("url");
    let body = Bytes::from(
        serde_json::to_vec(&json!({
            "model": MODEL_ID,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .expect("json"),
    );
    let sent = Instant::now();
    let resp = client
        .post_raw("/v1/chat/completions", body, &[])
        .await
        .expect("request");
    assert!(resp.status().is_success(), "status {}", resp.status());
    let mut frames = EventStream::from_response(resp, Path::new("server"))
        .await
        .expect("stream");
    let mut ttft = None;
    let mut text = String::new();
    let mut computed = 0;
    while let Some(f) = frames.next_frame().await {
        let f = f.expect("frame");
        if f.data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(&f.data).expect("chunk");
        if let Some(prompt) = v["usage"]["prompt_tokens"].as_u64() {
            let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
            computed = prompt.saturating_sub(cached);
        }
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            if !t.is_empty() {
                ttft.get_or_insert_with(|| sent.elapsed().as_secs_f64() * 1e3);
                text.push_str(t);
            }
        }
    }
    Answer {
        ttft: ttft.unwrap_or_else(|| sent.elapsed().as_secs_f64() * 1e3),
        text,
        computed,
    }
}

/// A system prompt of about 740 tokens, different for each `k`.
fn system_prompt(k: usize) -> String {
    let products = [
        "routers", "kettles", "bicycles", "cameras", "tents", "pianos", "drones", "lamps", "boots",
        "clocks", "ovens", "kayaks", "radios", "desks", "scooters", "printers",
    ];
    let product = products[k % products.len()];
    let mut s = format!(
        "You are the support assistant of shop number {k}, which sells {product}. Follow these rules. "
    );
    for i in 0..25 {
        s.push_str(&format!(
            "Rule {i} for {product}: be polite, answer in two sentences, mention warranty case {}, and never invent prices. ",
            k * 100 + i
        ));
    }
    s
}

struct Outcome {
    rate: f64,
    ttft: Vec<f64>,
    /// Prompt tokens computed over the workload.
    computed: u64,
}

/// 48 requests over `prompts` system prompts, 4 at a time.
async fn shared(url: &str, prompts: usize) -> Outcome {
    let requests = 48;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let next = Arc::clone(&next);
            let url = url.to_string();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return answers;
                    }
                    // A fixed shuffle: prompts come back, but not in a cycle.
                    let k = (i * 5 + i / 8) % prompts;
                    let messages = [
                        json!({"role": "system", "content": system_prompt(k)}),
                        json!({"role": "user", "content": format!("Question {i}: how do I reset it?")}),
                    ];
                    answers.push(chat(&url, &messages, 16).await);
                }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for w in workers {
        answers.extend(w.await.expect("worker"));
    }
    Outcome {
        rate: requests as f64 / started.elapsed().as_secs_f64(),
        ttft: answers.iter().map(|a| a.ttft).collect(),
        computed: answers.iter().map(|a| a.computed).sum(),
    }
}

/// 16 conversations of 6 turns, all active at once.
async fn multiturn(url: &str) -> Outcome {
    let (conversations, turns) = (16, 6);
    let started = Instant::now();
    let tasks: Vec<_> = (0..conversations)
        .map(|c| {
            let url = url.to_string();
            tokio::spawn(async move {
                let mut messages = vec![json!({"role": "system", "content": format!("You are assistant {c}. Answer briefly.")})];
                let mut answers = Vec::new();
                for t in 0..turns {
                    messages.push(json!({"role": "user", "content": format!("Conversation {c}, turn {t}: tell me one more fact about the number {}.", c * 10 + t)}));
                    let answer = chat(&url, &messages, 48).await;
                    messages.push(json!({"role": "assistant", "content": answer.text.clone()}));
                    answers.push(answer);
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.expect("conversation"));
    }
    Outcome {
        rate: (conversations * turns) as f64 / started.elapsed().as_secs_f64(),
        ttft: answers.iter().map(|a| a.ttft).collect(),
        computed: answers.iter().map(|a| a.computed).sum(),
    }
}

/// `rounds` new system prompts, each sent by 4 clients at once.
async fn burst(url: &str, rounds: usize) -> Outcome {
    let started = Instant::now();
    let mut answers = Vec::new();
    for r in 0..rounds {
        let calls: Vec<_> = (0..4)
            .map(|u| {
                let url = url.to_string();
                tokio::spawn(async move {
                    let messages = [
                        json!({"role": "system", "content": system_prompt(r)}),
                        json!({"role": "user", "content": format!("Client {u} of round {r}: is it still under warranty?")}),
                    ];
                    chat(&url, &messages, 16).await
                })
            })
            .collect();
        for c in calls {
            answers.push(c.await.expect("call"));
        }
    }
    Outcome {
        rate: answers.len() as f64 / started.elapsed().as_secs_f64(),
        ttft: answers.iter().map(|a| a.ttft).collect(),
        computed: answers.iter().map(|a| a.computed).sum(),
    }
}

fn main() {
    let threads: u32 = env_or("LLORCH_BENCH_THREADS", 2);
    let slots: u32 = env_or("LLORCH_BENCH_SLOTS", 4);
    let workloads: String = env_or(
        "LLORCH_BENCH_WORKLOADS",
        "shared,multiturn,burst".to_string(),
    );
    let server = llama_server_bin();
    let mut targets = vec![Target::Orch];
    match &server {
        Some(p) => {
            println!("llama-server: {}", p.display());
            targets.insert(0, Target::LlamaServer);
        }
        None => println!(
            "llama-server: SKIPPED (none on PATH; set LLORCH_BENCH_LLAMA_SERVER); llama-orch alone"
        ),
    }
    println!("load average before: {}", loadavg());
    println!(
        "chat traffic: {slots} slots x {CTX_PER_SLOT} tokens, {threads} threads, model {}",
        bench_model().display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for workload in workloads.split(',') {
        let mut results = Vec::new();
        for &target in &targets {
            let outcome = rt.block_on(async {
                let running = start(target, slots, threads, server.as_deref()).await;
                let url = running.url();
                let outcome = match workload {
                    "shared" => shared(&url, 8).await,
                    "multiturn" => multiturn(&url).await,
                    "burst" => burst(&url, 8).await,
                    other => panic!("unknown workload {other}"),
                };
                drop(running);
                outcome
            });
            println!(
                "  {workload:<10} {:<13} {:>6.3} req/s   TTFT p50 {:>8.1} ms   p90 {:>8.1} ms   prompt tokens computed {:>6}   (n={})",
                target.name(),
                outcome.rate,
                median(&outcome.ttft),
                quantile(&outcome.ttft, 0.9),
                outcome.computed,
                outcome.ttft.len()
            );
            results.push((target, outcome));
        }
        if let [(Target::LlamaServer, base), (Target::Orch, ours)] = &results[..] {
            println!(
                "  {workload:<10} llama-orch / llama-server: requests/s {:.2}x, TTFT p50 {:.2}x",
                ours.rate / base.rate,
                median(&ours.ttft) / median(&base.ttft)
            );
        }
    }
    println!("load average after: {}", loadavg());
}
