//! The home stack for end-to-end tests: the real `orchestratord` and `pool-managerd` binaries
//! (which start the real provisioner and engine on the default model), on a free port and a
//! private runtime directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use llorch_client::HttpClient;
use llorch_wire::handoff::Handoff;
use llorch_wire::node::PoolState;
use llorch_wire::task::PoolsAnswer;

use crate::{bin, model_path};

/// The API key the test stacks accept (named `tester`, marked admin).
pub const TEST_KEY: &str = "test-key-0123456789abcdef";
/// Another key of the test stacks (named `other`, a plain client).
pub const OTHER_KEY: &str = "other-key-0123456789abcdef";
pub const MODEL_ID: &str = "smollm2-135m";
/// The node token of test stacks that require one.
pub const NODE_TOKEN: &str = "node-token-0123456789abcdef";

/// How a test stack is configured.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub slots: u32,
    pub ctx: u32,
    pub queue_capacity: usize,
    pub policy: &'static str,
    pub heartbeat_secs: u64,
    pub api_keys: bool,
    /// Require a node token between orchestratord and pool-managerd.
    pub node_token: bool,
    /// Extra environment of pool-managerd (a notify socket, say).
    pub node_env: Vec<(String, String)>,
    /// Extra flags of orchestratord.
    pub orch_args: Vec<String>,
    /// Extra environment of orchestratord.
    pub orch_env: Vec<(String, String)>,
    /// Another GGUF file for the pool (served as `MODEL_ID`, without a sha256 check); default:
    /// the bundled model.
    pub model: Option<PathBuf>,
    /// More of node.toml after the default pool (more `[[pools]]`).
    pub extra_node_toml: String,
    /// The default pool serves embeddings too.
    pub embeddings: bool,
    /// More keys of node.toml's `[node]` table (memory budgets, say).
    pub node_keys: String,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            slots: 4,
            ctx: 1024,
            queue_capacity: 64,
            policy: "reject",
            heartbeat_secs: 1,
            api_keys: true,
            node_token: false,
            node_env: Vec::new(),
            orch_args: Vec::new(),
            orch_env: Vec::new(),
            model: None,
            extra_node_toml: String::new(),
            embeddings: false,
            node_keys: String::new(),
        }
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        self.child.wait().expect("wait for the daemon")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(15));
    }
}

/// Stops a child that may still run: SIGTERM, up to `grace` to exit, then SIGKILL.
pub fn terminate(child: &mut Child, grace: Duration) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid the test started (or read from a handoff file it owns).
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// CPU time (user + system) a process used so far, in clock ticks (1/100 s on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    // Fields after the command: state is field 3, utime 14 and stime 15 of the whole line.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let num = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    num(11) + num(12)
}

/// Whether a process with this pid exists (and is not a zombie we could still reap).
pub fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    match stat.rfind(')') {
        Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z') | None),
        None => false,
    }
}

pub struct Stack {
    pub opts: StackOptions,
    pub dir: tempfile::TempDir,
    pub port: u16,
    // Dropped in order: the node (and its engines) before the control plane.
    pub node: Option<Daemon>,
    pub orch: Option<Daemon>,
}

impl Stack {
    pub fn start(opts: StackOptions) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("llorch-stack-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let mut stack = Self {
            opts,
            dir,
            port,
            node: None,
            orch: None,
        };
        std::fs::create_dir_all(stack.dir.path().join("logs")).expect("logs dir");
        stack.start_orchestratord();
        stack.start_node();
        stack.wait_ready();
        stack
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn cache(&self) -> PathBuf {
        // One cache for every test stack: staging is then a verified copy, done once.
        std::env::temp_dir().join("llorch-test-cache")
    }

    pub fn client(&self) -> HttpClient {
        let c = HttpClient::new(&self.url()).expect("valid url");
        if self.opts.api_keys {
            c.with_token(Some(TEST_KEY.into()))
        } else {
            c
        }
    }

