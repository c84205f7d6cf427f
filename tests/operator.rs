//! The operator's path (issue 31), end to end with the real daemons on the real model:
//!
//! - a control plane whose API speaks only TLS still registers the node agent of its own
//!   machine, over its local Unix socket (`--local-socket`, `orchestratord-local.socket`);
//! - a worker is added by hand by running the two recipes of docs/OPERATIONS.md ("Add a worker
//!   by hand, without systemd") as they are written;
//! - a worker whose certificate the control plane does not trust is refused at registration,
//!   with the reason on both sides, instead of showing `ready` and failing every task;
//! - a SIGKILLed worker's pools say `offline` in `/v2/pools`, `/v2/nodes`, `llorch status`,
//!   D-Bus and the metrics; a SIGTERMed worker leaves (no lost node, no alert);
//! - `llorch` says "refused" for a key that may not, not "cannot reach", and `llorch status |
//!   head` ends quietly.

// The serial guard (one engine-running test at a time) is held for the whole test.
#![allow(clippy::await_holding_lock)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use llorch_client::{HttpClient, TlsRoots};
use llorch_tests::bus::PrivateBus;
use llorch_tests::pki::Ca;
use llorch_tests::prom::Scrape;
use llorch_tests::stack::{free_port, signal, Daemon, MODEL_ID, TEST_KEY};
use llorch_tests::{bin, model_path, repo_root, serial, wait_until, write_secret};
use llorch_wire::node::PoolState;
use llorch_wire::task::{NodeView, PoolsAnswer};
use serde_json::{json, Value};

const SHA: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const OTHER_KEY: &str = "other-key-0123456789abcdef";
const HOME_TOKEN: &str = "home-token-0123456789abcdef";
const ORCH: &str = "org.llamaorch.Orchestrator1";
const ORCH_PATH: &str = "/org/llamaorch/Orchestrator1";

/// The `sh` block of docs/OPERATIONS.md after `<!-- recipe: NAME -->`.
fn recipe(name: &str) -> String {
    let doc = std::fs::read_to_string(repo_root().join("docs/OPERATIONS.md")).unwrap();
    let marker = format!("<!-- recipe: {name} -->");
    let after = &doc[doc.find(&marker).unwrap_or_else(|| panic!("no {marker}"))..];
    let start = after.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let len = after[start..].find("\n```").expect("the block ends");
    after[start..start + len + 1].to_string()
}

