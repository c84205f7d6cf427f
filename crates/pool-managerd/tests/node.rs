//! End to end on one node: the real `pool-managerd`, `engine-provisioner` and `llorch-engine`
//! binaries with the real default model, no control plane (it points at a closed port, and the
//! node must keep serving).
//!
//! Build the binaries first: `cargo build -p llorch-engine -p engine-provisioner -p pool-managerd`.
//!
//! Each test starts its node with [`Rig::start`], from a [`NodeSpec`] that says how its
//! configuration differs from the default one, and waits for the node's states with
//! [`Rig::wait_status`] (or checks one holds with [`Rig::assert_status_holds`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::header::{HeaderName, HeaderValue};
use llorch_client::{EventStream, HttpClient, StreamFailure};
use llorch_tests::notify::NotifySocket;
use llorch_tests::stack::{free_port, signal};
use llorch_tests::{bin, model_path};
use llorch_wire::node::{PoolState, PoolStatus};
use llorch_wire::{ErrorBody, ErrorCode};

/// The running daemon; killed on drop, so a failed test leaves nothing behind.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a test's node configuration differs from the default: one CPU pool `default` of the
/// default model, 1024 tokens a slot, two threads.
struct NodeSpec<'a> {
    slots: &'a str,
    /// Extra lines in `[node]`.
    node_extra: &'a str,
    /// Extra lines in `[[pools]]`.
    pool_extra: &'a str,
    /// Extra lines in `[pools.model]`.
    model_extra: &'a str,
    /// `node.engine_bin`, when not the built `llorch-engine`.
    engine_bin: Option<&'a str>,
}

impl Default for NodeSpec<'_> {
    fn default() -> Self {
        Self {
            slots: "2",
            node_extra: "",
            pool_extra: "",
            model_extra: "",
            engine_bin: None,
        }
    }
}

/// Writes `<dir>/node.toml` for `spec` and returns its path.
fn write_config(dir: &Path, spec: &NodeSpec<'_>) -> PathBuf {
    let engine = match spec.engine_bin {
        Some(e) => e.to_string(),
        None => bin("llorch-engine").display().to_string(),
    };
    let config = format!(
        r#"
[node]
id = "test-node"
control_plane = "http://127.0.0.1:{port}"
listen = "unix:{dir}/node.sock"
cache_dir = "{dir}/cache"
runtime_dir = "{dir}/run"
heartbeat_secs = 1
engine_bin = "{engine}"
provisioner_bin = "{provisioner}"
{node_extra}

[[pools]]
id = "default"
slots = {slots}
ctx = 1024
threads = 2
{pool_extra}

[pools.model]
id = "smollm2-135m"
source = "{model}"
{model_extra}
"#,
        port = free_port(),
        dir = dir.display(),
        provisioner = bin("engine-provisioner").display(),
        model = model_path().display(),
        slots = spec.slots,
        node_extra = spec.node_extra,
        pool_extra = spec.pool_extra,
        model_extra = spec.model_extra,
    );
    let path = dir.join("node.toml");
    std::fs::write(&path, config).unwrap();
    path
}

/// Starts pool-managerd on `config`, logging to `<dir>/pool-managerd.log` and telling `notify`
/// what it tells its service manager.
fn spawn_node(dir: &Path, config: &Path, notify: &NotifySocket) -> Daemon {
    let log = dir.join("pool-managerd.log");
    let child = Command::new(env!("CARGO_BIN_EXE_pool-managerd"))
        .arg("--config")
        .arg(config)
        .env("LLORCH_LOG", "info,pool_managerd=debug")
        .env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Daemon { child, log }
}

/// A node under test: its directory, configuration file, the socket that hears what it tells
/// its service manager, the daemon, and a client of its node API.
struct Rig {
    dir: tempfile::TempDir,
    config: PathBuf,
    notify: NotifySocket,
    daemon: Daemon,
    client: HttpClient,
}

