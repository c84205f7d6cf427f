//! Starting and stopping a pool's provisioner and engine, behind one small trait so that the
//! supervisor does not care how processes are started. [`ProcessLauncher`] runs them as child
//! processes (`llorch up`, development); [`systemd::SystemdLauncher`] starts their template
//! units over D-Bus when pool-managerd runs under systemd.
//!
//! This module owns process start, stop and exit reporting; it does not decide when to restart
//! (the supervisor does) and does not watch handoff files (the handoff watcher does).

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::config::{PoolConfig, RuntimeLayout};

pub mod systemd;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long an engine may drain after SIGTERM before it is killed. The engine's own grace for
/// in-flight requests is 10 s, so this leaves it time to finish them and remove its handoff.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// Lines of a log kept in an error message.
const TAIL_LINES: usize = 6;

/// What an engine may use on top of its model and KV cache: llama.cpp's compute buffers, the
/// runtime, and headroom (the default model measured 104 MiB of compute buffer for 4 × 1024
/// tokens).
pub const MEMORY_MARGIN: u64 = 512 << 20;

/// The memory bound of a pool's engine, in bytes: the operator's `memory_max_mib`, or the
/// model file plus the f16 KV cache of every slot (`kv_per_token` from the GGUF header), a
/// quarter more, and [`MEMORY_MARGIN`]. None: no bound (`memory_max_mib = 0`, or the header
/// does not say how large the cache is).
pub fn engine_memory_bound(
    pool: &PoolConfig,
    model_bytes: u64,
    kv_per_token: Option<u64>,
) -> Option<u64> {
    match pool.memory_max_mib {
        Some(0) => return None,
        Some(mib) => return Some(mib.saturating_mul(1 << 20)),
        None => {}
    }
    let tokens = u64::from(pool.slots) * u64::from(pool.ctx);
    let need = model_bytes.saturating_add(kv_per_token?.saturating_mul(tokens));
    Some(need.saturating_add(need / 4).saturating_add(MEMORY_MARGIN))
}

/// The provisioner's flags that come from the pool's settings, the same for both launchers:
/// offload, pinned hash, threads, idle exit, and for a GPU pool its GPUs' free memory now
/// (`gpu_free`, bytes, empty when unknown) and `gpu_only`.
pub fn plan_flags(pool: &PoolConfig, gpu_free: &[u64]) -> Vec<String> {
    let mut flags = vec!["--gpu-layers".to_string(), pool.gpu_layers().to_string()];
    if let Some(h) = &pool.model.sha256 {
        flags.extend(["--sha256".into(), h.clone()]);
    }
    if let Some(t) = pool.threads {
        flags.extend(["--threads".into(), t.to_string()]);
    }
    if let Some(s) = pool.idle_exit_secs() {
        flags.extend(["--idle-exit-secs".into(), s.to_string()]);
    }
    if !gpu_free.is_empty() {
        let mib: Vec<String> = gpu_free.iter().map(|b| (b >> 20).to_string()).collect();
        flags.extend(["--gpu-free-mib".into(), mib.join(",")]);
    }
    if pool.gpu_only {
        flags.push("--gpu-only".into());
    }
    flags
}

/// Starts a pool's provisioner and engine.
pub trait Launcher: Send + Sync {
    /// Stages the pool's model and writes its engine plan; returns the plan's path.
    /// `gpu_free`: [`plan_flags`].
    fn provision<'a>(
        &'a self,
        pool: &'a PoolConfig,
        gpu_free: &'a [u64],
    ) -> BoxFuture<'a, Result<PathBuf, LaunchError>>;

    /// Starts the pool's engine from its plan. The engine writes its handoff file when ready.
    fn start_engine<'a>(
        &'a self,
        pool: &'a PoolConfig,
        plan: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn EngineHandle>, LaunchError>>;

    /// Whether `pid` is this pool's engine and still runs (so its handoff file is not stale).
    fn engine_running<'a>(&'a self, pool: &'a PoolConfig, pid: u32) -> BoxFuture<'a, bool>;

    /// On-demand pools: makes the engine socket listen without an engine (so a request can
    /// connect and wait), and returns its path.
    fn listen_on_demand<'a>(
        &'a self,
        pool: &'a PoolConfig,
    ) -> BoxFuture<'a, Result<PathBuf, LaunchError>>;

    /// On-demand pools: returns once the engine should start: a connection waits on the
    /// socket, or the socket's owner started the engine already (socket activation).
    fn wait_activation<'a>(
        &'a self,
        pool: &'a PoolConfig,
    ) -> BoxFuture<'a, Result<(), LaunchError>>;

    /// On-demand pools: stops listening (the pool is removed or the node stops).
    fn close_on_demand<'a>(&'a self, pool: &'a PoolConfig) -> BoxFuture<'a, ()>;
}

