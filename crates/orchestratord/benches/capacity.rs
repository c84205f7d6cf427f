//! Control-plane capacity: how many short tasks per second orchestratord admits, dispatches and
//! streams, and how much memory it holds with many streams open. Method and results:
//! docs/PERFORMANCE.md, "Control-plane capacity".
//!
//! The real `orchestratord` release binary serves the API on a free loopback port. The node is
//! a synthetic one inside this bench process: a Unix-socket HTTP server that answers
//! `POST /v2/pools/{id}/generate` with token events and an end event without any model, and
//! registers and heartbeats like pool-managerd. It is a bench helper only; it proves nothing
//! about features. Its pools: `fast` (model `synthetic`, tokens as fast as they can be
//! written) and `slow` (model `synthetic-slow`, one token per `LLORCH_BENCH_STREAM_GAP_MS`).
//!
//! 1. Throughput: `LLORCH_BENCH_CONCURRENCY` clients on keep-alive connections each send
//!    streaming `POST /v1/chat/completions` requests one after the other and read every stream
//!    to `data: [DONE]`. Counted: tasks completed in the measured window, their latency, and
//!    the CPU time orchestratord and this process (load generator + synthetic node) used.
//!    With `LLORCH_BENCH_BACKLOG` = N > 0, each level is measured twice in the same run: first
//!    as above, then with N batch tasks waiting in the queue for a third model (`parked`, one
//!    slot, whose synthetic node never answers), submitted over `POST /v2/tasks` before the
//!    second measurement: what a deep queue of another model costs the others.
//! 2. Open streams: a fresh orchestratord; `LLORCH_BENCH_STREAMS` streams opened at once on the
//!    slow pool; with every one of them open (each has seen a token), orchestratord's resident
//!    memory (`VmRSS`), and its peak (`VmHWM`) after they all ended.
//!
//! Run with `cargo build --release --bins && cargo bench -p orchestratord --bench capacity`.
//! Settings come from the environment:
//! - `LLORCH_BENCH_SECS` (default 10): measured seconds per concurrency level, after
//!   `LLORCH_BENCH_WARMUP_SECS` (default 2).
//! - `LLORCH_BENCH_CONCURRENCY` (default `64`): concurrent clients; a comma-separated list runs
//!   one measurement per level.
//! - `LLORCH_BENCH_TOKENS` (default 4): tokens per task in the throughput part.
//! - `LLORCH_BENCH_STREAMS` (default 1000), `LLORCH_BENCH_STREAM_TOKENS` (default 10),
//!   `LLORCH_BENCH_STREAM_GAP_MS` (default 1000): the open-streams part.
//! - `LLORCH_BENCH_BACKLOG` (default 0): tasks to queue for the parked model (see 1.).
//! - `LLORCH_BENCH_ONLY` (`throughput` or `streams`): run one part.
//! - `LLORCH_BENCH_LOG` (default `info`, orchestratord's default): orchestratord's log filter.
//!   Its log goes to a file in the bench's temporary directory.
//! - `LLORCH_BENCH_ORCHESTRATORD`: another orchestratord binary (say, one built with debug
//!   info for `perf record --call-graph dwarf`).
//!
//! The bench raises its own soft `RLIMIT_NOFILE` to the hard limit (orchestratord inherits it):
//! 1,000 streams need about 2,000 descriptors in orchestratord and 2,000 here.

mod common;
use common::*;

use std::convert::Infallible;
use std::future::Future;
use std::net::TcpListener as StdTcpListener;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use llorch_client::{EventStream, HttpClient};
use llorch_wire::engine::{EndEvent, EngineEvent, FinishReason, TokenEvent};
use llorch_wire::node::{Heartbeat, NodeAck, PoolState, PoolStatus, Registration};
use llorch_wire::task::PoolsAnswer;
use serde_json::json;
use tokio::net::UnixListener;