/// Runs a recipe with bash, its variables set to `env` and the built binaries first on PATH.
fn run_recipe(name: &str, env: &[(&str, String)]) -> Command {
    let path = format!(
        "{}:{}",
        bin("pool-managerd").parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("bash");
    c.args(["-euo", "pipefail", "-c", &recipe(name)])
        .env("PATH", path)
        .env("LLORCH_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null());
    c
}

/// A worker started by the worker recipe (bash `exec`s pool-managerd: the child is it).
fn start_worker(dir: &Path, env: &[(&str, String)], log: &str, bus: &PrivateBus) -> Daemon {
    let log = dir.join(log);
    let file = std::fs::File::create(&log).unwrap();
    let child: Child = run_recipe("worker", env)
        .envs(bus.env())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .expect("bash");
    Daemon { child, log }
}

fn llorch(url: &str, ca: &Path, key: &str, args: &str) -> std::process::Output {
    Command::new("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            &format!("{} {args}", bin("llorch").display()),
        ])
        .env("LLORCH_URL", url)
        .env("LLORCH_CA", ca)
        .env("LLORCH_API_KEY", key)
        .env("LLORCH_DBUS", "off")
        .output()
        .expect("llorch")
}

async fn nodes(c: &HttpClient) -> Vec<NodeView> {
    c.get_json("/v2/nodes").await.expect("GET /v2/nodes")
}

async fn pools(c: &HttpClient) -> PoolsAnswer {
    c.get_json("/v2/pools").await.expect("GET /v2/pools")
}

async fn metrics(c: &HttpClient) -> Scrape {
    let req = c
        .build(
            c.request(hyper::Method::GET, "/metrics"),
            bytes::Bytes::new(),
        )
        .unwrap();
    let resp = c.send(req).await.unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    Scrape::parse(&String::from_utf8_lossy(&body))
}

/// Waits until node `id`'s pool `default` is `state` in `/v2/pools`.
async fn wait_pool(c: &HttpClient, node: &str, state: PoolState, logs: impl Fn() -> String) {
    wait_until(
        &format!("pool default of {node} {state}"),
        Duration::from_secs(180),
        || async {
            let p = pools(c).await;
            match p.pools.iter().find(|p| p.node_id == node) {
                Some(p) if p.state == state => Ok(()),
                other => Err(format!("{other:?}\n{}", logs())),
            }
        },
    )
    .await;
}

#[tokio::test]
async fn workers_added_by_hand_register_leave_and_go_offline_truthfully() {
    let _g = serial();
    let bus = PrivateBus::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();

    // A cluster CA; the control plane's certificate; the worker w2's directory as the recipe
    // expects it: w2.pem, w2.key, ca.pem, the model.
    let w2 = d.join("w2");
    std::fs::create_dir_all(&w2).unwrap();
    let ca = Ca::new(&w2, "cluster");
    std::fs::copy(&ca.cert, w2.join("ca.pem")).unwrap();
    ca.server("w2", &["127.0.0.1"]);
    // A worker whose certificate another CA signed: it trusts the control plane, but the
    // control plane does not trust it.
    let rogue = d.join("rogue");
    std::fs::create_dir_all(&rogue).unwrap();
    Ca::new(&rogue, "elsewhere").server("rogue", &["127.0.0.1"]);
    std::fs::copy(&ca.cert, rogue.join("ca.pem")).unwrap();

    let cl = start_the_control_plane(d, port, &ca, &bus).await;
    let home_node = the_local_node_registers_over_the_socket(&cl).await;
    an_untrusted_worker_is_refused_at_registration(&cl, &rogue, &bus).await;
    let (env, worker) = a_worker_added_by_the_recipe_serves(&cl, &w2, &bus).await;
    a_killed_worker_is_offline_everywhere(&cl, worker, &bus).await;
    a_restarted_worker_is_back_and_leaves_on_sigterm(&cl, &env, &bus).await;
    the_cli_says_refused_and_ends_quietly(&cl);
    drop(home_node);
}

/// The TLS-only control plane of the test, and what the recipes need of it.
struct Cluster {
    dir: std::path::PathBuf,
    url: String,
    c: HttpClient,
    orch: Daemon,
    tokens: std::path::PathBuf,
    local: std::path::PathBuf,
    ca_cert: std::path::PathBuf,
}

impl Cluster {
    /// The control plane's recipe: a token for node `id`, added to its token file.
    fn token_for(&self, id: &str) -> String {
        let out = run_recipe(
            "control-plane",
            &[
                ("NODE_ID", id.to_string()),
                ("NODE_TOKENS", self.tokens.display().to_string()),
                ("ORCHESTRATORD_PID", self.orch.pid().to_string()),
            ],
        )
        .output()
        .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// The worker recipe's environment.
    fn worker_env(
        &self,
        id: &str,
        token: &str,
        dir: &Path,
        addr: &str,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("NODE_ID", id.to_string()),
            ("TOKEN", token.to_string()),
            ("CP", self.url.clone()),
            ("ADDR", addr.to_string()),
            ("DIR", dir.display().to_string()),
            ("MODEL", model_path().display().to_string()),
            ("SHA", SHA.to_string()),
        ]
    }
}

/// The control plane: TLS only on its port, the local socket for its own machine's node.
async fn start_the_control_plane(d: &Path, port: u16, ca: &Ca, bus: &PrivateBus) -> Cluster {
    let url = format!("https://127.0.0.1:{port}");
    let cp = ca.server("cp", &["127.0.0.1"]);
    let keys = d.join("api-keys");
    write_secret(
        &keys,
        &format!("tester {TEST_KEY} admin\nother {OTHER_KEY}\n"),
    );
    let tokens = d.join("node-tokens");
    write_secret(&tokens, &format!("home {HOME_TOKEN}\n"));
    let local = d.join("orchestratord.sock");
    let orch_log = d.join("orchestratord.log");
    let orch = Command::new(bin("orchestratord"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(&cp.cert)
        .arg("--tls-key")
        .arg(&cp.key)
        .arg("--node-ca")
        .arg(&ca.cert)
        .arg("--api-keys")
        .arg(&keys)
        .arg("--node-tokens")
        .arg(&tokens)
        .arg("--local-socket")
        .arg(&local)
        .envs(bus.env())
        .env("LLORCH_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&orch_log).unwrap())
        .spawn()
        .expect("orchestratord");
    let orch = Daemon {
        child: orch,
        log: orch_log,
    };
    let roots = TlsRoots::from_pem_file(&ca.cert).unwrap();
    let c = HttpClient::with_roots(&url, &roots)
        .unwrap()
        .with_token(Some(TEST_KEY.into()));
    let plain = HttpClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
    wait_until(
        "orchestratord's TLS listener",
        Duration::from_secs(30),
        || async {
            match c.get_json::<Value>("/health/live").await {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("{e}\n{}", orch.log_text())),
            }
        },
    )
    .await;
    // Nothing answers plain HTTP on the API's port.
    assert!(plain.get_json::<Value>("/health/live").await.is_err());
    Cluster {
        dir: d.to_path_buf(),
        url,
        c,
        orch,
        tokens,
        local,
        ca_cert: ca.cert.clone(),
    }
}

/// This machine's node agent reaches the TLS-only control plane over the local socket.
async fn the_local_node_registers_over_the_socket(cl: &Cluster) -> Daemon {
    let (d, c, local) = (cl.dir.as_path(), &cl.c, &cl.local);
    let home = d.join("home");
    std::fs::create_dir_all(home.join("run")).unwrap();
    write_secret(&home.join("node-token"), HOME_TOKEN);
    std::fs::write(
        home.join("node.toml"),
        format!(
            "[node]\nid = \"home\"\ncontrol_plane = \"unix:{local}\"\nlisten = \"unix:{run}/node.sock\"\n\
             token_file = \"{home}/node-token\"\ncache_dir = \"{home}/cache\"\nruntime_dir = \"{run}\"\n\
             heartbeat_secs = 1\nlauncher = \"process\"\n\n[[pools]]\nid = \"default\"\nslots = 2\nctx = 1024\n\
             threads = 1\n\n[pools.model]\nid = \"{MODEL_ID}\"\nsource = \"{model}\"\nsha256 = \"{SHA}\"\n",
            local = local.display(),
            run = home.join("run").display(),
            home = home.display(),
            model = model_path().display(),
        ),
    )
    .unwrap();
    let home_log = d.join("home.log");
    let home_node = Daemon {
        child: Command::new(bin("pool-managerd"))
            .arg("--config")
            .arg(home.join("node.toml"))
            .env("LLORCH_LOG", "info")
            .env("LLORCH_DBUS", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&home_log).unwrap())
            .spawn()
            .unwrap(),
        log: home_log,
    };
    wait_pool(c, "home", PoolState::Ready, || home_node.log_text()).await;
    home_node
}

async fn an_untrusted_worker_is_refused_at_registration(
    cl: &Cluster,
    rogue: &Path,
    bus: &PrivateBus,
) {
    // 3. The worker the control plane cannot verify is refused when it registers, with the
    // reason on both sides; it never shows up as a node.
    let token = cl.token_for("rogue");
    assert_eq!(token.len(), 64, "{token}");
    let env = cl.worker_env(
        "rogue",
        &token,
        rogue,
        &format!("127.0.0.1:{}", free_port()),
    );
    let mut bad = start_worker(&cl.dir, &env, "rogue.log", bus);
    wait_until("the refusal of rogue", Duration::from_secs(60), || async {
        let (o, w) = (cl.orch.log_text(), bad.log_text());
        if o.contains("Refused a registration: the node's API cannot be reached over TLS.")
            && w.contains("The control plane refused this node (400")
        {
            Ok(())
        } else {
            Err(format!("orchestratord:\n{o}\nrogue:\n{w}"))
        }
    })
    .await;
    assert!(bad.log_text().contains("certificate"), "{}", bad.log_text());
    assert!(!nodes(&cl.c).await.iter().any(|n| n.node_id == "rogue"));
    bad.stop();
}

async fn a_worker_added_by_the_recipe_serves(
    cl: &Cluster,
    w2: &Path,
    bus: &PrivateBus,
) -> (Vec<(&'static str, String)>, Daemon) {
    // 4. The worker the recipe adds serves: with home's pool drained, a task goes to w2.
    let token = cl.token_for("w2");
    let addr = format!("127.0.0.1:{}", free_port());
    let env = cl.worker_env("w2", &token, w2, &addr);
    let worker = start_worker(&cl.dir, &env, "w2.log", bus);
    wait_pool(&cl.c, "w2", PoolState::Ready, || worker.log_text()).await;
    let drained: Value =
        cl.c.post_json("/v2/pools/default/drain?node=home", &json!({}))
            .await
            .unwrap();
    assert_eq!(drained["state"], "draining", "{drained}");
    let answer: Value =
        cl.c.post_json(
            "/v1/chat/completions",
            &json!({"model": MODEL_ID, "max_tokens": 4,
                    "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await
        .unwrap();
    assert!(
        answer["choices"][0]["message"]["content"].is_string(),
        "{answer}"
    );
    (env, worker)
}

async fn a_killed_worker_is_offline_everywhere(cl: &Cluster, mut worker: Daemon, bus: &PrivateBus) {
    // 5. A SIGKILLed worker: offline, and its pool says so everywhere.
    signal(worker.pid(), libc::SIGKILL);
    let _ = worker.child.wait();
    wait_until("w2 offline", Duration::from_secs(60), || async {
        let n = nodes(&cl.c).await;
        match n.iter().find(|n| n.node_id == "w2") {
            Some(n) if n.state == "offline" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let w2_view = nodes(&cl.c)
        .await
        .into_iter()
        .find(|n| n.node_id == "w2")
        .unwrap();
    assert!(!w2_view.online, "{w2_view:?}");
    let p = pools(&cl.c).await;
    let w2_pool = p.pools.iter().find(|p| p.node_id == "w2").unwrap();
    assert_eq!(w2_pool.state, PoolState::Offline, "{w2_pool:?}");
    assert!(!w2_pool.node_online);
    let status = llorch(&cl.url, &cl.ca_cert, TEST_KEY, "status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("default") && l.contains("w2") && l.contains("offline")),
        "{text}"
    );
    let m = metrics(&cl.c).await;
    assert_eq!(m.sum("llorch_pools", &[("state", "offline")]), 1.0);
    assert_eq!(m.sum("llorch_nodes", &[("state", "offline")]), 1.0);
    assert_eq!(m.sum("llorch_node_events_total", &[("event", "lost")]), 1.0);
    let on_bus = bus.ok(&["get-property", ORCH, ORCH_PATH, ORCH, "Pools"]);
    assert!(
        on_bus.contains(&format!("\"w2\" \"default\" \"{MODEL_ID}\" \"offline\"")),
        "{on_bus}"
    );
}

async fn a_restarted_worker_is_back_and_leaves_on_sigterm(
    cl: &Cluster,
    env: &[(&str, String)],
    bus: &PrivateBus,
) {
    // 6. The same worker started again is back; SIGTERM then makes it leave: forgotten at
    // once, counted as left, and nothing offline for an alert to see.
    let mut worker = start_worker(&cl.dir, env, "w2-again.log", bus);
    wait_pool(&cl.c, "w2", PoolState::Ready, || worker.log_text()).await;
    let status = worker.stop();
    assert!(status.success(), "{status:?}\n{}", worker.log_text());
    assert!(
        worker.log_text().contains("Left the control plane."),
        "{}",
        worker.log_text()
    );
    assert!(!nodes(&cl.c).await.iter().any(|n| n.node_id == "w2"));
    assert!(!pools(&cl.c).await.pools.iter().any(|p| p.node_id == "w2"));
    let m = metrics(&cl.c).await;
    assert_eq!(m.sum("llorch_node_events_total", &[("event", "left")]), 1.0);
    assert_eq!(m.sum("llorch_node_events_total", &[("event", "lost")]), 1.0);
    assert_eq!(m.sum("llorch_nodes", &[("state", "offline")]), 0.0);
    assert!(cl.orch.log_text().contains("Node left."));
    // The recipe checked the configuration before it started the node.
    assert!(
        worker.log_text().contains("configuration ok: node w2"),
        "{}",
        worker.log_text()
    );
}

fn the_cli_says_refused_and_ends_quietly(cl: &Cluster) {
    // 7. The CLI's words: a key that may not is refused, not unreachable; a closed pipe is
    // the reader's business.
    let out = llorch(&cl.url, &cl.ca_cert, OTHER_KEY, "status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("refused the request (403") && !err.contains("cannot reach"),
        "{err}"
    );
    let out = llorch(&cl.url, &cl.ca_cert, TEST_KEY, "status | head -1");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "{out:?}");
}