/// A started engine. Dropping the handle kills the engine, so no path leaves an orphan.
pub trait EngineHandle: Send {
    /// The engine's process id while it runs.
    fn pid(&self) -> Option<u32>;

    /// Waits until the engine exits. Cancel safe: dropping the future and calling again is fine.
    fn wait(&mut self) -> BoxFuture<'_, EngineExit>;

    /// Asks the engine to stop (SIGTERM: it drains and removes its handoff file), and kills it
    /// when it has not exited after `grace`.
    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, EngineExit>;

    /// Like [`EngineHandle::stop`], but the pool's socket keeps listening where the launcher
    /// owns one apart from the engine (a systemd socket unit), so connections made meanwhile
    /// wait for the next engine (an operator's `Unload` or `Restart`).
    fn stop_keeping_socket(&mut self, grace: Duration) -> BoxFuture<'_, EngineExit> {
        self.stop(grace)
    }
}

/// How an engine (or provisioner) process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The last lines of the process's log, for the operator.
    pub log_tail: String,
}

impl EngineExit {
    pub fn from_status(status: ExitStatus, log_tail: String) -> Self {
        use std::os::unix::process::ExitStatusExt;
        Self {
            code: status.code(),
            signal: status.signal(),
            log_tail,
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// `exited with code 70` or `killed by signal 9 (SIGKILL)`.
    pub fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(s)) => format!("killed by signal {s}{}", signal_name(s)),
            (None, None) => "ended in an unknown way".into(),
        }
    }
}

impl std::fmt::Display for EngineExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())?;
        if !self.log_tail.is_empty() {
            write!(f, "; last log lines: {}", self.log_tail)?;
        }
        Ok(())
    }
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGINT => " (SIGINT)",
        libc::SIGBUS => " (SIGBUS)",
        _ => "",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot start {}: {source} (set node.{key} in the configuration, or put it on PATH)", bin.display())]
    Spawn {
        bin: PathBuf,
        key: &'static str,
        source: std::io::Error,
    },
    #[error("cannot prepare {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("engine-provisioner {exit} (log: {})", log.display())]
    Provision { exit: EngineExit, log: PathBuf },
    #[error("systemd refused or failed {unit}: {reason} (are the units of systemd/ installed, and the polkit rule?)")]
    Systemd { unit: String, reason: String },
}

/// Runs `engine-provisioner` and `llorch-engine` as child processes. For on-demand pools it
/// does what systemd's socket units do: it holds each engine's listening socket, starts the
/// engine when a connection waits there, and passes the socket on (`LISTEN_FDS`).
#[derive(Debug)]
pub struct ProcessLauncher {
    pub engine_bin: PathBuf,
    pub provisioner_bin: PathBuf,
    pub cache_dir: PathBuf,
    pub layout: RuntimeLayout,
    /// Listening sockets of on-demand pools, by pool id.
    sockets: Mutex<HashMap<String, Arc<UnixListener>>>,
}

impl ProcessLauncher {
    pub fn new(
        engine_bin: Option<PathBuf>,
        provisioner_bin: Option<PathBuf>,
        cache_dir: PathBuf,
        layout: RuntimeLayout,
    ) -> Self {
        Self {
            engine_bin: engine_bin.unwrap_or_else(|| sibling_binary("llorch-engine")),
            provisioner_bin: provisioner_bin
                .unwrap_or_else(|| sibling_binary("engine-provisioner")),
            cache_dir,
            layout,
            sockets: Mutex::new(HashMap::new()),
        }
    }

    fn held_socket(&self, pool: &str) -> Option<Arc<UnixListener>> {
        self.sockets
            .lock()
            .expect("socket table lock")
            .get(pool)
            .cloned()
    }

    fn log_file(&self, path: &Path) -> Result<std::fs::File, LaunchError> {
        let io = |source| LaunchError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        // Each attempt starts a fresh log, so its tail describes this attempt only.
        std::fs::File::create(path).map_err(io)
    }
}

/// `name` next to the current executable, else `name` from `PATH`.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

