//! The home stack from the release binaries, for the benches that go through orchestratord:
//! `orchestratord` on a free loopback port and `pool-managerd` with one pool of the default
//! model (which starts `engine-provisioner` and `llorch-engine`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use llorch_client::HttpClient;
use llorch_wire::handoff::Handoff;
use llorch_wire::node::PoolState;
use llorch_wire::task::PoolsAnswer;

use super::{bin, env_or, free_port, model_path};

/// `LLORCH_BENCH_MODEL`, else the default model the tests use.
pub fn bench_model() -> PathBuf {
    std::env::var_os("LLORCH_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(model_path)
}

pub const MODEL_ID: &str = "smollm2-135m";
pub const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const POOL: &str = "default";

/// A daemon this bench started; stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Self {
        let child = cmd
            .env("LLORCH_LOG", env_or("LLORCH_BENCH_LOG", "info".to_string()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { name, child, log }
    }

    pub fn check_alive(&mut self) {
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
        super::terminate(&mut self.child, Duration::from_secs(15));
    }
}

/// One node of a bench stack: its id, its one pool's id, slots and engine threads.
#[derive(Debug, Clone, Copy)]
pub struct NodeSpec {
    pub id: &'static str,
    pub pool: &'static str,
    pub slots: u32,
    pub threads: u32,
    /// The pool's `prefix_cache_mib` (None: the default).
    pub prefix_cache_mib: Option<u64>,
}

pub struct Stack {
    // Dropped in order: the nodes (and their engines) before the control plane, then the
    // directory.
    nodes: Vec<Daemon>,
    orch: Daemon,
    dir: tempfile::TempDir,
    port: u16,
    pools: usize,
    /// The first pool's handoff file.
    handoff: PathBuf,
}

impl Stack {
    /// One node (`bench-node`) with one pool (`default`).
    pub fn start(slots: u32, threads: u32) -> Self {
        Self::start_nodes(
            &[NodeSpec {
                id: "bench-node",
                pool: POOL,
                slots,
                threads,
                prefix_cache_mib: None,
            }],
            &[],
        )
    }

    /// Nodes on loopback, each with its own runtime directory (and, beyond the first, its own
    /// model cache, so no two provisioners stage into one), and orchestratord with `orch_args`.
    pub fn start_nodes(specs: &[NodeSpec], orch_args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("llorch-bench-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let logs = dir.path().join("logs");
        std::fs::create_dir_all(&logs).expect("logs dir");
        let mut cmd = Command::new(bin("orchestratord"));
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--queue-capacity", "256"])
            .args(orch_args);
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
        let mut nodes = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let runtime = dir.path().join(format!("run-{}", spec.id));
            // The tests' shared cache for the first node: staging there is a verified copy,
            // done once.
            let cache = match i {
                0 => std::env::temp_dir().join("llorch-test-cache"),
                _ => dir.path().join(format!("cache-{}", spec.id)),
            };
            let config = format!(
                r#"[node]
id = "{id}"
control_plane = "http://127.0.0.1:{port}"
listen = "unix:{runtime}/pool-managerd.sock"
cache_dir = "{cache}"
runtime_dir = "{runtime}"
heartbeat_secs = 2
engine_bin = "{engine}"
provisioner_bin = "{provisioner}"

[[pools]]
id = "{pool}"
slots = {slots}
ctx = 2048
threads = {threads}
{cache_line}
[pools.model]
id = "{MODEL_ID}"
source = "{model}"
sha256 = "{MODEL_SHA256}"
"#,
                id = spec.id,
                pool = spec.pool,
                slots = spec.slots,
                threads = spec.threads,
                cache_line = spec
                    .prefix_cache_mib
                    .map(|m| format!("prefix_cache_mib = {m}\n"))
                    .unwrap_or_default(),
                runtime = runtime.display(),
                cache = cache.display(),
                engine = bin("llorch-engine").display(),
                provisioner = bin("engine-provisioner").display(),
                model = bench_model().display(),
            );
            let config_path = dir.path().join(format!("{}.toml", spec.id));
            std::fs::write(&config_path, config).expect("write node config");
            let mut cmd = Command::new(bin("pool-managerd"));
            cmd.arg("--config").arg(&config_path);
            nodes.push(Daemon::spawn(
                "pool-managerd",
                cmd,
                logs.join(format!("pool-managerd-{}.log", spec.id)),
            ));
        }
        let handoff = dir.path().join(format!(
            "run-{}/handoff/{pool}/{pool}.json",
            specs[0].id,
            pool = specs[0].pool
        ));
        Self {
            nodes,
            orch,
            dir,
            port,
            pools: specs.len(),
            handoff,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits until orchestratord sees every pool ready and the first pool's handoff file names
    /// its engine's socket, which it returns.
    pub async fn wait_ready(&mut self) -> PathBuf {
        let client = HttpClient::new(&self.url()).expect("valid url");
        let start = Instant::now();
        loop {
            self.orch.check_alive();
            for n in &mut self.nodes {
                n.check_alive();
            }
            let ready = client
                .get_json::<PoolsAnswer>("/v2/pools")
                .await
                .ok()
                .is_some_and(|a| {
                    a.pools
                        .iter()
                        .filter(|p| p.state == PoolState::Ready && p.slots_busy == 0)
                        .count()
                        >= self.pools
                });
            let socket = std::fs::read_to_string(&self.handoff)
                .ok()
                .and_then(|t| serde_json::from_str::<Handoff>(&t).ok())
                .map(|h| PathBuf::from(h.socket));
            if let (true, Some(socket)) = (ready, socket) {
                return socket;
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "pools not ready after 180 s; logs in {}",
                self.dir.path().join("logs").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
