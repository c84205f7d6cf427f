//! The child-process launcher: `engine-provisioner` and `llorch-engine` run as children of
//! pool-managerd (`llorch up`, development), die with it (`PR_SET_PDEATHSIG`), and log to files
//! under the runtime directory whose last lines describe a failed start.

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{plan_flags, BoxFuture, EngineExit, EngineHandle, LaunchError, Launcher};
use crate::config::{PoolConfig, RuntimeLayout};

/// Lines of a log kept in an error message.
const TAIL_LINES: usize = 6;

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
        llorch_os::sync::lock(&self.sockets).get(pool).cloned()
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
            llorch_os::sync::lock(&self.sockets).insert(pool.id.clone(), Arc::new(listener));
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
            let held = llorch_os::sync::lock(&self.sockets).remove(&pool.id);
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

/// Removes ANSI escape sequences (colours, cursor moves, titles), in case a child coloured its
/// log anyway: the tail goes into a pool's `last_error`, which other tools print.
fn strip_ansi(s: &str) -> String {
    strip_ansi_escapes::strip_str(s)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
