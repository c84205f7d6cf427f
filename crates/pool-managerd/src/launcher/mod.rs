//! Starting and stopping a pool's provisioner and engine, behind one small trait so that the
//! supervisor does not care how processes are started. [`ProcessLauncher`] runs them as child
//! processes (`llorch up`, development); [`systemd::SystemdLauncher`] starts their template
//! units over D-Bus when pool-managerd runs under systemd.
//!
//! This module owns process start, stop and exit reporting; it does not decide when to restart
//! (the supervisor does) and does not watch handoff files (the handoff watcher does).
//!
//! Files: this one holds the [`Launcher`] and [`EngineHandle`] traits and what both launchers
//! share (exits, errors, the provisioner's flags, the engine's memory bound); `process.rs` the
//! child-process launcher; `systemd/` the systemd launcher and its D-Bus proxies.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitStatus;
use std::time::Duration;

use crate::config::PoolConfig;

mod process;
pub mod systemd;

pub use process::{log_tail, sibling_binary, ProcessLauncher};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long an engine may drain after SIGTERM before it is killed. The engine's own grace for
/// in-flight requests is 10 s, so this leaves it time to finish them and remove its handoff.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// What an engine may use on top of its model and KV cache: llama.cpp's compute buffers, the
/// runtime, and headroom (the default model measured 104 MiB of compute buffer for 4 × 1024
/// tokens).
pub const MEMORY_MARGIN: u64 = 512 << 20;

/// The memory bound of a pool's engine, in bytes: the operator's `memory_max_mib`, or the
/// model file plus the f16 KV cache of every slot (`kv_per_token` from the GGUF header), a
/// quarter more, and [`MEMORY_MARGIN`]. None: no bound (`memory_max_mib = 0`, or the header
/// does not say how large the cache is). The host prefix cache (`prefix_cache_bytes`, from the
/// plan) is added, with one slot's KV for the state being saved while the cache is full.
pub fn engine_memory_bound(
    pool: &PoolConfig,
    model_bytes: u64,
    kv_per_token: Option<u64>,
    prefix_cache_bytes: u64,
) -> Option<u64> {
    match pool.memory_max_mib {
        Some(0) => return None,
        Some(mib) => return Some(mib.saturating_mul(1 << 20)),
        None => {}
    }
    // The embedding context holds one more slot's worth of KV.
    let tokens = (u64::from(pool.slots) + u64::from(pool.embeddings)) * u64::from(pool.ctx);
    let kv = kv_per_token?;
    let need = model_bytes.saturating_add(kv.saturating_mul(tokens));
    let cache = match prefix_cache_bytes {
        0 => 0,
        b => b.saturating_add(kv.saturating_mul(u64::from(pool.ctx))),
    };
    let need = need.saturating_add(cache);
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
    if pool.model.allow_http {
        flags.push("--allow-http".into());
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
    if pool.embeddings {
        flags.push("--embeddings".into());
    }
    flags.extend([
        "--prefix-cache-mib".into(),
        pool.prefix_cache_mib().to_string(),
    ]);
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
        let b = engine_memory_bound(&pool(""), 98_000_000, Some(23_040), 0).unwrap();
        let need = 98_000_000 + 90 * MIB;
        assert_eq!(b, need + need / 4 + MEMORY_MARGIN);
        assert!(b > 92 * MIB + 90 * MIB + 104 * MIB + 128 * MIB, "{b}");
        // A host prefix cache is counted, with one slot's KV for a state being saved.
        let with_cache =
            engine_memory_bound(&pool(""), 98_000_000, Some(23_040), 256 * MIB).unwrap();
        let need = need + 256 * MIB + 23_040 * 1024;
        assert_eq!(with_cache, need + need / 4 + MEMORY_MARGIN);
        // The operator's value wins; 0 means none; an unreadable header means none.
        assert_eq!(
            engine_memory_bound(&pool("memory_max_mib = 2048"), 98_000_000, Some(1), 0),
            Some(2048 * MIB)
        );
        assert_eq!(
            engine_memory_bound(&pool("memory_max_mib = 0"), 1, Some(1), 0),
            None
        );
        assert_eq!(engine_memory_bound(&pool(""), 98_000_000, None, 0), None);
        // Nothing overflows.
        assert_eq!(
            engine_memory_bound(&pool(""), u64::MAX, Some(u64::MAX), u64::MAX),
            Some(u64::MAX)
        );
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
