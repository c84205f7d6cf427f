//! The cloud profile across hosts: a control plane and two GPU-less workers, each in a network
//! namespace of its own (`ip netns`, joined by veth links on a test subnet, no route anywhere
//! else), with TLS on every listener that faces another host and node tokens bound to node
//! ids. The real binaries on the real default model.
//!
//! - `cp` runs orchestratord on `0.0.0.0:8443` (TLS), reachable from the workers at 10.231.2.1
//!   and 10.231.3.1; the test's client runs inside `cp` too (a thread that joined it), on
//!   127.0.0.1.
//! - `w2` (10.231.2.2) and `w3` (10.231.3.2) run pool-managerd with its node API on
//!   `:9200` (TLS), the provisioner and one engine (2 slots) each, with their own cache and
//!   runtime directories: nothing is shared but the network.
//!
//! Fixed ports are safe here: each namespace is created by this test and holds nothing else.
//!
//! Needs root (namespaces, setns); without it the test is counted as skipped
//! (`llorch_tests::skip`), and under `CI=true` it fails.
//!
//! Two tests: the daemons as plain processes in the namespaces (TLS, bound tokens, spreading,
//! a lost link, drain, the catalog, metrics, liveness beats over UDP), and the same three
//! hosts as containers booted with systemd (`systemd-nspawn --network-namespace-path=`), the
//! units installed as a package would and configured by exactly the files the NixOS module
//! renders for the hosts of `nix/examples/cloud.nix` (node.toml, drop-ins with
//! `LoadCredential=`, masks; socket activation on TCP with TLS and of the beats socket on UDP,
//! a SIGKILLed pool-managerd, an orchestratord restart under a client loop, a lost link,
//! `llorch nodes drain` over TLS). That one needs Nix and nixpkgs'
//! lib (tests/support/nix.rs) and says SKIPPED without them.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use llorch_client::{HttpClient, TlsRoots};
use llorch_tests::container::Container;
use llorch_tests::notify::NotifySocket;
use llorch_tests::pki::Ca;
use llorch_tests::stack::{Daemon, MODEL_ID, TEST_KEY};
use llorch_tests::{bin, frames, model_path, post};
use llorch_wire::sse::Frame;
use llorch_wire::task::{NodeView, StartedEvent, TaskAccepted};
use llorch_wire::{ErrorBody, ErrorCode};
use serde_json::{json, Value};

const API_PORT: u16 = 8443;
const NODE_PORT: u16 = 9200;
const TOKEN_W2: &str = "w2-token-0123456789abcdef";
const TOKEN_W3: &str = "w3-token-0123456789abcdef";
/// A prompt the model continues for as long as it is let (as in tests/stack.rs).
const PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,";

/// A network namespace this test created; deleted (with its links) when dropped.
struct Netns(String);

