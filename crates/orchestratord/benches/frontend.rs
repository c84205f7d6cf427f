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
use common::*;

/// `LLORCH_BENCH_MODEL`, else the default model the tests use.
fn bench_model() -> PathBuf {
    std::env::var_os("LLORCH_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(model_path)
}

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use llorch_client::{EventStream, HttpClient, UnixClient};
use llorch_wire::engine::{ChatMessage, EngineEvent, GenerateRequest};
use llorch_wire::handoff::Handoff;
use llorch_wire::node::PoolState;
use llorch_wire::task::PoolsAnswer;
use serde_json::{json, Value};

const MODEL_ID: &str = "smollm2-135m";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const POOL: &str = "default";

/// A daemon this bench started; stopped with SIGTERM (then SIGKILL) when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Self {
        let child = cmd
            .env("LLORCH_LOG", env_or("LLORCH_BENCH_LOG", "info".to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { name, child, log }
    }

    fn check_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited with {status}:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        common::terminate(&mut self.child, Duration::from_secs(15));
    }
}

struct Stack {
    // Dropped in order: the node (and its engine) before the control plane, then the directory.
    node: Daemon,
    orch: Daemon,
    dir: tempfile::TempDir,
    port: u16,
}

impl Stack {
    fn start(slots: u32, threads: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("llorch-bench-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).expect("logs dir");
        let mut cmd = Command::new(bin("orchestratord"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--queue-capacity", "64"]);
        let mut orch = Daemon::spawn("orchestratord", cmd, logs.join("orchestratord.log"));
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            orch.check_alive();
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "orchestratord does not accept connections"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let runtime = dir.path().join("run");
        // The tests' shared cache: staging there is a verified copy, done once.
        let cache = std::env::temp_dir().join("llorch-test-cache");
        let config = format!(
            r#"[node]
id = "bench-node"
control_plane = "http://127.0.0.1:{port}"
listen = "unix:{runtime}/pool-managerd.sock"
cache_dir = "{cache}"
runtime_dir = "{runtime}"
heartbeat_secs = 2
engine_bin = "{engine}"
provisioner_bin = "{provisioner}"

[[pools]]
id = "{POOL}"
slots = {slots}
ctx = 2048
threads = {threads}

[pools.model]
id = "{MODEL_ID}"
source = "{model}"
sha256 = "{MODEL_SHA256}"
"#,
            runtime = runtime.display(),
            cache = cache.display(),
            engine = bin("llorch-engine").display(),
            provisioner = bin("engine-provisioner").display(),
            model = bench_model().display(),
        );
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, config).expect("write node config");
        let mut cmd = Command::new(bin("pool-managerd"));
        cmd.arg("--config").arg(&config_path);
        let node = Daemon::spawn("pool-managerd", cmd, logs.join("pool-managerd.log"));
        Self {
            node,
            orch,
            dir,
            port,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until orchestratord sees the pool ready and the engine's handoff file names its
    /// socket.
    async fn wait_ready(&mut self) -> PathBuf {
        let client = HttpClient::new(&self.url()).expect("valid url");
        let handoff = self.dir.path().join(format!("run/handoff/{POOL}.json"));
        let start = Instant::now();
        loop {
            self.orch.check_alive();
            self.node.check_alive();
            let ready = client
                .get_json::<PoolsAnswer>("/v2/pools")
                .await
                .ok()
                .is_some_and(|a| {
                    a.pools
                        .iter()
                        .any(|p| p.state == PoolState::Ready && p.slots_busy == 0)
                });
            let socket = std::fs::read_to_string(&handoff)
                .ok()
                .and_then(|t| serde_json::from_str::<Handoff>(&t).ok())
                .map(|h| PathBuf::from(h.socket));
            if let (true, Some(socket)) = (ready, socket) {
                return socket;
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "no pool ready after 180 s; logs in {}",
                self.dir.path().join("logs").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

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
