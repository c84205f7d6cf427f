//! Engine benchmark: tokens/s through the engine's socket API (1 and 4 concurrent streams) and
//! time to first token, side by side with a plain in-process llama-cpp-2 decode loop using the
//! same model, threads and per-sequence context; then the cost of structured output: a stream
//! constrained by a JSON Schema next to a free one in the same batch, against two free
//! streams. Method and results: docs/PERFORMANCE.md.
//!
//! Run with `cargo bench -p llorch-engine --bench throughput` (or `make bench`). Settings come
//! from the environment: LLORCH_BENCH_MODEL (default: the bundled model), LLORCH_BENCH_REPS
//! (default 7), LLORCH_BENCH_TOKENS (default 128), LLORCH_BENCH_THREADS (default 2).

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llorch_client::UnixClient;
use llorch_engine::model::{backend, Model, Progress};
use llorch_wire::engine::{EngineEvent, GenerateRequest};

const CTX: u32 = 2048;
const SLOTS: u32 = 4;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn default_model() -> PathBuf {
    std::env::var_os("LLORCH_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME");
            PathBuf::from(home)
                .join(".cache/llama-orch/default-model/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

const OPENINGS: [&str; 26] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "Spring",
    "Summer",
    "Autumn",
    "Winter",
    "Yesterday",
    "Tonight",
    "Tomorrow",
];

/// A prompt of about 46 tokens. Prompts sent one after the other to a slot start with different
/// words, so no prefix is shared and each is evaluated in full (the bench asserts it).
fn prompt(k: usize) -> String {
    format!(
        "{}: the lighthouse keeper wrote in his log every evening. He described the weather, \
         the ships that passed, and the birds on the rocks. Continue his log for tonight:",
        OPENINGS[k % OPENINGS.len()]
    )
}

/// The reference: a plain llama-cpp-2 decode loop in this process, with the engine's context
/// configuration (same threads, `SLOTS` sequences of `CTX` tokens each, 512-token batches).
struct InProcess<'m> {
    model: &'m LlamaModel,
    ctx: llama_cpp_2::context::LlamaContext<'m>,
}

impl<'m> InProcess<'m> {
    fn new(model: &'m LlamaModel, threads: i32) -> Self {
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(CTX * SLOTS))
            .with_n_seq_max(SLOTS)
            .with_n_batch(512)
            .with_n_ubatch(512)
            .with_n_threads(threads)
            .with_n_threads_batch(threads)
            .with_kv_unified(false);
        let ctx = model.new_context(backend(), params).expect("context");
        Self { model, ctx }
    }

    /// Generates `n` greedy tokens for each prompt, all sequences decoded together in one
    /// batch per step. Returns (prefill + first token ms, aggregate decode tokens/s over the
    /// `n - 1` further steps).
    fn run(&mut self, texts: &[String], n: usize) -> (f64, f64) {
        self.ctx.clear_kv_cache();
        let vocab = self.model.vocab();
        let prompts: Vec<Vec<LlamaToken>> = texts
            .iter()
            .map(|t| vocab.tokenize(t.as_bytes(), true, true))
            .collect();
        let mut batch = LlamaBatch::new(512, SLOTS as i32);
        let mut samplers: Vec<LlamaSampler> =
            texts.iter().map(|_| LlamaSampler::greedy()).collect();
        let mut piece = Vec::new();
        let start = Instant::now();
        let mut logits_at = Vec::new();
        for (seq, tokens) in prompts.iter().enumerate() {
            let last = tokens.len() - 1;
            for (i, t) in tokens.iter().enumerate() {
                batch.add(*t, i as i32, &[seq as i32], i == last).unwrap();
            }
            logits_at.push(batch.n_tokens() - 1);
        }
        self.ctx.decode(&mut batch).unwrap();
        let mut next: Vec<LlamaToken> = Vec::new();
        for (seq, at) in logits_at.iter().enumerate() {
            let tok = samplers[seq].sample(&self.ctx, *at);
            piece.clear();
            vocab.token_to_piece_into(tok, &mut piece, false, None);
            next.push(tok);
        }
        let ttft = start.elapsed();
        let mut pos: Vec<i32> = prompts.iter().map(|p| p.len() as i32).collect();
        let decode_start = Instant::now();
        for _ in 1..n {
            batch.clear();
            for (seq, tok) in next.iter().enumerate() {
                batch.add(*tok, pos[seq], &[seq as i32], true).unwrap();
                pos[seq] += 1;
            }
            self.ctx.decode(&mut batch).unwrap();
            for (seq, tok) in next.iter_mut().enumerate() {
                *tok = samplers[seq].sample(&self.ctx, seq as i32);
                piece.clear();
                vocab.token_to_piece_into(*tok, &mut piece, false, None);
            }
        }
        let secs = decode_start.elapsed().as_secs_f64();
        (
            ttft.as_secs_f64() * 1000.0,
            (texts.len() * (n - 1)) as f64 / secs,
        )
    }
}

