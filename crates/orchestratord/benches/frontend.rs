//! Frontend tax: what orchestratord and pool-managerd add to time to first token and to the gap
//! between tokens, against a client of the engine's socket. Method and results:
//! docs/PERFORMANCE.md, "Frontend tax".
//!
//! Starts the real home stack from the release binaries (`orchestratord` on a free loopback
//! port, `pool-managerd` with one pool, which starts `engine-provisioner` and `llorch-engine` on
//! the default model) and alternates the same greedy chat request two ways: straight to the
//! engine's Unix socket (`POST /generate`), and through orchestratord's OpenAI API
//! (`POST /v1/chat/completions`, `"stream": true`), which goes orchestratord -> pool-managerd ->
//! engine. Both are timed by the client, from sending the request to each token.
//!
//! Run with `cargo build --release --bins && cargo bench -p orchestratord --bench frontend`
//! (the binaries must be built first; `make bench` does both). Settings come from the
//! environment:
//! - `LLORCH_BENCH_REPS` (default 20): measured pairs (one request each way per pair; the order
//!   within a pair alternates).
//! - `LLORCH_BENCH_TOKENS` (default 64): `max_tokens` of every request.
//! - `LLORCH_BENCH_SLOTS` (default 1): slots of the pool.
//! - `LLORCH_BENCH_THREADS` (default 2): engine threads.
//! - `LLORCH_BENCH_PROMPT` (default "Tell me about lighthouses."): the user message.
//! - `LLORCH_BENCH_MODEL` / `LLORCH_TEST_MODEL`: the GGUF (default: the bundled default model
//!   under `$LLORCH_CACHE`, `$XDG_CACHE_HOME/llama-orch` or `~/.cache/llama-orch`).
//! - `LLORCH_BENCH_LOG` (default `info`): the daemons' log filter.

mod common;
use common::stack::{bench_model, Stack, MODEL_ID};
use common::*;

use std::path::Path;
use std::time::Instant;

use bytes::Bytes;
use llorch_client::{EventStream, HttpClient, UnixClient};
use llorch_wire::engine::{ChatMessage, EngineEvent, GenerateRequest};
use serde_json::{json, Value};

/// What a client saw of one stream.
#[derive(Debug, Default)]
struct Seen {
    /// Request sent -> first token with text, ms.
    ttft: f64,
    /// Between consecutive tokens with text, ms.
    gaps: Vec<f64>,
    tokens: usize,
    text: String,
}

impl Seen {
    fn token(&mut self, sent: Instant, last: &mut Option<Instant>, t: &str) {
        if t.is_empty() {
            return;
        }
        let now = Instant::now();
        match last {
            None => self.ttft = now.duration_since(sent).as_secs_f64() * 1e3,
            Some(prev) => self
                .gaps
                .push(now.duration_since(*prev).as_secs_f64() * 1e3),
        }
        *last = Some(now);
        self.tokens += 1;
        self.text.push_str(t);
    }
}

async fn direct(engine: &UnixClient, req: &GenerateRequest) -> Seen {
    let mut seen = Seen::default();
    let mut last = None;
    let sent = Instant::now();
    let mut events = engine.generate(req).await.expect("engine request");
    while let Some(ev) = events.next_event().await {
        match ev.expect("engine event") {
            EngineEvent::Token(t) => seen.token(sent, &mut last, &t.t),
            EngineEvent::End(_) => return seen,
            EngineEvent::Error(e) => panic!("engine error event: {e}"),
        }
    }
    panic!("engine stream ended without an end event")
}

async fn via_stack(orch: &HttpClient, body: &Bytes) -> Seen {
    let mut seen = Seen::default();
    let mut last = None;
    let sent = Instant::now();
    let resp = orch
        .post_raw("/v1/chat/completions", body.clone(), &[])
        .await
        .expect("orchestratord request");
    let mut frames = EventStream::from_response(resp, Path::new("orchestratord"))
        .await
        .expect("orchestratord stream");
    while let Some(f) = frames.next_frame().await {
        let f = f.expect("orchestratord frame");
        if f.data == "[DONE]" {
            return seen;
        }
        let v: Value = serde_json::from_str(&f.data).expect("chunk JSON");
        if let Some(e) = v.get("error") {
            panic!("orchestratord error chunk: {e}");
        }
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            seen.token(sent, &mut last, t);
        }
    }
    panic!("orchestratord stream ended without [DONE]")
}

fn row(name: &str, v: &[f64], unit: &str) {
    println!(
        "  {name:<44} median {:>8.3} {unit}   p90 {:>8.3} {unit}   (n={})",
        median(v),
        quantile(v, 0.9),
        v.len()
    );
}