impl Launcher for ProcessLauncher {
    fn listen_on_demand<'a>(
        &'a self,
        pool: &'a PoolConfig,
    ) -> BoxFuture<'a, Result<PathBuf, LaunchError>> {
        Box::pin(async move {
            let path = self.layout.engine_socket(&pool.id);
            if self.held_socket(&pool.id).is_some() {
                return Ok(path);
            }
            let io = |source| LaunchError::Io {
                path: path.clone(),
                source,
            };
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            let listener = llorch_os::bind_unix(&path).map_err(|e| LaunchError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            listener.set_nonblocking(true).map_err(io)?;
            self.sockets
                .lock()
                .expect("socket table lock")
                .insert(pool.id.clone(), Arc::new(listener));
            Ok(path)
        })
    }

    fn wait_activation<'a>(
        &'a self,
        pool: &'a PoolConfig,
    ) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(async move {
            let path = self.layout.engine_socket(&pool.id);
            let io = |source| LaunchError::Io {
                path: path.clone(),
                source,
            };
            let Some(listener) = self.held_socket(&pool.id) else {
                return Err(io(std::io::Error::other("the pool's socket is not held")));
            };
            // The engine accepts on the socket meanwhile; nobody else watches it.
            llorch_os::process::wait_for_connection(&listener)
                .await
                .map_err(io)
        })
    }

    fn close_on_demand<'a>(&'a self, pool: &'a PoolConfig) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let held = self
                .sockets
                .lock()
                .expect("socket table lock")
                .remove(&pool.id);
            if held.is_some() {
                let _ = std::fs::remove_file(self.layout.engine_socket(&pool.id));
            }
        })
    }

    fn provision<'a>(
        &'a self,
        pool: &'a PoolConfig,
        gpu_free: &'a [u64],
    ) -> BoxFuture<'a, Result<PathBuf, LaunchError>> {
        Box::pin(async move {
            let plan = self.layout.plan_file(&pool.id);
            let log_path = self.layout.provision_log(&pool.id);
            let log = self.log_file(&log_path)?;
            let log_out = log.try_clone().map_err(|source| LaunchError::Io {
                path: log_path.clone(),
                source,
            })?;
            let mut cmd = Command::new(&self.provisioner_bin);
            cmd.arg("plan")
                .arg("--source")
                .arg(&pool.model.source)
                .arg("--model-id")
                .arg(&pool.model.id)
                .arg("--cache")
                .arg(&self.cache_dir)
                .arg("--pool")
                .arg(&pool.id)
                .arg("--slots")
                .arg(pool.slots.to_string())
                .arg("--ctx")
                .arg(pool.ctx.to_string())
                .args(plan_flags(pool, gpu_free))
                .arg("--socket")
                .arg(self.layout.engine_socket(&pool.id))
                .arg("--handoff-dir")
                .arg(self.layout.pool_handoff_dir(&pool.id))
                .arg("--out")
                .arg(&plan);
            cmd.stdin(Stdio::null())
                .stdout(log_out)
                .stderr(log)
                .env("NO_COLOR", "1")
                .kill_on_drop(true);
            llorch_os::process::die_with_parent(cmd.as_std_mut(), libc::SIGKILL);
            let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
                bin: self.provisioner_bin.clone(),
                key: "provisioner_bin",
                source,
            })?;
            let status = child.wait().await.map_err(|source| LaunchError::Io {
                path: self.provisioner_bin.clone(),
                source,
            })?;
            if status.success() {
                Ok(plan)
            } else {
                Err(LaunchError::Provision {
                    exit: EngineExit::from_status(status, log_tail(&log_path)),
                    log: log_path,
                })
            }
        })
    }

    fn engine_running<'a>(&'a self, _pool: &'a PoolConfig, pid: u32) -> BoxFuture<'a, bool> {
        // Engines are our children (or were a killed predecessor's): the process table knows.
        Box::pin(async move { Path::new(&format!("/proc/{pid}")).exists() })
    }

    fn start_engine<'a>(
        &'a self,
        pool: &'a PoolConfig,
        plan: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn EngineHandle>, LaunchError>> {
        Box::pin(async move {
            let log_path = self.layout.engine_log(&pool.id);
            let log = self.log_file(&log_path)?;
            let log_out = log.try_clone().map_err(|source| LaunchError::Io {
                path: log_path.clone(),
                source,
            })?;
            let mut cmd = Command::new(&self.engine_bin);
            cmd.arg("--plan")
                .arg(plan)
                .stdin(Stdio::null())
                .stdout(log_out)
                .stderr(log)
                .env("NO_COLOR", "1")
                .kill_on_drop(true);
            llorch_os::process::without_service_manager(cmd.as_std_mut());
            if let Some(devices) = pool.cuda_visible_devices() {
                cmd.env("CUDA_VISIBLE_DEVICES", devices);
            }
            let held = self.held_socket(&pool.id);
            if let Some(listener) = &held {
                llorch_os::process::pass_listener(cmd.as_std_mut(), listener, "engine");
            }
            // SIGTERM, not SIGKILL: an engine whose parent died drains and removes its handoff.
            llorch_os::process::die_with_parent(cmd.as_std_mut(), libc::SIGTERM);
            let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
                bin: self.engine_bin.clone(),
                key: "engine_bin",
                source,
            })?;
            Ok(Box::new(ChildEngine {
                child,
                log: log_path,
                exited: None,
            }) as Box<dyn EngineHandle>)
        })
    }
}