struct EngineProcess {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
}

impl EngineProcess {
    fn start(model: &Path, threads: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("bench.sock");
        let handoff = dir.path().join("h");
        let child = Command::new(env!("CARGO_BIN_EXE_llorch-engine"))
            .arg("--model")
            .arg(model)
            .arg("--socket")
            .arg(&socket)
            .arg("--handoff-dir")
            .arg(&handoff)
            .args([
                "--pool",
                "bench",
                "--slots",
                &SLOTS.to_string(),
                "--ctx",
                &CTX.to_string(),
            ])
            .args(["--threads", &threads.to_string()])
            .env("LLORCH_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn llorch-engine");
        let start = Instant::now();
        while !handoff.join("bench.json").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "engine not ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            child,
            _dir: dir,
            socket,
        }
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Client-side view of one stream: time to first token, and decode tokens/s between the
/// first and the last token event.
struct Seen {
    ttft_ms: f64,
    tokens: u32,
    decode_tps: f64,
    cached: u32,
    /// The engine's own decode rate from its `end` event.
    engine_tps: f64,
}

async fn stream(client: &UnixClient, req: &GenerateRequest) -> Seen {
    let start = Instant::now();
    let mut s = client.generate(req).await.expect("generate");
    let mut first = None;
    let mut last = start;
    loop {
        match s
            .next_event()
            .await
            .expect("stream ended early")
            .expect("event")
        {
            EngineEvent::Token(_) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
            }
            EngineEvent::End(end) => {
                let first = first.expect("tokens before end");
                let secs = (last - first).as_secs_f64();
                return Seen {
                    ttft_ms: (first - start).as_secs_f64() * 1000.0,
                    tokens: end.completion_tokens,
                    decode_tps: (end.completion_tokens - 1) as f64 / secs,
                    cached: end.cached_tokens,
                    engine_tps: (end.completion_tokens - 1) as f64 / (end.decode_ms / 1000.0),
                };
            }
            EngineEvent::Error(e) => panic!("{e}"),
        }
    }
}