const NODE_ID: &str = "synthetic-node";
const FAST_MODEL: &str = "synthetic";
const SLOW_MODEL: &str = "synthetic-slow";
/// Served by one slot whose synthetic node never answers: its tasks wait in the queue.
const PARKED_MODEL: &str = "synthetic-parked";
/// The most a node may report for one pool (llorch-wire's node limits).
const POOL_SLOTS: u32 = 1024;

/// Raises the soft open-file limit to `want` (at most the hard limit); returns the soft limit.
fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the local `rlimit` passed by pointer.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    lim.rlim_cur
}

// ---------------------------------------------------------------------------------------------
// /proc readings.

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn nofile_limit(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>()[3..5].join(" soft / ") + " hard")
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The synthetic node.

/// SSE frames given out one by one, with `gap` before every frame after the first.
struct SynthBody {
    frames: Arc<[Bytes]>,
    next: usize,
    gap: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for SynthBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.next >= this.frames.len() {
            return Poll::Ready(None);
        }
        if this.next > 0 && !this.gap.is_zero() {
            let gap = this.gap;
            let sleep = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        let f = this.frames[this.next].clone();
        this.next += 1;
        Poll::Ready(Some(Ok(Frame::data(f))))
    }
}

struct Synth {
    fast: Arc<[Bytes]>,
    slow: Arc<[Bytes]>,
    slow_gap: Duration,
    requests: AtomicUsize,
}

fn frames(tokens: u32) -> Arc<[Bytes]> {
    let mut out: Vec<Bytes> = (0..tokens)
        .map(|i| Bytes::from(EngineEvent::Token(TokenEvent::text(format!(" tok{i}"), i)).to_sse()))
        .collect();
    out.push(Bytes::from(
        EngineEvent::End(EndEvent {
            finish_reason: FinishReason::Length,
            prompt_tokens: 8,
            cached_tokens: 0,
            completion_tokens: tokens,
            ttft_ms: 0.0,
            decode_ms: 0.0,
            slot: 0,
            choices: Vec::new(),
            stop_sequence: None,
            embeddings: Vec::new(),
        })
        .to_sse(),
    ));
    out.into()
}

type SynthResponse = Response<BoxBody<Bytes, Infallible>>;

fn plain(status: StatusCode, body: &'static str) -> SynthResponse {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())).boxed())
        .expect("static response")
}