/// An engine running as our child process. `kill_on_drop` kills it if the handle is dropped.
struct ChildEngine {
    child: Child,
    log: PathBuf,
    exited: Option<EngineExit>,
}

impl ChildEngine {
    async fn reap(&mut self) -> EngineExit {
        if let Some(e) = &self.exited {
            return e.clone();
        }
        let exit = match self.child.wait().await {
            Ok(status) => EngineExit::from_status(status, log_tail(&self.log)),
            Err(e) => EngineExit {
                code: None,
                signal: None,
                log_tail: format!("cannot wait for the engine: {e}"),
            },
        };
        self.exited = Some(exit.clone());
        exit
    }
}

impl EngineHandle for ChildEngine {
    fn pid(&self) -> Option<u32> {
        if self.exited.is_some() {
            None
        } else {
            self.child.id()
        }
    }

    fn wait(&mut self) -> BoxFuture<'_, EngineExit> {
        Box::pin(self.reap())
    }

    fn stop(&mut self, grace: Duration) -> BoxFuture<'_, EngineExit> {
        Box::pin(async move {
            // `id()` is None once the child was reaped, so a recycled pid is never signalled.
            if let (None, Some(pid)) = (&self.exited, self.child.id()) {
                // Our own child, which has not been reaped yet.
                llorch_os::process::terminate_child(pid);
            }
            match tokio::time::timeout(grace, self.reap()).await {
                Ok(exit) => exit,
                Err(_) => {
                    tracing::warn!(
                        pid = self.child.id(),
                        grace_secs = grace.as_secs(),
                        "Engine did not stop after SIGTERM; killing it."
                    );
                    let _ = self.child.start_kill();
                    self.reap().await
                }
            }
        })
    }
}

/// The last lines of a log file, joined with ` | `, read from its last 8 KiB.
pub fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(8192)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(TAIL_LINES);
    strip_ansi(&lines[start..].join(" | "))
}

/// Removes ANSI colour sequences (`ESC [ ... m`), in case a child coloured its log anyway.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_is_bounded_by_its_model_its_cache_and_a_margin() {
        let pool = |extra: &str| -> PoolConfig {
            toml::from_str(&format!(
                "id = \"p\"\nslots = 4\nctx = 1024\n{extra}\n[model]\nid = \"m\"\nsource = \"/m.gguf\"\n"
            ))
            .unwrap()
        };
        const MIB: u64 = 1 << 20;
        // The default model (98 MB file, 23,040 KV bytes a token) on 4 slots of 1024 tokens:
        // llama.cpp measured 92 MiB of weights, 90 MiB of KV cache and 104 MiB of compute
        // buffer; the bound leaves room for that and the runtime.
        let b = engine_memory_bound(&pool(""), 98_000_000, Some(23_040)).unwrap();
        let need = 98_000_000 + 90 * MIB;
        assert_eq!(b, need + need / 4 + MEMORY_MARGIN);
        assert!(b > 92 * MIB + 90 * MIB + 104 * MIB + 128 * MIB, "{b}");
        // The operator's value wins; 0 means none; an unreadable header means none.
        assert_eq!(
            engine_memory_bound(&pool("memory_max_mib = 2048"), 98_000_000, Some(1)),
            Some(2048 * MIB)
        );
        assert_eq!(
            engine_memory_bound(&pool("memory_max_mib = 0"), 1, Some(1)),
            None
        );
        assert_eq!(engine_memory_bound(&pool(""), 98_000_000, None), None);
        // Nothing overflows.
        assert_eq!(
            engine_memory_bound(&pool(""), u64::MAX, Some(u64::MAX)),
            Some(u64::MAX)
        );
    }

    #[test]
    fn tails_keep_the_last_lines_without_colours() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        let text: String = (0..20).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, format!("{text}\u{1b}[31mERROR\u{1b}[0m boom\n\n")).unwrap();
        assert_eq!(
            log_tail(&p),
            "line 15 | line 16 | line 17 | line 18 | line 19 | ERROR boom"
        );
        assert_eq!(log_tail(&dir.path().join("missing.log")), "");
    }

    #[test]
    fn exits_are_described() {
        let e = EngineExit {
            code: None,
            signal: Some(9),
            log_tail: "loaded".into(),
        };
        assert_eq!(
            e.to_string(),
            "killed by signal 9 (SIGKILL); last log lines: loaded"
        );
        let e = EngineExit {
            code: Some(70),
            signal: None,
            log_tail: String::new(),
        };
        assert_eq!(e.to_string(), "exited with code 70");
    }
}