impl Rig {
    /// Writes the configuration for `spec` in a fresh directory and starts pool-managerd on it.
    fn start(spec: &NodeSpec<'_>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pm-")
            .tempdir_in("/tmp")
            .unwrap();
        let config = write_config(dir.path(), spec);
        let notify = NotifySocket::bind(dir.path());
        let daemon = spawn_node(dir.path(), &config, &notify);
        let client = HttpClient::new(&format!("unix:{}/node.sock", dir.path().display())).unwrap();
        Self {
            dir,
            config,
            notify,
            daemon,
            client,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The `default` pool's status now.
    async fn status(&self) -> PoolStatus {
        status_of(&self.client, "default").await
    }

    /// Waits until the pool's status satisfies `cond`, looking again each time pool-managerd
    /// tells its service manager something: every state change is followed by a `STATUS=` line.
    async fn wait_status(
        &mut self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&PoolStatus) -> bool,
    ) -> PoolStatus {
        let deadline = Instant::now() + limit;
        loop {
            let st = self
                .client
                .get_json::<PoolStatus>("/v2/pools/default")
                .await
                .ok();
            if let Some(st) = st.as_ref().filter(|st| cond(st)) {
                return st.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                self.notify.next(left).is_some(),
                "timed out after {limit:?} waiting for {what}; last status {st:?}\n{}",
                self.daemon.log()
            );
        }
    }

    /// Waits up to `limit_secs` until the pool is in `state`.
    async fn wait_state(&mut self, state: PoolState, limit_secs: u64, what: &str) -> PoolStatus {
        self.wait_status(what, Duration::from_secs(limit_secs), |s| s.state == state)
            .await
    }

    /// Checks the pool's status against `check` now and each time pool-managerd tells its
    /// service manager something, for `period`: every state change would be caught.
    async fn assert_status_holds(&mut self, period: Duration, check: impl Fn(&PoolStatus)) {
        let deadline = Instant::now() + period;
        loop {
            check(&self.status().await);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.notify.next(left).is_none() {
                break;
            }
        }
    }

    /// Sends SIGTERM and waits for the daemon's exit, which must be 0 (it comes once every
    /// engine has stopped); returns its log.
    fn terminate(&mut self) -> String {
        signal(self.daemon.child.id(), libc::SIGTERM);
        let code = self.daemon.child.wait().unwrap();
        assert_eq!(code.code(), Some(0), "{}", self.daemon.log());
        self.daemon.log()
    }
}

async fn status_of(client: &HttpClient, pool: &str) -> PoolStatus {
    client.get_json(&format!("/v2/pools/{pool}")).await.unwrap()
}

async fn generate(
    client: &HttpClient,
    body: &str,
    correlation: &str,
) -> hyper::Response<hyper::body::Incoming> {
    client
        .post_raw(
            "/v2/pools/default/generate",
            body.to_string(),
            &[(
                HeaderName::from_static("x-correlation-id"),
                HeaderValue::from_str(correlation).unwrap(),
            )],
        )
        .await
        .unwrap()
}

/// Sends `PARIS` and returns the answer's text.
async fn ask_paris(client: &HttpClient, correlation: &str) -> String {
    let resp = generate(client, PARIS, correlation).await;
    assert_eq!(resp.status(), 200);
    EventStream::from_response(resp, Path::new("node"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap()
        .text
}

/// The error body of a refused request.
async fn error_body(resp: hyper::Response<hyper::body::Incoming>) -> ErrorBody {
    serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

fn process_runs(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

const PARIS: &str = r#"{"messages":[{"role":"user","content":"What city is the capital of France?"}],"max_tokens":16,"temperature":0}"#;
const LONG: &str = r#"{"messages":[{"role":"user","content":"Tell me a long story."}],"max_tokens":400,"ignore_eos":true,"temperature":0}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_serves_restarts_drains_and_stops_cleanly() {
    let mut rig = Rig::start(&NodeSpec::default());
    let first_pid = becomes_ready_and_serves(&mut rig).await;
    fails_and_recovers_when_its_engine_is_killed(&mut rig, first_pid).await;
    drains_and_resumes(&rig).await;
    // A body over 4 MiB is refused before it reaches the engine.
    let big = format!(r#"{{"prompt":"{}"}}"#, "a".repeat(4 * 1024 * 1024 + 1));
    assert_eq!(generate(&rig.client, &big, "corr-big").await.status(), 413);
    stops_cleanly_on_sigterm(&mut rig).await;
}

/// Ready, reported with the engine's pid and version; a forward streams tokens and an end
/// event, with the correlation id echoed; unknown pools are named. Returns the engine's pid.
async fn becomes_ready_and_serves(rig: &mut Rig) -> u32 {
    let ready = rig
        .wait_state(PoolState::Ready, 120, "the pool to become ready")
        .await;
    let first_pid = ready
        .engine_pid
        .expect("a ready pool reports its engine pid");
    assert!(ready.engine_version.is_some(), "{ready:?}");
    assert_eq!(
        (ready.slots_total, ready.ctx_per_slot, ready.restarts),
        (2, 1024, 0)
    );
    let client = &rig.client;
    let health: serde_json::Value = client.get_json("/health").await.unwrap();
    assert_eq!(health["status"], "ok");
    let all: Vec<PoolStatus> = client.get_json("/v2/pools").await.unwrap();
    assert_eq!(all.len(), 1);

    let resp = generate(client, PARIS, "corr-paris").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-correlation-id"], "corr-paris");
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let done = EventStream::from_response(resp, Path::new("node"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(done.text.contains("Paris"), "{:?}", done.text);
    assert!(
        done.tokens.len() > 1,
        "tokens arrive one event at a time: {:?}",
        done.tokens
    );

    let err = client
        .get_json::<PoolStatus>("/v2/pools/nope")
        .await
        .unwrap_err();
    assert_eq!(
        llorch_client::status_of(&err),
        Some(hyper::StatusCode::NOT_FOUND),
        "{err}"
    );
    first_pid
}

/// The engine is killed in the middle of a long answer: the stream ends with a typed error,
/// the pool fails, and comes back by itself.
async fn fails_and_recovers_when_its_engine_is_killed(rig: &mut Rig, first_pid: u32) {
    let resp = generate(&rig.client, LONG, "corr-long").await;
    assert_eq!(resp.status(), 200);
    let mut stream = EventStream::from_response(resp, Path::new("node"))
        .await
        .unwrap();
    let first = stream.next_event().await.unwrap().unwrap();
    assert!(
        matches!(first, llorch_wire::engine::EngineEvent::Token(_)),
        "{first:?}"
    );
    assert_eq!(rig.status().await.slots_busy, 1);
    signal(first_pid, libc::SIGKILL);
    match stream.collect().await {
        Err(StreamFailure::Event(body)) => {
            assert_eq!(body.code, ErrorCode::EngineFailed, "{body:?}")
        }
        other => panic!("expected an ENGINE_FAILED error event, got {other:?}"),
    }
    let failed = rig
        .wait_status(
            "the pool to notice the dead engine",
            Duration::from_secs(10),
            |s| matches!(s.state, PoolState::Failed | PoolState::Loading) && s.last_error.is_some(),
        )
        .await;
    assert!(
        failed.last_error.as_deref().unwrap().contains("signal 9"),
        "{failed:?}"
    );
    let back = rig
        .wait_state(PoolState::Ready, 60, "the pool to come back")
        .await;
    assert_eq!(back.restarts, 1, "{back:?}");
    assert_ne!(back.engine_pid, Some(first_pid));
    assert_eq!(back.slots_busy, 0, "the broken forward no longer counts");
}

/// Drain refuses new work with 503 POOL_UNAVAILABLE; resume takes it again.
async fn drains_and_resumes(rig: &Rig) {
    let client = &rig.client;
    let drained: PoolStatus = client
        .post_json("/v2/pools/default/drain", &serde_json::json!({}))
        .await
        .unwrap();
    assert!(drained.draining);
    assert_eq!(drained.state, PoolState::Draining);
    let resp = generate(client, PARIS, "corr-drained").await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body = error_body(resp).await;
    assert_eq!(body.code, ErrorCode::PoolUnavailable);
    let resumed: PoolStatus = client
        .post_json("/v2/pools/default/resume", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!((resumed.state, resumed.draining), (PoolState::Ready, false));
    let resp = generate(client, PARIS, "corr-resumed").await;
    assert_eq!(resp.status(), 200);
    let done = EventStream::from_response(resp, Path::new("node"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(done.text.contains("Paris"), "{:?}", done.text);
}

/// SIGTERM: the engine stops, the handoff file and the socket go, exit 0.
async fn stops_cleanly_on_sigterm(rig: &mut Rig) {
    let engine_pid = rig.status().await.engine_pid.unwrap();
    let log = rig.terminate();
    assert!(
        !process_runs(engine_pid),
        "the engine {engine_pid} outlived pool-managerd"
    );
    assert!(
        !rig.path("run/handoff/default/default.json").exists(),
        "stale handoff file"
    );
    assert!(!rig.path("node.sock").exists(), "stale node socket");
    assert!(log.contains("Engine ready."), "{log}");
    assert!(
        log.contains("Removed a stale handoff file."),
        "the killed engine's file: {log}"
    );
    assert!(
        !log.contains("capital of France"),
        "prompt text reached the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_pool_loads_on_the_first_request_and_unloads_after_its_keep_alive() {
    let mut rig = Rig::start(&NodeSpec {
        pool_extra: "on_demand = true\nkeep_alive_secs = 2",
        ..NodeSpec::default()
    });
    waits_on_standby(&mut rig).await;
    let first_pid = loads_on_request_and_unloads(&mut rig).await;
    let again = loads_again_on_the_next_request(&mut rig, first_pid).await;
    keeps_an_open_connection_loaded(&mut rig, again).await;

    // SIGTERM: the engine stops and the socket goes.
    let log = rig.terminate();
    assert!(
        !rig.path("run/engines/default.sock").exists(),
        "stale standby socket"
    );
    assert_eq!(
        log.matches("The engine unloaded after its keep-alive")
            .count(),
        2,
        "{log}"
    );
    assert!(
        !log.contains(llorch_os::message_id::ENGINE_CRASHED),
        "an unload is not a crash: {log}"
    );
}

/// Provisioned, then on standby: the socket listens, no engine runs, no model is loaded.
async fn waits_on_standby(rig: &mut Rig) {
    let standby = rig
        .wait_state(PoolState::Standby, 60, "the pool to go on standby")
        .await;
    assert!(standby.on_demand, "{standby:?}");
    assert_eq!((standby.engine_pid, standby.load_ms), (None, None));
    assert!(
        rig.path("run/engines/default.sock").exists(),
        "the standby socket listens"
    );
    assert!(!rig.path("run/handoff/default/default.json").exists());
}

/// The first request starts the engine, waits for the model, and gets its answer; two
/// seconds without work, the engine exits cleanly, and the pool is on standby again, with no
/// restart counted. Returns the engine's pid.
async fn loads_on_request_and_unloads(rig: &mut Rig) -> u32 {
    let socket = rig.path("run/engines/default.sock");
    let handoff = rig.path("run/handoff/default/default.json");
    let answer = ask_paris(&rig.client, "corr-cold").await;
    assert!(answer.contains("Paris"), "{answer:?}");
    let loaded = rig
        .wait_state(PoolState::Ready, 5, "the loaded pool to be ready")
        .await;
    let first_pid = loaded.engine_pid.expect("a loaded pool has an engine");
    assert!(
        loaded.load_ms.is_some(),
        "the load time is measured: {loaded:?}"
    );
    assert!(handoff.exists());

    let unloaded = rig
        .wait_state(
            PoolState::Standby,
            30,
            "the engine to unload after its keep-alive",
        )
        .await;
    assert_eq!(
        (unloaded.engine_pid, unloaded.restarts),
        (None, 0),
        "{unloaded:?}"
    );
    assert!(unloaded.last_error.is_none(), "{unloaded:?}");
    assert!(
        !process_runs(first_pid),
        "the unloaded engine {first_pid} still runs"
    );
    assert!(!handoff.exists(), "the engine removed its handoff file");
    assert!(socket.exists(), "the socket still listens");
    first_pid
}

/// The next request loads it again, in a new engine; returns the new engine's status.
async fn loads_again_on_the_next_request(rig: &mut Rig, first_pid: u32) -> PoolStatus {
    let answer = ask_paris(&rig.client, "corr-again").await;
    assert!(answer.contains("Paris"), "{answer:?}");
    let again = rig
        .wait_state(PoolState::Ready, 5, "the reloaded pool to be ready")
        .await;
    assert_ne!(again.engine_pid, Some(first_pid), "a new engine serves");
    again
}

/// A connection that is open but has not sent its request yet may carry work: the engine
/// does not unload under it, however long past the keep-alive, and serves it.
async fn keeps_an_open_connection_loaded(rig: &mut Rig, again: PoolStatus) {
    let socket = rig.path("run/engines/default.sock");
    let mut pending = tokio::net::UnixStream::connect(&socket).await.unwrap();
    // 2.5 keep-alives: every status line pool-managerd sends meanwhile is a chance to catch an
    // unload; none may come.
    rig.assert_status_holds(Duration::from_secs(5), |held| {
        assert_eq!(
            (held.state, held.engine_pid),
            (PoolState::Ready, again.engine_pid),
            "the engine unloaded under an open connection"
        );
    })
    .await;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!(
            "POST /generate HTTP/1.1\r\nHost: engine\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PARIS}",
            PARIS.len()
        );
        pending.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        pending.read_to_string(&mut answer).await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("event: end"),
            "{answer}"
        );
    }
    rig.wait_state(
        PoolState::Standby,
        30,
        "the engine to unload once the connection is served",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_an_engine_that_cannot_start_is_told_why() {
    let mut rig = Rig::start(&NodeSpec {
        slots: "1",
        pool_extra: "on_demand = true",
        engine_bin: Some("/nonexistent/llorch-engine"),
        ..NodeSpec::default()
    });
    rig.wait_state(PoolState::Standby, 60, "the pool to go on standby")
        .await;
    // The request waits on the socket; the engine cannot be spawned: a 503 that says why,
    // not a request left waiting.
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        generate(&rig.client, PARIS, "corr-x"),
    )
    .await
    .expect("the waiting request is answered");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body = error_body(resp).await;
    assert_eq!(body.code, ErrorCode::PoolUnready, "{body:?}");
    assert!(
        body.message.contains("could not start") && body.message.contains("engine_bin"),
        "{body:?}"
    );
    let st = rig.status().await;
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("/nonexistent/llorch-engine")),
        "{st:?}"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_pool-managerd");
    let good = write_config(dir.path(), &NodeSpec::default());
    let out = Command::new(bin)
        .arg("--config")
        .arg(&good)
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = write_config(
        dir.path(),
        &NodeSpec {
            slots: "0",
            ..NodeSpec::default()
        },
    );
    for extra in [&[][..], &["--check-config"][..]] {
        let out = Command::new(bin)
            .arg("--config")
            .arg(&bad)
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains("pools[0].slots"), "{stderr}");
        assert!(stderr.contains("node.toml"), "{stderr}");
    }

    // A local model file that is not there: the check names the pool's key and the file,
    // instead of saying ok and leaving the pool to fail after the start.
    let text = std::fs::read_to_string(write_config(dir.path(), &NodeSpec::default())).unwrap();
    let model = model_path().display().to_string();
    let missing = dir.path().join("missing.gguf");
    let gone = dir.path().join("gone.toml");
    std::fs::write(
        &gone,
        text.replace(&model, &format!("file:{}", missing.display())),
    )
    .unwrap();
    let out = Command::new(bin)
        .arg("--config")
        .arg(&gone)
        .arg("--check-config")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("pools[0].model.source") && stderr.contains("missing.gguf"),
        "{stderr}"
    );
}

/// A model whose checksum does not match is refused by the provisioner: the pool fails and
/// retries, and the refusal is counted (`llorch_model_verification_failures_total`, the
/// metric the LlorchModelVerificationFailed alert watches) on the metrics-only TCP listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_failing_verification_is_counted_on_the_metrics_listener() {
    let port = free_port();
    let mut rig = Rig::start(&NodeSpec {
        slots: "1",
        node_extra: &format!("metrics_listen = \"127.0.0.1:{port}\""),
        model_extra: &format!("sha256 = \"{}\"", "0".repeat(64)),
        ..NodeSpec::default()
    });
    // The pool's failure reaches the status line after its counters moved.
    rig.notify
        .wait_for("default failed", Duration::from_secs(60));
    let metrics = HttpClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let s = llorch_tests::prom::scrape(&metrics).await;
    assert!(
        s.sum(
            "llorch_engine_restarts_total",
            &[("reason", "provision_failed")]
        ) >= 1.0,
        "no counted verification failure:\n{}",
        rig.daemon.log()
    );
    let pool = [("pool", "default")];
    assert!(s.sum("llorch_model_verification_failures_total", &pool) >= 1.0);
    assert!(
        s.sum(
            "llorch_engine_starts_total",
            &[("pool", "default"), ("result", "failed")]
        ) >= 1.0
    );
    assert_eq!(
        s.sum(
            "llorch_engine_starts_total",
            &[("pool", "default"), ("result", "ready")]
        ),
        0.0
    );
    assert_eq!(
        s.sum(
            "llorch_pool_state",
            &[("pool", "default"), ("state", "ready")]
        ),
        0.0
    );
    assert!(
        rig.daemon
            .log()
            .contains("The provisioner refused the model file."),
        "{}",
        rig.daemon.log()
    );
    // The metrics listener serves nothing else.
    let pools = metrics.get_json::<serde_json::Value>("/v2/pools").await;
    assert!(
        matches!(pools, Err(llorch_client::ClientError::Status { status, .. }) if status == 404),
        "{pools:?}"
    );
}

/// SIGHUP re-reads the configuration: an added pool starts, a removed one stops, a pool whose
/// settings did not change keeps its engine and its running stream, and a file that does not
/// pass the checks changes nothing. Each reload is framed by RELOADING=1 and READY=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_pool_changes_without_touching_the_others() {
    let mut rig = Rig::start(&NodeSpec::default());
    let original = std::fs::read_to_string(&rig.config).unwrap();
    let ready = rig
        .wait_state(PoolState::Ready, 120, "the pool to become ready")
        .await;
    let engine = ready.engine_pid.unwrap();

    // A long answer runs on the default pool through every reload below.
    let resp = generate(&rig.client, LONG, "corr-reload").await;
    assert_eq!(resp.status(), 200);
    let mut stream = EventStream::from_response(resp, Path::new("node"))
        .await
        .unwrap();
    assert_eq!(stream.next_frame().await.unwrap().unwrap().event, "token");

    let second_pid = reload_adds_a_pool(&mut rig, &original).await;
    reload_of_a_broken_file_changes_nothing(&mut rig).await;
    reload_removes_the_added_pool(&mut rig, &original, second_pid, engine).await;

    // The stream that ran through the reloads ends normally.
    let rest = stream.collect().await.expect("the stream ran to its end");
    assert!(rest.tokens.len() > 100, "{} tokens", rest.tokens.len());
}

/// Writes `text` as the configuration, sends SIGHUP, and waits for the reload's RELOADING=1
/// and READY=1 (`ready_within` for the latter).
fn reload(rig: &mut Rig, text: &str, ready_within: Duration) {
    std::fs::write(&rig.config, text).unwrap();
    signal(rig.daemon.child.id(), libc::SIGHUP);
    rig.notify.wait_for("RELOADING=1", Duration::from_secs(10));
    rig.notify.wait_for("READY=1", ready_within);
}

/// Adds a pool; returns its engine's pid once it is ready.
async fn reload_adds_a_pool(rig: &mut Rig, original: &str) -> u32 {
    let second = format!(
        "{original}\n[[pools]]\nid = \"second\"\nslots = 1\nctx = 512\nthreads = 1\n\n[pools.model]\nid = \"smollm2-135m\"\nsource = \"{}\"\n",
        model_path().display()
    );
    reload(rig, &second, Duration::from_secs(10));
    // Each state change is followed by a status line naming every pool.
    rig.notify.wait_for("second ready", Duration::from_secs(60));
    status_of(&rig.client, "second").await.engine_pid.unwrap()
}

/// A file that does not parse changes nothing.
async fn reload_of_a_broken_file_changes_nothing(rig: &mut Rig) {
    reload(rig, "[node\n", Duration::from_secs(10));
    assert!(
        rig.daemon.log().contains("Reload refused"),
        "{}",
        rig.daemon.log()
    );
    let pools: Vec<PoolStatus> = rig.client.get_json("/v2/pools").await.unwrap();
    assert_eq!(pools.len(), 2, "{pools:?}");
}

/// Removes the added pool again: its engine stops, the default pool's does not.
async fn reload_removes_the_added_pool(
    rig: &mut Rig,
    original: &str,
    second_pid: u32,
    engine: u32,
) {
    reload(rig, original, Duration::from_secs(30));
    let pools: Vec<PoolStatus> = rig.client.get_json("/v2/pools").await.unwrap();
    assert_eq!(
        pools.iter().map(|p| p.pool_id.as_str()).collect::<Vec<_>>(),
        ["default"]
    );
    assert!(
        !process_runs(second_pid),
        "the removed pool's engine still runs"
    );
    assert_eq!(
        pools[0].engine_pid,
        Some(engine),
        "the default pool was restarted"
    );
}