impl Netns {
    fn add(name: String) -> Self {
        // A namespace of an earlier run that died (this test's names carry its pid).
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> ARGS`.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.0.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A daemon started inside this namespace (`ip netns exec` execs it: the pid is its own).
    fn spawn(&self, program: &Path, args: &[String], log: PathBuf) -> Daemon {
        self.spawn_with(program, args, log, &[])
    }

    fn spawn_with(
        &self,
        program: &Path,
        args: &[String],
        log: PathBuf,
        env: &[(&str, String)],
    ) -> Daemon {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.0])
            .arg(program)
            .args(args)
            .env("LLORCH_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("ip netns exec");
        Daemon { child, log }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread that joined the network namespace `ns`: every socket it opens lives
/// there.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
            // SAFETY: setns(2) on a namespace file this thread opened; it changes only this
            // thread's network namespace.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the netns thread")
    })
}

/// A veth link from the control plane's namespace (`to-<id>`, 10.231.<net>.1) to a worker's
/// (`to-cp`, 10.231.<net>.2).
fn link(cp: &Netns, worker: &Netns, id: &str, net: &str) {
    link_without_addresses(cp, worker, id);
    add_addresses(cp, worker, id, net);
}

/// The link up, without its addresses yet: what a host's sockets meet at boot, before the
/// network is configured.
fn link_without_addresses(cp: &Netns, worker: &Netns, id: &str) {
    let name = format!("to-{id}");
    cp.ip(&[
        "link", "add", &name, "type", "veth", "peer", "name", "to-cp", "netns", &worker.0,
    ]);
    cp.ip(&["link", "set", &name, "up"]);
    worker.ip(&["link", "set", "to-cp", "up"]);
}

/// The addresses of a link made by [`link_without_addresses`].
fn add_addresses(cp: &Netns, worker: &Netns, id: &str, net: &str) {
    cp.ip(&[
        "addr",
        "add",
        &format!("10.231.{net}.1/24"),
        "dev",
        &format!("to-{id}"),
    ]);
    worker.ip(&["addr", "add", &format!("10.231.{net}.2/24"), "dev", "to-cp"]);
}

/// Runs the future `f` makes on a current-thread runtime, on a thread that joined the
/// network namespace `ns` (the test's client side of a host).
fn block_on_in<T: Send, F: std::future::Future<Output = T>>(
    ns: &str,
    f: impl FnOnce() -> F + Send,
) -> T {
    in_netns(ns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
            .block_on(f())
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        == Some("0")
}

/// A worker host. Its daemon is stopped before its namespace goes.
struct Worker {
    daemon: Option<Daemon>,
    id: &'static str,
    ip: String,
    ns: Netns,
}

fn worker_config(dir: &Path, w: &Worker, cp_ip: &str, ca: &Ca, token: &str) -> PathBuf {
    let home = dir.join(w.id);
    std::fs::create_dir_all(&home).unwrap();
    let cert = ca.server(&format!("{}-node", w.id), &[&w.ip]);
    let token_file = home.join("node-token");
    llorch_tests::write_secret(&token_file, &format!("{token}\n"));
    let config = home.join("node.toml");
    std::fs::write(
        &config,
        format!(
            r#"[node]
id = "{id}"
control_plane = "https://{cp_ip}:{API_PORT}"
control_plane_ca = "{ca}"
listen = "{ip}:{NODE_PORT}"
tls_cert = "{cert}"
tls_key = "{key}"
token_file = "{token_file}"
cache_dir = "{home}/cache"
runtime_dir = "{home}/run"
heartbeat_secs = 1
engine_bin = "{engine}"
provisioner_bin = "{provisioner}"
launcher = "process"

[[pools]]
id = "default"
slots = 2
ctx = 1024
threads = 1

[pools.model]
id = "{MODEL_ID}"
source = "{model}"
sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"#,
            id = w.id,
            ca = ca.cert.display(),
            ip = w.ip,
            cert = cert.cert.display(),
            key = cert.key.display(),
            token_file = token_file.display(),
            home = home.display(),
            engine = bin("llorch-engine").display(),
            provisioner = bin("engine-provisioner").display(),
            model = model_path().display(),
        ),
    )
    .unwrap();
    config
}

async fn nodes(c: &HttpClient) -> Vec<NodeView> {
    c.get_json("/v2/nodes").await.expect("GET /v2/nodes")
}

/// Polls `/v2/nodes` until `done` holds; returns how long that took.
async fn wait_nodes(
    c: &HttpClient,
    what: &str,
    limit: Duration,
    logs: &Path,
    done: impl Fn(&[NodeView]) -> bool,
) -> Duration {
    let done = &done;
    llorch_tests::wait_until(what, limit, || async move {
        let n = nodes(c).await;
        done(&n)
            .then_some(())
            .ok_or_else(|| format!("{n:?}\n{}", all_logs(logs)))
    })
    .await
}

/// Every daemon log of the run, for a failure message.
fn all_logs(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            out.push_str(&format!("--- {}\n{text}\n", e.path().display()));
        }
    }
    out
}

fn state_of<'a>(n: &'a [NodeView], id: &str) -> &'a str {
    n.iter()
        .find(|v| v.node_id == id)
        .map_or("absent", |v| v.state.as_str())
}

async fn submit(c: &HttpClient, max_tokens: u32) -> TaskAccepted {
    c.post_json(
        "/v2/tasks",
        &json!({"model_ref": MODEL_ID, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}),
    )
    .await
    .expect("task accepted")
}

/// Opens a task's stream and reads up to its `started` event: the node it runs on.
async fn started(c: &HttpClient, task: &TaskAccepted) -> (String, llorch_client::EventStream) {
    let mut s = c.events(&task.streams.sse).await.expect("stream");
    loop {
        let f = s
            .next_frame()
            .await
            .expect("a started event")
            .expect("frame");
        if f.event == "started" {
            let e: StartedEvent = serde_json::from_str(&f.data).unwrap();
            return (e.node_id, s);
        }
        assert_ne!(f.event, "error", "{f:?}");
    }
}

fn last_error(f: &[Frame]) -> Option<ErrorBody> {
    f.iter()
        .rfind(|f| f.event == "error")
        .map(|f| serde_json::from_str(&f.data).unwrap())
}

#[test]
fn a_control_plane_and_two_workers_on_separate_networks() {
    if !is_root() {
        llorch_tests::skip("the cloud test creates network namespaces: run it as root");
        return;
    }
    let _g = llorch_tests::serial();
    let tag = std::process::id();
    let dir = tempfile::Builder::new()
        .prefix("llorch-cloud-")
        .tempdir()
        .unwrap();
    let cp = Netns::add(format!("llorch-{tag}-cp"));
    let mut workers = [
        Worker {
            id: "w2",
            ip: "10.231.2.2".into(),
            ns: Netns::add(format!("llorch-{tag}-w2")),
            daemon: None,
        },
        Worker {
            id: "w3",
            ip: "10.231.3.2".into(),
            ns: Netns::add(format!("llorch-{tag}-w3")),
            daemon: None,
        },
    ];
    link(&cp, &workers[0].ns, "w2", "2");
    link(&cp, &workers[1].ns, "w3", "3");

    // A private CA: the control plane's certificate names both of its addresses and loopback.
    let ca = Ca::new(dir.path(), "cluster");
    let cp_cert = ca.server("control-plane", &["10.231.2.1", "10.231.3.1", "127.0.0.1"]);
    let keys = dir.path().join("api-keys");
    llorch_tests::write_secret(&keys, &format!("ops {TEST_KEY} admin\n"));
    let tokens = dir.path().join("node-tokens");
    llorch_tests::write_secret(&tokens, &format!("w2 {TOKEN_W2}\nw3 {TOKEN_W3}\n"));
    let orch_log = dir.path().join("orchestratord.log");
    // orchestratord reports READY=1 and its status line (pools ready, nodes) here: the test
    // waits for those events.
    let mut notify = NotifySocket::bind(dir.path());
    let _orch = cp.spawn_with(
        &bin("orchestratord"),
        &[
            "--listen".into(),
            format!("0.0.0.0:{API_PORT}"),
            "--api-keys".into(),
            keys.display().to_string(),
            "--node-tokens".into(),
            tokens.display().to_string(),
            "--tls-cert".into(),
            cp_cert.cert.display().to_string(),
            "--tls-key".into(),
            cp_cert.key.display().to_string(),
            "--node-ca".into(),
            ca.cert.display().to_string(),
            // Liveness beats on the API's port, over UDP.
            "--beats-listen".into(),
            format!("0.0.0.0:{API_PORT}"),
        ],
        orch_log.clone(),
        &[("NOTIFY_SOCKET", notify.path.display().to_string())],
    );
    for (w, (cp_ip, token)) in workers
        .iter_mut()
        .zip([("10.231.2.1", TOKEN_W2), ("10.231.3.1", TOKEN_W3)])
    {
        let config = worker_config(dir.path(), w, cp_ip, &ca, token);
        let log = dir.path().join(format!("{}.log", w.id));
        w.daemon = Some(w.ns.spawn(
            &bin("pool-managerd"),
            &["--config".into(), config.display().to_string()],
            log,
        ));
    }
    let cp_name = cp.0.clone();
    let w3_ns = workers[1].ns.0.clone();
    let roots = TlsRoots::from_pem_file(&ca.cert).unwrap();

    let report = block_on_in(&cp_name, || async {
        let c = HttpClient::with_roots(&format!("https://127.0.0.1:{API_PORT}"), &roots)
            .unwrap()
            .with_token(Some(TEST_KEY.into()));
        let start = Instant::now();
        notify.wait_for("READY=1", Duration::from_secs(30));
        // 1. Both workers register over TLS and both pools are ready: the status line says so.
        notify.wait_for("2 of 2 pools ready on 2 nodes", Duration::from_secs(180));
        let boot = start.elapsed();
        let n = nodes(&c).await;
        for v in &n {
            assert!(v.address.starts_with("https://10.231."), "{v:?}");
            assert_eq!(v.state, "online", "{v:?}");
        }

        a_chat_is_answered(&c).await;
        tasks_spread_over_both_workers(&c).await;
        let detect = a_lost_link_ends_its_streams_and_work_moves(&c, &w3_ns).await;
        let recover = the_link_comes_back_and_worker_3_serves(&c, &w3_ns, &mut notify).await;
        a_session_stays_on_its_node(&c).await;
        a_drained_node_finishes_its_work_first(&c, dir.path()).await;
        foreign_tokens_and_plaintext_are_refused(&roots).await;
        (boot, detect, recover)
    });
    let (boot, detect, recover) = report;
    a_worker_cannot_register_the_control_planes_own_address(&workers[0].ns.0, &roots, &orch_log);
    the_logs_and_metrics_tell_what_happened(dir.path(), &cp_name, &roots, &orch_log);
    println!(
        "cloud: both workers online after {boot:?}; lost worker's streams ended {detect:?} after its link went down; back online {recover:?} after the link came up"
    );
    for w in &mut workers {
        if let Some(mut d) = w.daemon.take() {
            let status = d.stop();
            assert!(status.success(), "{}: {status}\n{}", w.id, d.log_text());
        }
    }
}

async fn a_chat_is_answered(c: &HttpClient) {
    // 2. A chat is answered.
    let (status, _, v) = post(
                c,
                "/v1/chat/completions",
                &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "What city is the capital of France?"}], "max_tokens": 16, "temperature": 0}),
            )
            .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{v}"
    );
}

async fn tasks_spread_over_both_workers(c: &HttpClient) {
    // 3. Eight concurrent tasks are spread over both workers.
    let mut accepted = Vec::new();
    for _ in 0..8 {
        accepted.push(submit(c, 12).await);
    }
    let runs = accepted.iter().map(|t| async {
        let (node, s) = started(c, t).await;
        let f = frames(s).await;
        assert!(f.iter().any(|f| f.event == "end"), "{f:?}");
        node
    });
    let on: Vec<String> = join_all(runs).await;
    assert!(
        on.iter().any(|n| n == "w2") && on.iter().any(|n| n == "w3"),
        "{on:?}"
    );
}

async fn a_lost_link_ends_its_streams_and_work_moves(c: &HttpClient, w3_ns: &str) -> Duration {
    // 4. Worker 3's link drops mid-stream: its streams end with NODE_UNAVAILABLE within
    // the heartbeat timeout (3 × 1 s), it goes suspect then offline, and new tasks go to
    // worker 2. Four long tasks fill both workers' two slots each.
    let mut long = Vec::new();
    for _ in 0..4 {
        let t = submit(c, 400).await;
        let (node, s) = started(c, &t).await;
        long.push((node, s, t.task_id));
    }
    let (on_w3, on_w2): (Vec<_>, Vec<_>) = long.into_iter().partition(|(n, _, _)| n == "w3");
    assert!(!on_w3.is_empty() && !on_w2.is_empty());
    let link_down = Instant::now();
    ip(&["-n", w3_ns, "link", "set", "to-cp", "down"]);
    let mut detect = Duration::ZERO;
    for (_, s, _) in on_w3 {
        let f = frames(s).await;
        let err = last_error(&f).unwrap_or_else(|| panic!("no error event: {f:?}"));
        assert_eq!(err.code, ErrorCode::NodeUnavailable, "{err:?}");
        assert!(err.retriable);
        detect = link_down.elapsed();
    }
    assert!(detect < Duration::from_secs(6), "lost after {detect:?}");
    let n = nodes(c).await;
    assert_eq!(state_of(&n, "w3"), "offline", "{n:?}");
    assert_eq!(state_of(&n, "w2"), "online", "{n:?}");
    // The catalog says where the model is and that it is still available (on w2).
    let cat: Value = c.get_json("/v2/catalog/availability").await.unwrap();
    let m = &cat["models"][0];
    assert_eq!(m["model_id"], MODEL_ID, "{cat}");
    assert_eq!(m["available"], true, "{cat}");
    let where_: Vec<(String, String)> = m["locations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["node_id"].as_str().unwrap().into(),
                l["node_state"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(where_.contains(&("w3".into(), "offline".into())), "{cat}");
    assert!(where_.contains(&("w2".into(), "online".into())), "{cat}");
    // Worker 2's own tasks were not touched: still running, they are cancelled now to
    // free its slots.
    for (_, s, id) in on_w2 {
        let info: Value = c.get_json(&format!("/v2/tasks/{id}")).await.unwrap();
        assert_eq!(info["state"], "running", "{info}");
        let (status, _, v) = post(c, &format!("/v2/tasks/{id}/cancel"), &json!({})).await;
        assert!(status.is_success(), "{v}");
        let f = frames(s).await;
        assert_eq!(
            last_error(&f).map(|e| e.code),
            Some(ErrorCode::Canceled),
            "{f:?}"
        );
    }
    let t = submit(c, 4).await;
    let (node, s) = started(c, &t).await;
    assert_eq!(node, "w2");
    assert!(frames(s).await.iter().any(|f| f.event == "end"));
    detect
}

async fn the_link_comes_back_and_worker_3_serves(
    c: &HttpClient,
    w3_ns: &str,
    notify: &mut NotifySocket,
) -> Duration {
    // 5. The link comes back: worker 3 is online again by itself and serves. (Its loss
    // shows in the status line first, so a status from before it cannot answer the wait.)
    notify.wait_for("1 of 2 pools ready on 2 nodes", Duration::from_secs(10));
    let link_up = Instant::now();
    ip(&["-n", w3_ns, "link", "set", "to-cp", "up"]);
    notify.wait_for("2 of 2 pools ready on 2 nodes", Duration::from_secs(30));
    let recover = link_up.elapsed();
    assert_eq!(state_of(&nodes(c).await, "w3"), "online");
    let mut on = Vec::new();
    for _ in 0..3 {
        let batch: Vec<TaskAccepted> = {
            let mut b = Vec::new();
            for _ in 0..4 {
                b.push(submit(c, 8).await);
            }
            b
        };
        let runs = batch.iter().map(|t| async {
            let (node, s) = started(c, t).await;
            let f = frames(s).await;
            assert!(f.iter().any(|f| f.event == "end"), "{f:?}");
            node
        });
        on.extend(join_all(runs).await);
        if on.iter().any(|n| n == "w3") {
            break;
        }
    }
    assert!(
        on.iter().any(|n| n == "w3"),
        "worker 3 serves again: {on:?}"
    );
    recover
}

async fn a_session_stays_on_its_node(c: &HttpClient) {
    // 6. A session stays on its node: its turns run where its KV cache is.
    let mut session_nodes = Vec::new();
    for turn in 0..3 {
        let t: TaskAccepted = c
            .post_json(
                "/v2/tasks",
                &json!({"model_ref": MODEL_ID, "session_id": "cloud-s1",
                                "prompt": format!("{PROMPT} turn {turn}"), "max_tokens": 4}),
            )
            .await
            .unwrap();
        let (node, s) = started(c, &t).await;
        assert!(frames(s).await.iter().any(|f| f.event == "end"));
        session_nodes.push(node);
    }
    assert!(
        session_nodes.windows(2).all(|w| w[0] == w[1]),
        "{session_nodes:?}"
    );
}

async fn a_drained_node_finishes_its_work_first(c: &HttpClient, dir: &Path) {
    // 7. Drain worker 3 while a task runs there: the task finishes, nothing new goes
    // there, and the node reports when it is empty; resumed, it takes work again.
    let (mut running_w3, mut others) = (None, Vec::new());
    for _ in 0..4 {
        let t = submit(c, 60).await;
        let (node, s) = started(c, &t).await;
        if node == "w3" && running_w3.is_none() {
            running_w3 = Some(s);
        } else {
            others.push(s);
        }
    }
    let running_w3 = running_w3.expect("a task on w3");
    let v: NodeView = c.post_json("/v2/nodes/w3/drain", &json!({})).await.unwrap();
    assert!(v.draining && v.running >= 1, "{v:?}");
    let t = submit(c, 4).await;
    let (node, s) = started(c, &t).await;
    assert_eq!(node, "w2", "nothing new on a draining node");
    assert!(frames(s).await.iter().any(|f| f.event == "end"));
    let f = frames(running_w3).await;
    assert!(
        f.iter().any(|f| f.event == "end"),
        "the running task finished: {f:?}"
    );
    for s in others {
        assert!(frames(s).await.iter().any(|f| f.event == "end"));
    }
    wait_nodes(c, "w3 drained", Duration::from_secs(10), dir, |n| {
        n.iter()
            .any(|v| v.node_id == "w3" && v.draining && v.running == 0)
    })
    .await;
    // Pool ids repeat across nodes: an action on "default" must say which node.
    let (status, _, v) = post(c, "/v2/pools/default/drain", &json!({})).await;
    assert_eq!(status, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("w2, w3"), "{v}");
    let v: NodeView = c
        .post_json("/v2/nodes/w3/resume", &json!({}))
        .await
        .unwrap();
    assert!(!v.draining, "{v:?}");
}

async fn foreign_tokens_and_plaintext_are_refused(roots: &TlsRoots) {
    // 8. A worker's token used for another node id, an unknown token, and a plaintext
    // client against the TLS listener are all refused and logged.
    let w2_token = HttpClient::with_roots(&format!("https://127.0.0.1:{API_PORT}"), roots)
        .unwrap()
        .with_token(Some(TOKEN_W2.into()));
    let (status, _, v) = post(
        &w2_token,
        "/v2/nodes/w3/heartbeat",
        &json!({"pools": [], "staged_models": []}),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    let bogus = HttpClient::with_roots(&format!("https://127.0.0.1:{API_PORT}"), roots)
        .unwrap()
        .with_token(Some("not-a-token-0123456789".into()));
    let (status, _, v) = post(
                &bogus,
                "/v2/nodes/register",
                &json!({"node_id": "w9", "address": "https://10.231.2.9:9200", "version": "0", "heartbeat_secs": 1, "pools": []}),
            )
            .await;
    assert_eq!(status, 401, "{v}");
    let plain = HttpClient::new(&format!("http://127.0.0.1:{API_PORT}"))
        .unwrap()
        .with_token(Some(TEST_KEY.into()));
    assert!(plain.get_json::<Value>("/v2/nodes").await.is_err());
}

fn a_worker_cannot_register_the_control_planes_own_address(
    ns: &str,
    roots: &TlsRoots,
    orch_log: &Path,
) {
    // A worker's token from the worker's own network may not register an address of the
    // control plane's machine: orchestratord would dial its own sockets with that token.
    let (status, field) = block_on_in(ns, || async {
        let w2 = HttpClient::with_roots(&format!("https://10.231.2.1:{API_PORT}"), roots)
            .unwrap()
            .with_token(Some(TOKEN_W2.into()));
        let (status, _, v) = post(
            &w2,
            "/v2/nodes/register",
            &json!({"node_id": "w2", "address": "unix:/run/llama-orch/pool-managerd.sock", "version": "0", "heartbeat_secs": 1, "pools": []}),
        )
        .await;
        (status, v["field"].as_str().unwrap_or_default().to_string())
    });
    assert_eq!((status.as_u16(), field.as_str()), (400, "address"));
    let orch_text = std::fs::read_to_string(orch_log).unwrap_or_default();
    assert!(orch_text
        .contains("Refused a registration from another machine naming an address of this one."));
}

fn the_logs_and_metrics_tell_what_happened(
    dir: &Path,
    cp_name: &str,
    roots: &TlsRoots,
    orch_log: &Path,
) {
    let orch_text = || std::fs::read_to_string(orch_log).unwrap_or_default();
    // Each worker's engine parsed its own staged copy of the model: nothing was shared.
    for w in ["w2", "w3"] {
        let cache = dir.join(w).join("cache");
        assert!(
            std::fs::read_dir(&cache).is_ok_and(|mut d| d.next().is_some()),
            "{cache:?}"
        );
    }
    // The plaintext client may see rustls's alert before orchestratord's line about it is
    // written: wait for the line (bounded), then read the log once.
    llorch_tests::wait_for(
        "orchestratord's log line about the plaintext client",
        Duration::from_secs(10),
        || orch_text().contains("did not complete a TLS handshake"),
    );
    let log = orch_text();
    assert!(
        log.contains("Refused a node token used for another node id."),
        "{log}"
    );
    assert!(
        log.contains("Refused a node request without a valid node token."),
        "{log}"
    );
    assert!(log.contains("did not complete a TLS handshake"), "{log}");
    assert!(
        log.contains("Node drained: no task runs on it any more."),
        "{log}"
    );
    // No flapping: worker 3 was lost once and came back once, and the metrics say the same.
    assert_eq!(log.matches("Node is back online.").count(), 1, "{log}");
    let metrics = block_on_in(cp_name, || async {
        let c = HttpClient::with_roots(&format!("https://127.0.0.1:{API_PORT}"), roots).unwrap();
        let req = c
            .build(
                c.request(hyper::Method::GET, "/metrics"),
                Default::default(),
            )
            .unwrap();
        let resp = c.send(req).await.unwrap();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap();
        String::from_utf8(body.to_bytes().to_vec()).unwrap()
    });
    for line in [
        "llorch_node_events_total{event=\"joined\"} 2",
        "llorch_node_events_total{event=\"lost\"} 1",
        "llorch_node_events_total{event=\"back\"} 1",
        "llorch_nodes{state=\"online\"} 2",
        "llorch_nodes_draining 0",
        "llorch_node_beats_total{outcome=\"rejected\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}:\n{metrics}");
    }
    // The workers kept themselves online with beats between their reports.
    let beats = beats_taken(&llorch_tests::prom::Scrape::parse(&metrics));
    assert!(beats >= 10.0, "{beats} beats taken:\n{metrics}");
}

/// The liveness beats orchestratord took (`llorch_node_beats_total{outcome="ok"}`).
fn beats_taken(metrics: &llorch_tests::prom::Scrape) -> f64 {
    metrics.sum("llorch_node_beats_total", &[("outcome", "ok")])
}

/// What one host of the systemd cluster gets at `/mnt/llorch`: the binaries, the units, its
/// files, and an install script that does what a package and an operator would.
fn stage_host(dir: &Path, files: &[(&str, &Path)], install: &str) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("units")).unwrap();
    for b in [
        "orchestratord",
        "pool-managerd",
        "llorch-engine",
        "engine-provisioner",
    ] {
        std::fs::copy(bin(b), dir.join("bin").join(b)).unwrap();
    }
    for e in std::fs::read_dir(llorch_tests::repo_root().join("systemd")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join("units").join(e.file_name())).unwrap();
    }
    for (name, from) in files {
        if std::fs::hard_link(from, dir.join(name)).is_err() {
            std::fs::copy(from, dir.join(name)).unwrap();
        }
    }
    std::fs::create_dir_all(dir.join("generators")).unwrap();
    std::fs::copy(
        bin("llama-orch-gpu-generator"),
        dir.join("generators").join("llama-orch-gpu-generator"),
    )
    .unwrap();
    let common = r#"#!/bin/sh
set -e
install -D -m 0755 -t /usr/lib/systemd/system-generators /mnt/llorch/generators/llama-orch-gpu-generator
install -m 0755 /mnt/llorch/bin/* /usr/bin/
cp /mnt/llorch/units/*.service /mnt/llorch/units/*.socket /mnt/llorch/units/*.target /etc/systemd/system/
mkdir -p /etc/sysusers.d /etc/tmpfiles.d /etc/llama-orch /etc/polkit-1/rules.d
cp /mnt/llorch/units/llama-orch.polkit.rules /etc/polkit-1/rules.d/50-llama-orch.rules
cp /mnt/llorch/units/llama-orch.sysusers.conf /etc/sysusers.d/llama-orch.conf
cp /mnt/llorch/units/llama-orch.tmpfiles.conf /etc/tmpfiles.d/llama-orch.conf
systemd-sysusers
systemd-tmpfiles --create
"#;
    std::fs::write(dir.join("install.sh"), format!("{common}{install}")).unwrap();
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(dir)
        .status()
        .unwrap();
}

#[test]
fn three_hosts_under_systemd_with_tls_and_credentials() {
    if !is_root() {
        llorch_tests::skip("the cloud test boots containers in network namespaces: run it as root");
        return;
    }
    let n = match llorch_tests::nix::nix() {
        Ok(n) => n,
        Err(why) => {
            llorch_tests::skip(format!(
                "the hosts are configured by the NixOS module's rendering: {why}"
            ));
            return;
        }
    };
    let _g = llorch_tests::serial();
    let root = llorch_tests::rootfs::rootfs(&[]);
    let tag = format!("{}s", std::process::id());
    let dir = tempfile::Builder::new()
        .prefix("llorch-cloud-systemd-")
        .tempdir()
        .unwrap();
    let cp_ns = Netns::add(format!("llorch-{tag}-cp"));
    let w2_ns = Netns::add(format!("llorch-{tag}-w2"));
    let w3_ns = Netns::add(format!("llorch-{tag}-w3"));
    // The addresses come after the units started (below), as a network configured late at
    // boot: sockets bound to an address must bind anyway (FreeBind=, from the module).
    link_without_addresses(&cp_ns, &w2_ns, "w2");
    link_without_addresses(&cp_ns, &w3_ns, "w3");

    let ca = Ca::new(dir.path(), "cluster");
    let cp_cert = ca.server("control-plane", &["10.231.2.1", "10.231.3.1", "127.0.0.1"]);
    let keys = dir.path().join("api-keys");
    llorch_tests::write_secret(&keys, &format!("ops {TEST_KEY} admin\n"));
    let tokens = dir.path().join("node-tokens");
    llorch_tests::write_secret(&tokens, &format!("w2 {TOKEN_W2}\nw3 {TOKEN_W3}\n"));

    let [cp_stage, w2_stage, w3_stage] = stage_the_hosts(
        dir.path(),
        &n.cloud_hosts(),
        &ca,
        &cp_cert,
        [&keys, &tokens],
    );
    let boot = |name: &str, stage: &Path, ns: &Netns| {
        let c = Container::boot(
            Vec::new(),
            &root,
            stage,
            stage.join("nspawn.log"),
            &format!("cloud-{name}"),
            &[format!("--network-namespace-path=/run/netns/{}", ns.0)],
        );
        c.ok(&["sh", "/mnt/llorch/install.sh"]);
        c
    };
    let cp = boot("cp", &cp_stage, &cp_ns);
    let w2 = boot("w2", &w2_stage, &w2_ns);
    let w3 = boot("w3", &w3_stage, &w3_ns);
    // The workers' node API sockets listen on their addresses before the hosts have them.
    for w in [&w2, &w3] {
        w.wait_until(
            "pool-managerd.socket listening before its address exists",
            Duration::from_secs(30),
            |c| {
                let state = c.show("pool-managerd.socket", "ActiveState");
                assert_ne!(
                    state,
                    "failed",
                    "{}",
                    c.ok(&["journalctl", "--no-pager", "-n", "30"])
                );
                state == "active"
            },
        );
    }
    add_addresses(&cp_ns, &w2_ns, "w2", "2");
    add_addresses(&cp_ns, &w3_ns, "w3", "3");
    let roots = TlsRoots::from_pem_file(&ca.cert).unwrap();
    // orchestratord's "node joined" records (MESSAGE_ID in docs/METRICS.md).
    let joined = [
        "-u",
        "orchestratord",
        "MESSAGE_ID=d7c6ac74af534de981c716cb00c6c97a",
    ];

    let (boot_time, kill_recovery, restart_answers) = block_on_in(&cp_ns.0, || async {
        let c = HttpClient::with_roots(&format!("https://127.0.0.1:{API_PORT}"), &roots)
            .unwrap()
            .with_token(Some(TEST_KEY.into()));
        // 1. Both workers register (their first heartbeat reaches the socket, which starts
        // orchestratord): two "node joined" records in its journal. Their pools may still be
        // loading; the pinned tasks below wait in the queue for them.
        let start = Instant::now();
        cp.journal_n(&joined, 2, Duration::from_secs(30));
        let boot_time = start.elapsed();
        let n = nodes(&c).await;
        for v in &n {
            assert!(v.address.starts_with("https://10.231."), "{v:?}");
        }
        a_chat_is_answered_on_each_worker(&c).await;
        let kill_recovery =
            a_killed_node_agent_returns_with_one_engine(&c, &cp, &w2, &joined).await;
        let restart_answers = no_request_fails_across_a_restart(&cp, &roots).await;
        a_lost_link_ends_the_stream_and_the_node_returns(&c, &cp, &w3_ns).await;
        (boot_time, kill_recovery, restart_answers)
    });
    llorch_drains_a_worker_over_tls(&cp, &cp_ns, &ca);
    println!(
        "cloud under systemd: both workers registered {boot_time:?} after boot; pool-managerd SIGKILLed on w2 served again after {kill_recovery:?}, one engine; {restart_answers} requests across an orchestratord restart, all 200"
    );
    drop((w3, w2, cp));
}

/// `llorch nodes drain` from the control plane's host, over TLS; the drain is in orchestratord's journal, and the credentials were readable by root alone.
fn llorch_drains_a_worker_over_tls(cp: &Container, cp_ns: &Netns, ca: &Ca) {
    let out = Command::new("ip")
        .args(["netns", "exec", &cp_ns.0])
        .arg(bin("llorch"))
        .args(["nodes", "drain", "w3", "--wait", "30"])
        .env("LLORCH_URL", format!("https://127.0.0.1:{API_PORT}"))
        .env("LLORCH_CA", &ca.cert)
        .env("LLORCH_API_KEY", TEST_KEY)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("node w3: drained"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // orchestratord's journal holds the restart; the credentials were not readable by others.
    let orch = cp.ok(&["journalctl", "--no-pager", "-u", "orchestratord"]);
    assert!(orch.contains("Node drain requested."), "{orch}");
    let mode = cp.ok(&["stat", "-c", "%a %U", "/etc/llama-orch/secrets/cp.key"]);
    assert_eq!(mode.trim(), "600 root");
}

fn stage_the_hosts(
    dir: &Path,
    hosts: &Value,
    ca: &Ca,
    cp_cert: &llorch_tests::pki::ServerCert,
    [keys, tokens]: [&Path; 2],
) -> [PathBuf; 3] {
    // Each host gets what the NixOS module renders for it from nix/examples/cloud.nix through
    // the cluster library (node.toml, drop-ins for listen addresses, credentials and
    // environment, masks), placed as NixOS would place them, and the secrets the example names
    // under /etc/llama-orch/secrets. Then the units the module enables are started, as boot
    // would. The control plane: orchestratord only, socket-activated on 0.0.0.0:8443 with TLS.
    // The workers: pool-managerd on <ip>:9200 with TLS, engines as llorch-engine@ units.
    let stage = |id: &str, secrets: &[(&str, &Path)], extra: &[(&str, &Path)]| -> PathBuf {
        let stage = dir.join(id);
        llorch_tests::nix::write_files(&stage.join("root"), &hosts[id]);
        let mut install =
            String::from("mkdir -p -m 0700 /etc/llama-orch/secrets\ncp -a /mnt/llorch/root/. /\n");
        for (name, _) in secrets {
            install +=
                &format!("install -m 0600 /mnt/llorch/{name} /etc/llama-orch/secrets/{name}\n");
        }
        let units = llorch_tests::nix::start_units(&hosts[id]).join(" ");
        // --no-block: a worker's pool-managerd is ready once registered, and the network
        // it registers over comes after (add_addresses below).
        install += &format!(
            "systemctl daemon-reload\nsystemctl start --no-block {units} || {{ journalctl --no-pager -n 40; exit 1; }}\n"
        );
        stage_host(&stage, &[secrets, extra].concat(), &install);
        stage
    };
    let cp_stage = stage(
        "cp",
        &[
            ("node-tokens", tokens),
            ("api-keys", keys),
            ("cp.pem", &cp_cert.cert),
            ("cp.key", &cp_cert.key),
            ("ca.pem", &ca.cert),
        ],
        &[],
    );
    let worker_stage = |id: &str, ip: &str, token: &str| -> PathBuf {
        let cert = ca.server(&format!("{id}-node"), &[ip]);
        let token_file = dir.join(format!("{id}-node-token"));
        llorch_tests::write_secret(&token_file, &format!("{token}\n"));
        // The example's model path, for the provisioner to stage.
        let model_dir = dir.join(id).join("root/srv/models");
        std::fs::create_dir_all(&model_dir).unwrap();
        std::os::unix::fs::symlink(
            "/mnt/llorch/model.gguf",
            model_dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        )
        .unwrap();
        stage(
            id,
            &[
                ("node-token", &token_file),
                ("node.pem", &cert.cert),
                ("node.key", &cert.key),
                ("ca.pem", &ca.cert),
            ],
            &[("model.gguf", &model_path())],
        )
    };
    let w2_stage = worker_stage("w2", "10.231.2.2", TOKEN_W2);
    let w3_stage = worker_stage("w3", "10.231.3.2", TOKEN_W3);
    [cp_stage, w2_stage, w3_stage]
}

async fn a_chat_is_answered_on_each_worker(c: &HttpClient) {
    // 2. A chat on each worker (pinned by node).
    for node in ["w2", "w3"] {
        let t: TaskAccepted = c
            .post_json(
                "/v2/tasks",
                &json!({"model_ref": MODEL_ID, "prompt": "The capital of France is",
                                "max_tokens": 4, "temperature": 0,
                                "placement": {"pin_node_id": node}}),
            )
            .await
            .unwrap();
        let (on, s) = started(c, &t).await;
        assert_eq!(on, node);
        let f = frames(s).await;
        assert!(f.iter().any(|f| f.event == "end"), "{f:?}");
    }
}

async fn a_killed_node_agent_returns_with_one_engine(
    c: &HttpClient,
    cp: &Container,
    w2: &Container,
    joined: &[&str],
) -> Duration {
    // 3. SIGKILL pool-managerd on w2: systemd restarts it, it registers again, and its
    // engine unit is started again in place of the old one: never two copies of the
    // model (one engine process, the old one gone).
    let engine_before = w2.main_pid("llorch-engine@default.service");
    let pm_before = w2.main_pid("pool-managerd.service");
    assert!(engine_before != 0 && pm_before != 0);
    let killed = Instant::now();
    w2.ok(&[
        "systemctl",
        "kill",
        "--signal=KILL",
        "--kill-whom=main",
        "pool-managerd.service",
    ]);
    // The new pool-managerd registers again: the control plane's third "node joined".
    cp.journal_n(joined, 3, Duration::from_secs(30));
    let pm = w2.main_pid("pool-managerd.service");
    assert!(pm != 0 && pm != pm_before, "{pm} after {pm_before}");
    assert_eq!(w2.show("pool-managerd.service", "ActiveState"), "active");
    let t: TaskAccepted = c
        .post_json(
            "/v2/tasks",
            &json!({"model_ref": MODEL_ID, "prompt": "The capital of France is",
                            "max_tokens": 4, "temperature": 0,
                            "placement": {"pin_node_id": "w2"}}),
        )
        .await
        .unwrap();
    let (_, s) = started(c, &t).await;
    assert!(frames(s).await.iter().any(|f| f.event == "end"));
    let kill_recovery = killed.elapsed();
    let engines = w2.ok(&[
        "sh",
        "-c",
        "grep -lx llorch-engine /proc/[0-9]*/comm | wc -l",
    ]);
    assert_eq!(engines.trim(), "1", "one engine on w2");
    let engine_after = w2.main_pid("llorch-engine@default.service");
    assert_ne!(engine_after, 0);
    let old_alive = w2.sh(&["test", "-e", &format!("/proc/{engine_before}")]);
    assert!(
        engine_after == engine_before || !old_alive.status.success(),
        "the old engine {engine_before} still runs next to {engine_after}"
    );
    kill_recovery
}

async fn no_request_fails_across_a_restart(cp: &Container, roots: &TlsRoots) -> usize {
    // 4. Restart orchestratord while a client keeps asking, one connection per request
    // as curl does: no request fails. (A keep-alive connection that sits idle across
    // the restart is closed by the old process; a request sent on it at that instant
    // gets a connection error, which clients retry: docs/OPERATIONS.md.)
    let mut answers = Vec::new();
    let started_at = Instant::now();
    let mut restarted = false;
    while started_at.elapsed() < Duration::from_secs(8) {
        let fresh = HttpClient::with_roots(&format!("https://127.0.0.1:{API_PORT}"), roots)
            .unwrap()
            .with_token(Some(TEST_KEY.into()));
        let (status, _, v) = post(
                    &fresh,
                    "/v1/chat/completions",
                    &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "What city is the capital of France?"}], "max_tokens": 8, "temperature": 0}),
                )
                .await;
        answers.push((status, v));
        if answers.len() == 3 && !restarted {
            cp.ok(&[
                "systemctl",
                "restart",
                "--no-block",
                "orchestratord.service",
            ]);
            restarted = true;
        }
    }
    assert!(restarted && answers.len() >= 5, "{}", answers.len());
    for (status, v) in &answers {
        assert_eq!(*status, 200, "a request failed across the restart: {v}");
    }
    answers.len()
}

async fn a_lost_link_ends_the_stream_and_the_node_returns(
    c: &HttpClient,
    cp: &Container,
    w3_ns: &Netns,
) {
    // 5. w3's link drops mid-stream: its task ends with NODE_UNAVAILABLE, w3 goes
    // offline; the link comes back and so does w3, by itself.
    let t: TaskAccepted = c
        .post_json(
            "/v2/tasks",
            &json!({"model_ref": MODEL_ID, "prompt": PROMPT, "max_tokens": 400,
                            "temperature": 0, "placement": {"pin_node_id": "w3"}}),
        )
        .await
        .unwrap();
    let (_, s) = started(c, &t).await;
    let down = Instant::now();
    ip(&["-n", &w3_ns.0, "link", "set", "to-cp", "down"]);
    let f = frames(s).await;
    let lost_after = down.elapsed();
    assert_eq!(
        last_error(&f).map(|e| e.code),
        Some(ErrorCode::NodeUnavailable),
        "{f:?}"
    );
    assert_eq!(state_of(&nodes(c).await, "w3"), "offline");
    ip(&["-n", &w3_ns.0, "link", "set", "to-cp", "up"]);
    cp.journal_n(
        &["-u", "orchestratord", "MESSAGE=Node is back online."],
        1,
        Duration::from_secs(30),
    );
    assert_eq!(state_of(&nodes(c).await, "w3"), "online");
    assert!(lost_after < Duration::from_secs(6), "{lost_after:?}");
    // The workers beat over UDP through orchestratord-beats.socket between their reports.
    let beats = beats_taken(&llorch_tests::prom::scrape(c).await);
    assert!(beats >= 10.0, "{beats} beats taken");
}