fn main() {
    let reps: usize = env_or("LLORCH_BENCH_REPS", 20);
    let tokens: u32 = env_or("LLORCH_BENCH_TOKENS", 64);
    let slots: u32 = env_or("LLORCH_BENCH_SLOTS", 1);
    let threads: u32 = env_or("LLORCH_BENCH_THREADS", 2);
    let prompt: String = env_or(
        "LLORCH_BENCH_PROMPT",
        "Tell me about lighthouses.".to_string(),
    );
    let model = bench_model();
    println!("load average before: {}", loadavg());
    println!(
        "frontend tax: {reps} pairs, max_tokens {tokens}, {slots} slot(s), {threads} threads, model {}",
        model.display()
    );
    // One client thread, as in the engine bench: each token wakes exactly one thread, and both
    // paths are timed by the same loop.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut stack = Stack::start(slots, threads);
    let started = Instant::now();
    let socket = rt.block_on(stack.wait_ready());
    println!(
        "stack ready in {:.1} s; engine socket {}",
        started.elapsed().as_secs_f64(),
        socket.display()
    );
    let engine = UnixClient::new(&socket);
    let orch = HttpClient::new(&stack.url()).expect("valid url");
    let messages = vec![ChatMessage::new("user", prompt.clone())];
    let req = GenerateRequest {
        max_tokens: Some(tokens),
        temperature: Some(0.0),
        ..GenerateRequest::chat(messages)
    };
    let body = Bytes::from(
        serde_json::to_vec(&json!({
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": true,
        }))
        .expect("serializes"),
    );

    let (mut d_ttft, mut s_ttft, mut diff_ttft) = (Vec::new(), Vec::new(), Vec::new());
    let (mut d_gaps, mut s_gaps) = (Vec::new(), Vec::new());
    let (mut d_gap_med, mut s_gap_med, mut diff_gap_med) = (Vec::new(), Vec::new(), Vec::new());
    let mut diff_gap_mean = Vec::new();
    rt.block_on(async {
        // Warm-up: loads the prompt into the slot's cache, opens orchestratord's connection.
        let first = direct(&engine, &req).await;
        let again = via_stack(&orch, &body).await;
        assert_eq!(
            first.text, again.text,
            "the two paths must generate the same greedy text"
        );
        println!(
            "warm-up: {} tokens each way, same text; measuring...",
            first.tokens
        );
        for i in 0..reps {
            let (d, s) = if i % 2 == 0 {
                let d = direct(&engine, &req).await;
                let s = via_stack(&orch, &body).await;
                (d, s)
            } else {
                let s = via_stack(&orch, &body).await;
                let d = direct(&engine, &req).await;
                (d, s)
            };
            assert_eq!(d.tokens, s.tokens, "both paths must see the same tokens");
            d_ttft.push(d.ttft);
            s_ttft.push(s.ttft);
            diff_ttft.push(s.ttft - d.ttft);
            let (dm, sm) = (median(&d.gaps), median(&s.gaps));
            d_gap_med.push(dm);
            s_gap_med.push(sm);
            diff_gap_med.push(sm - dm);
            let mean = |g: &[f64]| g.iter().sum::<f64>() / g.len().max(1) as f64;
            diff_gap_mean.push(mean(&s.gaps) - mean(&d.gaps));
            d_gaps.extend_from_slice(&d.gaps);
            s_gaps.extend_from_slice(&s.gaps);
        }
    });

    println!();
    println!("Time to first token (cached prompt: the same request every time, both paths hit the slot's prompt cache alike):");
    row("direct to the engine socket", &d_ttft, "ms");
    row("through orchestratord + pool-managerd", &s_ttft, "ms");
    row("difference per pair (stack - direct)", &diff_ttft, "ms");
    println!("Inter-token gap (all gaps of all requests):");
    row("direct to the engine socket", &d_gaps, "ms");
    row("through orchestratord + pool-managerd", &s_gaps, "ms");
    println!("Inter-token gap, per pair:");
    row("median gap, stack - direct", &diff_gap_med, "ms");
    row("mean gap, stack - direct", &diff_gap_mean, "ms");

    println!("load average after: {}", loadavg());
    let ttft_tax = median(&diff_ttft);
    let gap_tax = median(&diff_gap_med);
    println!();
    println!(
        "TTFT tax {:.3} ms (target < 2 ms): {}",
        ttft_tax,
        if ttft_tax < 2.0 { "met" } else { "NOT met" }
    );
    println!(
        "per-token tax {:.3} ms (target < 0.2 ms): {}",
        gap_tax,
        if gap_tax < 0.2 { "met" } else { "NOT met" }
    );
    drop(stack);
}