    pub fn start_orchestratord(&mut self) {
        let keys = self.dir.path().join("api-keys");
        crate::write_secret(
            &keys,
            &format!("tester {TEST_KEY} admin\nother {OTHER_KEY}\n"),
        );
        let log = self.dir.path().join("logs/orchestratord.log");
        let mut cmd = Command::new(bin("orchestratord"));
        cmd.args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--queue-capacity", &self.opts.queue_capacity.to_string()])
            .args(["--admission-policy", self.opts.policy])
            .args(&self.opts.orch_args);
        if self.opts.api_keys {
            cmd.arg("--api-keys").arg(&keys);
        }
        if self.opts.node_token {
            let tokens = self.dir.path().join("node-tokens");
            crate::write_secret(&tokens, &format!("node-a {NODE_TOKEN}\n"));
            cmd.arg("--node-tokens").arg(&tokens);
        }
        let child = cmd
            .envs(self.opts.orch_env.iter().map(|(k, v)| (k, v)))
            .env("LLORCH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("log"),
            )
            .spawn()
            .expect("spawn orchestratord");
        let daemon = Daemon { child, log };
        self.orch = Some(daemon);
        let url = format!("127.0.0.1:{}", self.port);
        let start = Instant::now();
        while std::net::TcpStream::connect(&url).is_err() {
            let orch = self.orch.as_mut().expect("just set");
            if let Ok(Some(status)) = orch.child.try_wait() {
                panic!("orchestratord exited with {status}:\n{}", orch.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "orchestratord does not accept connections"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn node_config(&self) -> String {
        let runtime = self.runtime();
        let token = if self.opts.node_token {
            let path = self.dir.path().join("node-token");
            crate::write_secret(&path, NODE_TOKEN);
            format!("token_file = \"{}\"\n", path.display())
        } else {
            String::new()
        };
        format!(
            r#"[node]
id = "node-a"
control_plane = "{url}"
listen = "unix:{runtime}/pool-managerd.sock"
cache_dir = "{cache}"
runtime_dir = "{runtime}"
heartbeat_secs = {hb}
engine_bin = "{engine}"
provisioner_bin = "{provisioner}"
{token}{node_keys}
[[pools]]
id = "default"
slots = {slots}
ctx = {ctx}
threads = 2
embeddings = {embeddings}

[pools.model]
id = "{MODEL_ID}"
source = "{model}"
{sha256}{extra}"#,
            url = self.url(),
            runtime = runtime.display(),
            cache = self.cache().display(),
            hb = self.opts.heartbeat_secs,
            engine = bin("llorch-engine").display(),
            provisioner = bin("engine-provisioner").display(),
            slots = self.opts.slots,
            ctx = self.opts.ctx,
            embeddings = self.opts.embeddings,
            model = self.opts.model.clone().unwrap_or_else(model_path).display(),
            extra = self.opts.extra_node_toml,
            node_keys = self.opts.node_keys,
            sha256 = if self.opts.model.is_some() {
                ""
            } else {
                "sha256 = \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\"\n"
            },
        )
    }

    pub fn start_node(&mut self) {
        let config = self.dir.path().join("node.toml");
        std::fs::write(&config, self.node_config()).expect("write node config");
        let log = self.dir.path().join("logs/pool-managerd.log");
        let child = Command::new(bin("pool-managerd"))
            .arg("--config")
            .arg(&config)
            .envs(self.opts.node_env.iter().map(|(k, v)| (k, v)))
            .env("LLORCH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn pool-managerd");
        self.node = Some(Daemon { child, log });
    }

    /// Waits until orchestratord reports the pool ready with every slot free.
    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            for d in [&mut self.orch, &mut self.node].into_iter().flatten() {
                if let Ok(Some(status)) = d.child.try_wait() {
                    panic!(
                        "{} exited with {status}:\n{}",
                        d.log.display(),
                        d.log_text()
                    );
                }
            }
            if let Some(p) = self.pools_blocking() {
                if p.pools
                    .iter()
                    .any(|p| p.state == PoolState::Ready && p.slots_busy == 0)
                {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "no pool ready after 120 s\norchestratord:\n{}\npool-managerd:\n{}",
                self.orch.as_ref().map(Daemon::log_text).unwrap_or_default(),
                self.node.as_ref().map(Daemon::log_text).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /v2/pools` from a plain thread (the tests' own runtimes stay free).
    pub fn pools_blocking(&self) -> Option<PoolsAnswer> {
        let client = self.client();
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .ok()?
                    .block_on(client.get_json::<PoolsAnswer>("/v2/pools"))
                    .ok()
            })
            .join()
            .ok()
            .flatten()
        })
    }

    /// The node API's Unix socket.
    pub fn node_socket(&self) -> PathBuf {
        self.runtime().join("pool-managerd.sock")
    }

    /// The engine's handoff file, when the pool is ready.
    pub fn handoff(&self) -> Option<Handoff> {
        let text =
            std::fs::read_to_string(self.runtime().join("handoff/default/default.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until the engine itself generates nothing (its own slots, not orchestratord's
    /// leases): what a client that went away must lead to within a decode step.
    pub async fn wait_engine_idle(&self, limit: Duration) {
        let engine = crate::UnixClient::new(self.handoff().expect("handoff").socket);
        let e = &engine;
        crate::wait_until(
            "the engine to stop generating for a client that went away",
            limit,
            || async move {
                let status = e.slots().await.unwrap();
                (status.busy == 0)
                    .then_some(())
                    .ok_or(format!("{status:?}"))
            },
        )
        .await;
    }

    /// Posts a streamed request whose events are named (`event: NAME`, the data's `type`),
    /// reads until the event `until` arrived while the engine generates, then goes away and
    /// waits for the engine to stop: the slot of a client that left is free within a decode
    /// step. Returns the names of the events read.
    pub async fn stream_then_go_away(
        &self,
        path: &str,
        body: serde_json::Value,
        until: &str,
    ) -> Vec<String> {
        let c = self.client();
        let resp = c
            .post_raw(path, serde_json::to_vec(&body).unwrap(), &[])
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let mut s = llorch_client::EventStream::from_response(resp, Path::new("s"))
            .await
            .unwrap();
        let mut names = Vec::new();
        while !names.iter().any(|n| n == until) {
            let frame = s.next_frame().await.unwrap().expect("the stream goes on");
            let data: serde_json::Value = serde_json::from_str(&frame.data).unwrap();
            assert_eq!(data["type"], frame.event.as_str(), "{frame:?}");
            names.push(frame.event);
        }
        let engine = crate::UnixClient::new(self.handoff().expect("handoff").socket);
        assert_eq!(
            engine.slots().await.unwrap().busy,
            1,
            "the engine generates"
        );
        drop(s);
        self.wait_engine_idle(Duration::from_secs(2)).await;
        names
    }

    /// Runs a script of `tests/python/` against this stack (`URL KEY MODEL` and `args`) with
    /// the official clients `scripts/setup.sh` installed; returns its stdout, failing with both
    /// outputs and the stack's logs unless it succeeds and prints `ok_line`.
    pub fn python(&self, script: &str, args: &[&str], ok_line: &str) -> String {
        let path = crate::repo_root().join("tests/python").join(script);
        let out = Command::new("python3")
            .arg(&path)
            .args([self.url().as_str(), TEST_KEY, MODEL_ID])
            .args(args)
            .env("PYTHONPATH", crate::python_path())
            .output()
            .expect("run python3");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && stdout.contains(ok_line),
            "{script} failed\n{stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        stdout
    }

    /// Fails unless orchestratord recorded a finished task under the `api` label (its
    /// journal line of the task).
    pub fn assert_recorded(&self, api: &str) {
        let logs = self.logs();
        assert!(
            logs.contains(&format!("api=\"{api}\"")) || logs.contains(&format!("api={api}")),
            "no task record with api={api}:\n{logs}"
        );
    }

    pub fn logs(&self) -> String {
        format!(
            "orchestratord:\n{}\npool-managerd:\n{}",
            self.orch.as_ref().map(Daemon::log_text).unwrap_or_default(),
            self.node.as_ref().map(Daemon::log_text).unwrap_or_default()
        )
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.node.take();
        self.orch.take();
    }
}

/// Whether `path` exists, for assertions that read well.
pub fn exists(path: &Path) -> bool {
    path.exists()
}