async fn synth_handle(
    synth: Arc<Synth>,
    req: Request<Incoming>,
) -> Result<SynthResponse, Infallible> {
    let (parts, body) = req.into_parts();
    // Read the request as a node would before forwarding it.
    let _ = body.collect().await;
    let path = parts.uri.path();
    if parts.method == Method::GET && path == "/health" {
        return Ok(plain(StatusCode::OK, r#"{"status":"ok"}"#));
    }
    let pool = path
        .strip_prefix("/v2/pools/")
        .and_then(|p| p.strip_suffix("/generate"));
    let (frames, gap) = match (parts.method == Method::POST, pool) {
        (true, Some("fast")) => (synth.fast.clone(), Duration::ZERO),
        (true, Some("slow")) => (synth.slow.clone(), synth.slow_gap),
        // Holds its one slot: everything else for the model waits in orchestratord's queue.
        (true, Some("parked")) => std::future::pending().await,
        _ => return Ok(plain(StatusCode::NOT_FOUND, r#"{"code":"INVALID_PARAMS"}"#)),
    };
    synth.requests.fetch_add(1, Ordering::Relaxed);
    let body = SynthBody {
        frames,
        next: 0,
        gap,
        sleep: None,
    };
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body.boxed())
        .expect("static response"))
}

async fn serve_synth(listener: UnixListener, synth: Arc<Synth>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let synth = synth.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| synth_handle(synth.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn pools() -> Vec<PoolStatus> {
    [
        ("fast", FAST_MODEL, POOL_SLOTS),
        ("slow", SLOW_MODEL, POOL_SLOTS),
        ("parked", PARKED_MODEL, 1),
    ]
    .into_iter()
    .map(|(pool, model, slots)| PoolStatus {
        engine_version: Some("synthetic".into()),
        ..PoolStatus::new(pool, model, PoolState::Ready, slots, 2048)
    })
    .collect()
}

// ---------------------------------------------------------------------------------------------
// orchestratord.

struct Orch {
    child: Child,
    port: u16,
    log: PathBuf,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Orch {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts orchestratord, registers the synthetic node, heartbeats it, waits for both pools.
    async fn start(dir: &Path, n: usize, node_sock: &Path, queue: usize) -> Self {
        let port = StdTcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a free port")
            .port();
        let log = dir.join(format!("orchestratord-{n}.log"));
        let exe = std::env::var_os("LLORCH_BENCH_ORCHESTRATORD")
            .map(PathBuf::from)
            .unwrap_or_else(|| bin("orchestratord"));
        let child = Command::new(exe)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--queue-capacity", &queue.to_string()])
            .env("LLORCH_LOG", env_or("LLORCH_BENCH_LOG", "info".to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .expect("spawn orchestratord");
        let url = format!("http://127.0.0.1:{port}");
        let client = HttpClient::new(&url).expect("valid url");
        let start = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "orchestratord does not accept connections; log: {}",
                log.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reg = Registration {
            node_id: NODE_ID.into(),
            address: format!("unix:{}", node_sock.display()),
            version: "synthetic".into(),
            heartbeat_secs: 2,
            pools: pools(),
            staged_models: Vec::new(),
            gpus: Default::default(),
            memory: Vec::new(),
        };
        let _: NodeAck = client
            .post_json("/v2/nodes/register", &reg)
            .await
            .expect("register the synthetic node");
        let hb_client = client.clone();
        let heartbeat = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                let hb = Heartbeat {
                    pools: pools(),
                    staged_models: Vec::new(),
                    gpus: Default::default(),
                    memory: Vec::new(),
                };
                let path = format!("/v2/nodes/{NODE_ID}/heartbeat");
                if let Err(e) = hb_client.post_json::<_, NodeAck>(&path, &hb).await {
                    eprintln!("heartbeat failed: {e}");
                }
            }
        });
        loop {
            let ready = client
                .get_json::<PoolsAnswer>("/v2/pools")
                .await
                .ok()
                .map(|a| {
                    a.pools
                        .iter()
                        .filter(|p| p.state == PoolState::Ready && p.node_online)
                        .count()
                })
                .unwrap_or(0);
            if ready == 3 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the synthetic pools are not ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            child,
            port,
            log,
            heartbeat,
        }
    }

    fn stop(mut self) {
        self.heartbeat.abort();
        common::terminate(&mut self.child, Duration::from_secs(15));
    }
}

fn chat_body(model: &str, max_tokens: u32) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&json!({
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens,
            "stream": true,
        }))
        .expect("serializes"),
    )
}

/// One streaming request read to `[DONE]`; the number of `data:` chunks before it.
async fn one_task(
    client: &HttpClient,
    body: &Bytes,
    on_token: Option<&AtomicUsize>,
) -> Result<usize, String> {
    let resp = client
        .post_raw("/v1/chat/completions", body.clone(), &[])
        .await
        .map_err(|e| e.to_string())?;
    let mut frames = EventStream::from_response(resp, Path::new("orchestratord"))
        .await
        .map_err(|e| e.to_string())?;
    let mut n = 0;
    while let Some(f) = frames.next_frame().await {
        let f = f.map_err(|e| e.to_string())?;
        if f.data == "[DONE]" {
            return Ok(n);
        }
        n += 1;
        // Chunk 0 is the assistant role; chunk 1 the first token.
        if n == 2 {
            if let Some(c) = on_token {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Err("stream ended without [DONE]".into())
}

// ---------------------------------------------------------------------------------------------
// Part 1: throughput.

struct Throughput {
    concurrency: usize,
    tasks: usize,
    errors: usize,
    secs: f64,
    p50: f64,
    p99: f64,
    orch_cpu: f64,
    self_cpu: f64,
}

async fn throughput(
    orch: &Orch,
    concurrency: usize,
    tokens: u32,
    warmup: Duration,
    secs: Duration,
    tck: f64,
) -> Throughput {
    let client = HttpClient::new(&orch.url()).expect("valid url");
    let body = chat_body(FAST_MODEL, tokens);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let t0 = start + warmup;
    let t1 = t0 + secs;
    let expect = tokens as usize + 2;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, body, stop) = (client.clone(), body.clone(), stop.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0usize;
                let mut first_error = None;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let r = one_task(&client, &body, None).await;
                    let done = Instant::now();
                    match r {
                        Ok(n) if n == expect => {
                            if done >= t0 && done < t1 {
                                lat.push(done.duration_since(sent).as_secs_f64() * 1e3);
                            }
                        }
                        Ok(n) => {
                            errors += 1;
                            first_error.get_or_insert(format!("{n} chunks, expected {expect}"));
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (lat, errors, first_error)
            })
        })
        .collect();
    tokio::time::sleep_until(t0.into()).await;
    let (o0, s0) = (
        cpu_secs(&orch.pid().to_string(), tck),
        cpu_secs("self", tck),
    );
    tokio::time::sleep_until(t1.into()).await;
    let (o1, s1) = (
        cpu_secs(&orch.pid().to_string(), tck),
        cpu_secs("self", tck),
    );
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    let mut errors = 0;
    for w in workers {
        let (l, e, first) = w.await.expect("worker");
        lat.extend(l);
        errors += e;
        if let Some(first) = first {
            eprintln!("  (a client saw an error: {first})");
        }
    }
    lat.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    Throughput {
        concurrency,
        tasks: lat.len(),
        errors,
        secs: secs.as_secs_f64(),
        p50: quantile(&lat, 0.5),
        p99: quantile(&lat, 0.99),
        orch_cpu: o1 - o0,
        self_cpu: s1 - s0,
    }
}

// ---------------------------------------------------------------------------------------------
// Part 2: open streams.

struct Streams {
    streams: usize,
    open_seen: usize,
    open_after: Duration,
    rss_idle: f64,
    rss_open: f64,
    hwm: f64,
    rss_after: f64,
    fds_open: usize,
    threads: String,
    ok: usize,
    errors: usize,
    running_seen: u32,
}

async fn open_streams(orch: &Orch, streams: usize, tokens: u32, gap: Duration) -> Streams {
    let pid = orch.pid();
    let client = HttpClient::new(&orch.url()).expect("valid url");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = status_mb(pid, "VmRSS:");
    let body = chat_body(SLOW_MODEL, tokens);
    let opened = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (client, body, opened) = (client.clone(), body.clone(), opened.clone());
            tokio::spawn(async move { one_task(&client, &body, Some(&*opened)).await })
        })
        .collect();
    // Wait until every stream has seen a token (or the first streams are about to end).
    let limit = gap * tokens.saturating_sub(2).max(1);
    while opened.load(Ordering::Relaxed) < streams && start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let open_after = start.elapsed();
    let open_seen = opened.load(Ordering::Relaxed);
    // Sample while they are all open: a second's worth, keep the largest.
    let mut rss_open: f64 = 0.0;
    let mut fds_open = 0;
    let mut running_seen = 0;
    for _ in 0..5 {
        rss_open = rss_open.max(status_mb(pid, "VmRSS:"));
        fds_open = fds_open.max(open_fds(pid));
        if let Ok(a) = client.get_json::<PoolsAnswer>("/v2/pools").await {
            running_seen = running_seen.max(a.queue.running);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let threads = status_field(pid, "Threads:");
    let (mut ok, mut errors) = (0, 0);
    let expect = tokens as usize + 2;
    for t in tasks {
        match t.await.expect("stream task") {
            Ok(n) if n == expect => ok += 1,
            Ok(n) => {
                errors += 1;
                eprintln!("  (a stream had {n} chunks, expected {expect})");
            }
            Err(e) => {
                errors += 1;
                if errors < 4 {
                    eprintln!("  (a stream failed: {e})");
                }
            }
        }
    }
    Streams {
        streams,
        open_seen,
        open_after,
        rss_idle,
        rss_open,
        hwm: status_mb(pid, "VmHWM:"),
        rss_after: status_mb(pid, "VmRSS:"),
        fds_open,
        threads,
        ok,
        errors,
        running_seen,
    }
}

/// Queues `n` batch tasks for the parked model over `POST /v2/tasks` (64 at a time); returns
/// how long that took and the queue depth orchestratord then reports.
async fn fill_backlog(orch: &Orch, n: usize) -> (Duration, u32) {
    let client = HttpClient::new(&orch.url()).expect("valid url");
    let body =
        json!({"model_ref": PARKED_MODEL, "prompt": "x", "max_tokens": 1, "priority": "batch"});
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (client, body, next) = (client.clone(), body.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    client
                        .post_json::<_, serde_json::Value>("/v2/tasks", &body)
                        .await
                        .expect("a backlog task is admitted");
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("backlog worker");
    }
    let took = start.elapsed();
    let depth = client
        .get_json::<PoolsAnswer>("/v2/pools")
        .await
        .map_or(0, |a| a.queue.depth);
    (took, depth)
}

fn print_throughput(r: &Throughput) {
    println!(
        "  concurrency {:>4}: {:>7.0} tasks/s  p50 {:>6.2} ms  p99 {:>6.2} ms  errors {}  orchestratord CPU {:.2} cores ({:.0} ms per 1000 tasks), bench process {:.2} cores",
        r.concurrency,
        r.tasks as f64 / r.secs,
        r.p50,
        r.p99,
        r.errors,
        r.orch_cpu / r.secs,
        r.orch_cpu / r.tasks.max(1) as f64 * 1e6,
        r.self_cpu / r.secs,
    );
}

fn main() {
    let secs = Duration::from_secs_f64(env_or("LLORCH_BENCH_SECS", 10.0));
    let warmup = Duration::from_secs_f64(env_or("LLORCH_BENCH_WARMUP_SECS", 2.0));
    let levels: Vec<usize> = env_or("LLORCH_BENCH_CONCURRENCY", "64".to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let tokens: u32 = env_or("LLORCH_BENCH_TOKENS", 4);
    let streams: usize = env_or("LLORCH_BENCH_STREAMS", 1000);
    let stream_tokens: u32 = env_or("LLORCH_BENCH_STREAM_TOKENS", 10);
    let stream_gap = Duration::from_millis(env_or("LLORCH_BENCH_STREAM_GAP_MS", 1000));
    let only: String = env_or("LLORCH_BENCH_ONLY", String::new());
    let backlog: usize = env_or("LLORCH_BENCH_BACKLOG", 0);
    let nofile = raise_nofile(1 << 20);
    let tck = clock_ticks();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("load average before: {}", loadavg());
    println!(
        "control-plane capacity: {cpus} CPUs, open-file limit {nofile}, orchestratord log {}",
        env_or("LLORCH_BENCH_LOG", "info".to_string())
    );
    if nofile < 2 * streams as u64 + 256 {
        eprintln!("warning: an open-file limit of {nofile} is too low for {streams} streams; raise it (ulimit -n)");
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::Builder::new()
        .prefix("llorch-capacity-")
        .tempdir()
        .expect("temp dir");
    let node_sock = dir.path().join("node.sock");
    let synth = Arc::new(Synth {
        fast: frames(tokens),
        slow: frames(stream_tokens),
        slow_gap: stream_gap,
        requests: AtomicUsize::new(0),
    });
    let mut results = Vec::new();
    let mut stream_result = None;
    rt.block_on(async {
        let listener = UnixListener::bind(&node_sock).expect("bind the synthetic node's socket");
        tokio::spawn(serve_synth(listener, synth.clone()));

        if only.is_empty() || only == "throughput" {
            let orch = Orch::start(dir.path(), 1, &node_sock, 4096 + backlog).await;
            println!(
                "orchestratord pid {} (open files: {}), {tokens} tokens per task, {:.0} s per level after {:.0} s warm-up",
                orch.pid(),
                nofile_limit(orch.pid()),
                secs.as_secs_f64(),
                warmup.as_secs_f64()
            );
            for &c in &levels {
                let r = throughput(&orch, c, tokens, warmup, secs, tck).await;
                print_throughput(&r);
                results.push(r);
            }
            if backlog > 0 {
                let (took, depth) = fill_backlog(&orch, backlog).await;
                println!(
                    "  with {backlog} tasks queued for another model ({:.1} s to submit them, {:.0} per s; queue depth {depth}):",
                    took.as_secs_f64(),
                    backlog as f64 / took.as_secs_f64()
                );
                for &c in &levels {
                    let r = throughput(&orch, c, tokens, warmup, secs, tck).await;
                    print_throughput(&r);
                }
            }
            println!(
                "  orchestratord RSS after: {:.1} MB (peak {:.1} MB); its log: {}",
                status_mb(orch.pid(), "VmRSS:"),
                status_mb(orch.pid(), "VmHWM:"),
                orch.log.display()
            );
            orch.stop();
        }
        if only.is_empty() || only == "streams" {
            let orch = Orch::start(dir.path(), 2, &node_sock, 4096).await;
            println!(
                "open streams: fresh orchestratord pid {} (open files: {}), {streams} streams of {stream_tokens} tokens, one every {} ms",
                orch.pid(),
                nofile_limit(orch.pid()),
                stream_gap.as_millis()
            );
            let s = open_streams(&orch, streams, stream_tokens, stream_gap).await;
            println!(
                "  all open after {:.2} s: {}/{} streams had a token; running tasks seen {}; orchestratord {} open fds, {} threads",
                s.open_after.as_secs_f64(),
                s.open_seen,
                s.streams,
                s.running_seen,
                s.fds_open,
                s.threads
            );
            println!(
                "  orchestratord VmRSS idle {:.1} MB, with the streams open {:.1} MB ({:.1} kB per stream), peak (VmHWM) {:.1} MB, after {:.1} MB; streams ok {} failed {}",
                s.rss_idle,
                s.rss_open,
                (s.rss_open - s.rss_idle) * 1e3 / s.streams.max(1) as f64,
                s.hwm,
                s.rss_after,
                s.ok,
                s.errors
            );
            stream_result = Some(s);
            orch.stop();
        }
    });

    println!("load average after: {}", loadavg());
    println!();
    println!("Summary:");
    if let Some(best) = results
        .iter()
        .max_by(|a, b| (a.tasks as f64 / a.secs).total_cmp(&(b.tasks as f64 / b.secs)))
    {
        let rate = best.tasks as f64 / best.secs;
        let per_cpu_s = best.tasks as f64 / best.orch_cpu.max(1e-9);
        println!(
            "  throughput: {rate:.0} tasks/s at concurrency {} (target >= 5000): {}",
            best.concurrency,
            if rate >= 5000.0 { "met" } else { "NOT met" }
        );
        println!(
            "  orchestratord used {:.2} of {cpus} cores ({per_cpu_s:.0} tasks per orchestratord CPU-second); the load generator and synthetic node used {:.2}",
            best.orch_cpu / best.secs,
            best.self_cpu / best.secs
        );
    }
    if let Some(s) = &stream_result {
        let met = s.open_seen == s.streams && s.errors == 0 && s.rss_open < 100.0;
        println!(
            "  {} open streams: orchestratord VmRSS {:.1} MB, peak {:.1} MB (target < 100 MB): {}",
            s.streams,
            s.rss_open,
            s.hwm,
            if met { "met" } else { "NOT met" }
        );
    }
    println!(
        "  synthetic node served {} requests",
        synth.requests.load(Ordering::Relaxed)
    );
}