fn request(text: String, n: u32, slot: Option<u32>) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(text),
        max_tokens: Some(n),
        temperature: Some(0.0),
        ignore_eos: true,
        slot,
        ..GenerateRequest::default()
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument would be ignored anyway.
    let model_path = default_model();
    let reps: usize = env_or("LLORCH_BENCH_REPS", 7);
    let n: u32 = env_or("LLORCH_BENCH_TOKENS", 128);
    let threads: u32 = env_or("LLORCH_BENCH_THREADS", 2);
    eprintln!(
        "bench: model {}, {reps} reps, {n} tokens, {threads} threads, {SLOTS} slots x {CTX} ctx",
        model_path.display()
    );
    let model =
        Model::load(&model_path, 0, std::sync::Arc::new(Progress::default())).expect("model");
    let mut inproc = InProcess::new(&model.llama, threads as i32);
    let engine = EngineProcess::start(&model_path, threads);
    let client = UnixClient::new(&engine.socket);
    // One client thread: the connection and the consumer share it, so each token wakes one
    // thread in this process (the machine's two cores are busy decoding).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Warm both paths once.
    inproc.run(&[prompt(24)], 16);
    rt.block_on(stream(&client, &request(prompt(25), 16, Some(0))));

    let (mut ip_ttft, mut ip_tps, mut ip_agg) = (Vec::new(), Vec::new(), Vec::new());
    let (mut e_ttft, mut e_tps, mut e_cached_ttft) = (Vec::new(), Vec::new(), Vec::new());
    let mut e_self_tps = Vec::new();
    let (mut agg_sum, mut agg_wall) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        // In-process, then the engine on the same prompt, alternating every repetition.
        let text = prompt(rep * 5);
        let (t, tps) = inproc.run(std::slice::from_ref(&text), n as usize);
        ip_ttft.push(t);
        ip_tps.push(tps);
        let four: Vec<String> = (0..SLOTS as usize)
            .map(|s| prompt(rep * 5 + 1 + s))
            .collect();
        ip_agg.push(inproc.run(&four, n as usize).1);

        let seen = rt.block_on(stream(&client, &request(text.clone(), n, Some(0))));
        assert_eq!(seen.cached, 0, "a new prompt must not hit the cache");
        assert_eq!(seen.tokens, n);
        e_ttft.push(seen.ttft_ms);
        e_tps.push(seen.decode_tps);
        e_self_tps.push(seen.engine_tps);

        // The same prompt again on the same slot: all but its last token are cached.
        let again = rt.block_on(stream(&client, &request(text.clone(), 2, Some(0))));
        assert!(again.cached > 0);
        e_cached_ttft.push(again.ttft_ms);

        // Four concurrent streams, distinct prompts.
        let wall = Instant::now();
        let seen4: Vec<Seen> = rt.block_on(async {
            let tasks: Vec<_> = (0..SLOTS)
                .map(|s| {
                    let client = client.clone();
                    let req = request(prompt(rep * 5 + 1 + s as usize), n, Some(s));
                    tokio::spawn(async move { stream(&client, &req).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let wall = wall.elapsed().as_secs_f64();
        assert!(seen4.iter().all(|s| s.cached == 0 && s.tokens == n));
        agg_sum.push(seen4.iter().map(|s| s.decode_tps).sum::<f64>());
        agg_wall.push(seen4.iter().map(|s| s.tokens as f64).sum::<f64>() / wall);
    }

    let ip_tps_m = median(&mut ip_tps);
    let e_tps_m = median(&mut e_tps);
    let ip_ttft_m = median(&mut ip_ttft);
    let e_ttft_m = median(&mut e_ttft);
    let cached_m = median(&mut e_cached_ttft);
    let agg_m = median(&mut agg_sum);
    let agg_wall_m = median(&mut agg_wall);
    let ip_agg_m = median(&mut ip_agg);
    let e_self_m = median(&mut e_self_tps);
    let prompt_tokens = model.tokenize(&prompt(0)).len();
    println!("engine benchmark ({reps} reps, medians; {prompt_tokens}-token prompts, {n} generated tokens)");
    println!("  in-process, 1 sequence       {ip_tps_m:8.1} tokens/s");
    println!(
        "  in-process, 4 sequences      {ip_agg_m:8.1} tokens/s   ratio to 1 sequence {:.2}",
        ip_agg_m / ip_tps_m
    );
    println!("  engine socket, 1 stream      {e_tps_m:8.1} tokens/s   ratio to in-process {:.3} (target >= 0.97)", e_tps_m / ip_tps_m);
    println!("    (as the engine measures it  {e_self_m:8.1} tokens/s)");
    println!("  engine socket, 4 streams     {agg_m:8.1} tokens/s   ratio to 1 stream {:.2} (target >= 1.5), to in-process 4 {:.3}", agg_m / e_tps_m, agg_m / ip_agg_m);
    println!("    (wall clock incl. prefill  {agg_wall_m:8.1} tokens/s)");
    println!("  in-process prefill + 1st tok {ip_ttft_m:8.1} ms");
    println!(
        "  engine TTFT, new prompt      {e_ttft_m:8.1} ms        ratio {:.3} (target <= 1.1)",
        e_ttft_m / ip_ttft_m
    );
    println!("  engine TTFT, cached prompt   {cached_m:8.1} ms        (target < 15)");

    // Structured output: two streams in one batch, both free, then one free and one held to a
    // JSON Schema (at least 64 strings, so it runs as long as the free one), alternating.
    let schema = serde_json::json!({
        "type": "object",
        "properties": {"log": {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 64}},
        "required": ["log"],
    });
    let (mut free_pair, mut free_next_to_json, mut json_tps) = (Vec::new(), Vec::new(), Vec::new());
    for rep in 0..reps {
        let free = |k: usize, slot: u32| request(prompt(rep * 7 + k), n, Some(slot));
        let constrained = GenerateRequest {
            json_schema: Some(schema.clone()),
            ignore_eos: false,
            ..request(prompt(rep * 7 + 3), n, Some(1))
        };
        let pair = |a: GenerateRequest, b: GenerateRequest| {
            rt.block_on(async {
                let (ca, cb) = (client.clone(), client.clone());
                let ta = tokio::spawn(async move { stream(&ca, &a).await });
                let tb = tokio::spawn(async move { stream(&cb, &b).await });
                (ta.await.unwrap(), tb.await.unwrap())
            })
        };
        let (a, b) = pair(free(1, 0), free(2, 1));
        free_pair.push((a.decode_tps + b.decode_tps) / 2.0);
        let (a, b) = pair(free(4, 0), constrained);
        assert!(
            b.tokens > n / 2,
            "the constrained stream ended after {} tokens",
            b.tokens
        );
        free_next_to_json.push(a.decode_tps);
        json_tps.push(b.decode_tps);
    }
    let free_pair_m = median(&mut free_pair);
    let free_json_m = median(&mut free_next_to_json);
    let json_m = median(&mut json_tps);
    println!("structured output (2 streams per batch, {reps} reps, medians)");
    println!("  free stream next to a free one      {free_pair_m:8.1} tokens/s");
    println!(
        "  free stream next to a JSON one      {free_json_m:8.1} tokens/s   ratio {:.3} (target >= 0.9: the grammar does not stall the batch)",
        free_json_m / free_pair_m
    );
    println!(
        "  JSON-Schema stream                  {json_m:8.1} tokens/s   ratio {:.3} (per-token cost {:+.2} ms)",
        json_m / free_pair_m,
        1000.0 / json_m - 1000.0 / free_pair_m
    );
    drop(engine);
}
