//! The systemd launcher: a pool's provisioner and engine are the template units
//! `engine-provisioner@<pool>.service` and `llorch-engine@<pool>.service` (with its socket),
//! started and stopped through systemd's D-Bus API (`org.freedesktop.systemd1`), and followed
//! through its signals. pool-managerd writes each pool's settings to
//! `/run/llama-orch/pools/<pool>.env`, which the provisioner template reads.
//!
//! systemd owns the processes: it restarts a crashed engine itself (`Restart=on-failure`);
//! the handle reports the exit so the supervisor records it, and the supervisor's next start
//! joins systemd's restart instead of starting a second engine. pool-managerd runs
//! unprivileged; `systemd/llama-orch.polkit.rules` lets its user manage only these units.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use zbus::zvariant::OwnedObjectPath;

use self::proxies::{JobProxy, ManagerProxy, ServiceProxy, UnitProxy};
use super::{BoxFuture, EngineExit, EngineHandle, LaunchError, Launcher};
use crate::config::{PoolConfig, RuntimeLayout};

mod proxies;

/// How long a job wait goes without systemd's `JobRemoved` signal before it asks whether the
/// job still exists: a lost signal (a bus hiccup, a reconnect) must not hang a pool for good,
/// and a job that legitimately takes long (a large download) must not be cut short.
pub const JOB_CHECK_EVERY: Duration = Duration::from_secs(30);

/// Where the templates expect a pool's settings.
pub const POOL_ENV_DIR: &str = "/run/llama-orch/pools";

/// The paths the template units use; a node configured otherwise is told at start.
pub const UNIT_RUNTIME_DIR: &str = "/run/llama-orch";
pub const UNIT_CACHE_DIR: &str = "/var/cache/llama-orch/models";

pub fn provisioner_unit(pool: &str) -> String {
    format!("engine-provisioner@{pool}.service")
}

pub fn engine_unit(pool: &str) -> String {
    format!("llorch-engine@{pool}.service")
}

pub fn engine_socket_unit(pool: &str) -> String {
    format!("llorch-engine@{pool}.socket")
}

/// The pool's settings file: `KEY="value"` lines systemd's `EnvironmentFile=` reads.
pub fn pool_env(pool: &PoolConfig, gpu_free: &[u64]) -> String {
    let quote = |v: &str| format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""));
    let extra = super::plan_flags(pool, gpu_free);
    format!(
        "# Written by pool-managerd for engine-provisioner@{id}.service; do not edit.\n\
         LLORCH_MODEL_SOURCE={}\nLLORCH_MODEL_ID={}\nLLORCH_SLOTS={}\nLLORCH_CTX={}\nLLORCH_PLAN_ARGS={}\n",
        quote(&pool.model.source),
        quote(&pool.model.id),
        pool.slots,
        pool.ctx,
        quote(&extra.join(" ")),
        id = pool.id,
    )
}

fn dbus(unit: &str, e: zbus::Error) -> LaunchError {
    LaunchError::Systemd {
        unit: unit.to_string(),
        reason: e.to_string(),
    }
}

pub struct SystemdLauncher {
    conn: zbus::Connection,
    layout: RuntimeLayout,
}

impl SystemdLauncher {
    /// Connects to the system bus and subscribes to systemd's signals.
    pub async fn connect(layout: RuntimeLayout) -> Result<Self, LaunchError> {
        let conn = zbus::Connection::system()
            .await
            .map_err(|e| dbus("the system bus", e))?;
        let manager = ManagerProxy::new(&conn)
            .await
            .map_err(|e| dbus("org.freedesktop.systemd1", e))?;
        manager
            .subscribe()
            .await
            .map_err(|e| dbus("org.freedesktop.systemd1", e))?;
        Ok(Self { conn, layout })
    }

    /// Sets the engine unit's `MemoryMax=` (a runtime property, until reboot) from the pool's
    /// plan (model size and KV bytes a token, which the provisioner read from the header),
    /// before any start of the engine (by pool-managerd or by socket activation). A bound that
    /// cannot be set is logged and the pool goes on without one.
    async fn bound_memory(&self, pool: &PoolConfig, plan: &Path) {
        let unit = engine_unit(&pool.id);
        let bound = llorch_os::fs::read_untrusted(plan, llorch_wire::plan::MAX_PLAN_BYTES)
            .ok()
            .and_then(|b| serde_json::from_slice::<llorch_wire::plan::EnginePlan>(&b).ok())
            .and_then(|plan| {
                super::engine_memory_bound(
                    pool,
                    plan.model.size_bytes,
                    plan.model.kv_bytes_per_token,
                    plan.prefix_cache_mib.unwrap_or(0).saturating_mul(1 << 20),
                )
            });
        if bound.is_none() && pool.memory_max_mib != Some(0) {
            tracing::warn!(pool_id = %pool.id, "Cannot size the engine's memory bound from its model; it runs without one (set memory_max_mib).");
        }
        // u64::MAX is `infinity`: it also lifts a bound set before.
        let value = bound.unwrap_or(u64::MAX);
        let set = async {
            self.manager()
                .await
                .map_err(|e| e.to_string())?
                .set_unit_properties(&unit, true, &[("MemoryMax", value.into())])
                .await
                .map_err(|e| e.to_string())
        };
        match set.await {
            Ok(()) => {
                tracing::info!(pool_id = %pool.id, unit = %unit, bytes = bound, "Engine memory bound set.")
            }
            Err(e) => {
                tracing::warn!(pool_id = %pool.id, unit = %unit, error = %e, "Cannot set the engine's memory bound; it runs without one.")
            }
        }
    }

    async fn manager(&self) -> Result<ManagerProxy<'static>, LaunchError> {
        ManagerProxy::new(&self.conn)
            .await
            .map_err(|e| dbus("org.freedesktop.systemd1", e))
    }

    /// Runs `call` (which queues a job for `unit`) and waits for that job's result.
    async fn job(&self, unit: &str, verb: &str) -> Result<String, LaunchError> {
        let manager = self.manager().await?;
        // Listen before asking, so the job's end cannot be missed.
        let mut removed = manager
            .receive_job_removed()
            .await
            .map_err(|e| dbus(unit, e))?;
        let job = match verb {
            "start" => manager.start_unit(unit, "replace").await,
            "stop" => manager.stop_unit(unit, "replace").await,
            _ => manager.restart_unit(unit, "replace").await,
        }
        .map_err(|e| dbus(unit, e))?;
        loop {
            let signal = match tokio::time::timeout(JOB_CHECK_EVERY, removed.next()).await {
                Ok(Some(signal)) => signal,
                Ok(None) => break,
                Err(_) => {
                    // No news for a while: if the job is still queued or running, keep
                    // waiting; if it is gone, its signal was missed, and the unit's state
                    // says how it ended.
                    let still_there = match JobProxy::builder(&self.conn).path(job.clone()) {
                        Ok(b) => match b.build().await {
                            Ok(p) => p.state().await.is_ok(),
                            Err(_) => false,
                        },
                        Err(_) => false,
                    };
                    if still_there {
                        continue;
                    }
                    let state = self
                        .unit(unit)
                        .await?
                        .active_state()
                        .await
                        .unwrap_or_default();
                    tracing::warn!(unit, state = %state, "A systemd job ended without its signal; took the unit's state.");
                    return Ok(if state == "active" { "done" } else { "failed" }.to_string());
                }
            };
            let Ok(args) = signal.args() else { continue };
            if args.job == job {
                return Ok(args.result);
            }
        }
        Err(LaunchError::Systemd {
            unit: unit.into(),
            reason: "the signal stream from systemd ended".into(),
        })
    }

    /// The unit's object path (loading the unit if systemd has not yet).
    async fn unit_path(&self, unit: &str) -> Result<OwnedObjectPath, LaunchError> {
        self.manager()
            .await?
            .load_unit(unit)
            .await
            .map_err(|e| dbus(unit, e))
    }

    async fn service(
        &self,
        unit: &str,
    ) -> Result<(UnitProxy<'static>, ServiceProxy<'static>), LaunchError> {
        let path = self.unit_path(unit).await?;
        Ok((
            self.proxy_at(unit, path.clone()).await?,
            self.proxy_at(unit, path).await?,
        ))
    }

    /// The unit's `org.freedesktop.systemd1.Unit` interface (a socket unit has no Service).
    async fn unit(&self, unit: &str) -> Result<UnitProxy<'static>, LaunchError> {
        let path = self.unit_path(unit).await?;
        self.proxy_at(unit, path).await
    }

    /// A proxy of one interface of `unit`'s object at `path`, reading properties fresh each
    /// time (systemd's are not worth caching, and a cache would need its signals).
    async fn proxy_at<P>(&self, unit: &str, path: OwnedObjectPath) -> Result<P, LaunchError>
    where
        P: From<zbus::Proxy<'static>> + zbus::proxy::Defaults,
    {
        zbus::proxy::Builder::<P>::new(&self.conn)
            .destination("org.freedesktop.systemd1")
            .and_then(|b| b.path(path))
            .map_err(|e| dbus(unit, e))?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(|e| dbus(unit, e))
    }
}

impl SystemdLauncher {
    /// A wake-up each time systemd announces a property change of the unit (its state, its
    /// main pid, ...), from the `PropertiesChanged` signals of its object. Never ends.
    async fn changes(&self, unit: &str) -> Result<BoxStream<'static, ()>, LaunchError> {
        let path = self.unit_path(unit).await?;
        let props: zbus::fdo::PropertiesProxy<'static> = self.proxy_at(unit, path).await?;
        let signals = props
            .receive_properties_changed()
            .await
            .map_err(|e| dbus(unit, e))?;
        Ok(signals
            .map(|_| ())
            .chain(futures_util::stream::pending())
            .boxed())
    }

    /// Clears a unit's `failed` state so it can start again. Only then: resetting an active
    /// unit would also reset its restart counter and start limit.
    async fn reset_if_failed(&self, unit: &str) -> Result<(), LaunchError> {
        if self
            .unit(unit)
            .await?
            .active_state()
            .await
            .is_ok_and(|s| s == "failed")
        {
            let _ = self.manager().await?.reset_failed_unit(unit).await;
        }
        Ok(())
    }
}

async fn exit_of(service: &ServiceProxy<'_>, unit: &str) -> EngineExit {
    // CLD_EXITED = 1, CLD_KILLED = 2, CLD_DUMPED = 3 (waitid(2)).
    let code = service.exec_main_code().await.unwrap_or(0);
    let status = service.exec_main_status().await.unwrap_or(0);
    let (code, signal) = match code {
        1 => (Some(status), None),
        2 | 3 => (None, Some(status)),
        _ => (None, None),
    };
    EngineExit {
        code,
        signal,
        log_tail: format!("see journalctl -u {unit}"),
    }
}

impl Launcher for SystemdLauncher {
    fn listen_on_demand<'a>(
        &'a self,
        pool: &'a PoolConfig,
    ) -> BoxFuture<'a, Result<PathBuf, LaunchError>> {
        Box::pin(async move {
            // The socket unit listens; systemd starts the engine unit on the first connection.
            // Either may have failed before (the engine unit's start limit stops its socket).
            let socket = engine_socket_unit(&pool.id);
            self.reset_if_failed(&engine_unit(&pool.id)).await?;
            self.reset_if_failed(&socket).await?;
            let result = self.job(&socket, "start").await?;
            if result != "done" {
                return Err(LaunchError::Systemd {
                    unit: socket,
                    reason: format!("the start job ended {result}"),
                });
            }
            Ok(self.layout.engine_socket(&pool.id))
        })
    }

    fn wait_activation<'a>(
        &'a self,
        pool: &'a PoolConfig,
    ) -> BoxFuture<'a, Result<(), LaunchError>> {
        Box::pin(async move {
            let unit = engine_unit(&pool.id);
            let socket = engine_socket_unit(&pool.id);
            let u = self.unit(&unit).await?;
            let s = self.unit(&socket).await?;
            let mut changes = self.changes(&unit).await?;
            let mut socket_changes = self.changes(&socket).await?;
            loop {
                // Socket activation shows as the engine unit leaving `inactive`.
                if u.active_state()
                    .await
                    .is_ok_and(|s| s == "activating" || s == "active")
                {
                    return Ok(());
                }
                // A socket unit that failed listens no more (systemd stops it when the engine
                // unit hits its start limit): say so, rather than wait for nothing.
                if s.active_state().await.is_ok_and(|s| s == "failed") {
                    let result = s.sub_state().await.unwrap_or_default();
                    return Err(LaunchError::Systemd {
                        unit: socket,
                        reason: format!(
                            "the socket unit failed ({result}); if the engine unit hit its start limit (StartLimitBurst= of llorch-engine@.service), loads come too often for the pool's keep_alive_secs"
                        ),
                    });
                }
                tokio::select! {
                    _ = changes.next() => {}
                    _ = socket_changes.next() => {}
                    // Signals are the fast path; this turn covers a missed one.
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    }

    fn close_on_demand<'a>(&'a self, pool: &'a PoolConfig) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let socket = engine_socket_unit(&pool.id);
            if let Err(e) = self.job(&socket, "stop").await {
                tracing::warn!(unit = %socket, error = %e, "Cannot stop the engine's socket unit.");
            }
        })
    }

    fn provision<'a>(
        &'a self,
        pool: &'a PoolConfig,
        gpu_free: &'a [u64],
    ) -> BoxFuture<'a, Result<PathBuf, LaunchError>> {
        Box::pin(async move {
            let env = Path::new(POOL_ENV_DIR).join(format!("{}.env", pool.id));
            std::fs::create_dir_all(POOL_ENV_DIR)
                .and_then(|()| std::fs::write(&env, pool_env(pool, gpu_free)))
                .map_err(|source| LaunchError::Io {
                    path: env.clone(),
                    source,
                })?;
            let unit = provisioner_unit(&pool.id);
            self.reset_if_failed(&unit).await?;
            // Restart: a one-shot that already ran (RemainAfterExit) runs again.
            let result = self.job(&unit, "restart").await?;
            if result == "done" {
                let plan = self.layout.plan_file(&pool.id);
                self.bound_memory(pool, &plan).await;
                return Ok(plan);
            }
            let (_, service) = self.service(&unit).await?;
            let mut exit = exit_of(&service, &unit).await;
            // The provisioner's own words, when it could say them (engine-provisioner writes
            // them next to the plan); a node agent cannot read the journal.
            let said = self.layout.plan_file(&pool.id).with_extension("json.error");
            if let Ok(bytes) = llorch_os::fs::read_untrusted(&said, 64 * 1024) {
                let text = String::from_utf8_lossy(&bytes);
                let text: String = text.trim().chars().take(600).collect();
                exit.log_tail = text;
            }
            Err(LaunchError::Provision {
                exit,
                log: PathBuf::from(format!("journalctl -u {unit}")),
            })
        })
    }

    fn engine_running<'a>(&'a self, pool: &'a PoolConfig, pid: u32) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let unit = engine_unit(&pool.id);
            let Ok((u, service)) = self.service(&unit).await else {
                return false;
            };
            let state = u.active_state().await.unwrap_or_default();
            service.main_pid().await.is_ok_and(|p| p == pid)
                && (state == "active" || state == "activating")
        })
    }

    fn start_engine<'a>(
        &'a self,
        pool: &'a PoolConfig,
        _plan: &'a Path,
    ) -> BoxFuture<'a, Result<Box<dyn EngineHandle>, LaunchError>> {
        Box::pin(async move {
            let unit = engine_unit(&pool.id);
            self.reset_if_failed(&unit).await?;
            let (u, service) = self.service(&unit).await?;
            let mut changes = self.changes(&unit).await?;
            // The job ends when the engine is ready (Type=notify) or failed; the handle is
            // wanted as soon as there is a process, so the pool shows `loading` meanwhile.
            let conn = self.conn.clone();
            let unit_name = unit.clone();
            let job = tokio::spawn(async move {
                let launcher = SystemdLauncher {
                    conn,
                    layout: RuntimeLayout::new(Path::new(UNIT_RUNTIME_DIR)),
                };
                launcher.job(&unit_name, "start").await
            });
            let pid = loop {
                // A running main process of a starting or started unit (not one that is still
                // stopping from before).
                let state = u.active_state().await.unwrap_or_default();
                if let Ok(pid) = service.main_pid().await {
                    if (state == "activating" || state == "active") && pid != 0 {
                        break pid;
                    }
                }
                if job.is_finished() {
                    match job.await {
                        Ok(Ok(r)) if r == "done" => {
                            let pid = service.main_pid().await.unwrap_or(0);
                            if pid != 0 {
                                break pid;
                            }
                            return Err(LaunchError::Systemd {
                                unit,
                                reason: "the unit started but has no running main process".into(),
                            });
                        }
                        Ok(Ok(r)) => {
                            return Err(LaunchError::Systemd {
                                unit,
                                reason: format!(
                                    "the start job ended {r}: {}",
                                    exit_of(&service, &engine_unit(&pool.id)).await
                                ),
                            })
                        }
                        Ok(Err(e)) => return Err(e),
                        Err(e) => {
                            return Err(LaunchError::Systemd {
                                unit,
                                reason: e.to_string(),
                            })
                        }
                    }
                }
                tokio::select! {
                    _ = changes.next() => {}
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            };
            let restarts = service.n_restarts().await.unwrap_or(0);
            Ok(Box::new(SystemdEngine {
                unit,
                pid,
                restarts,
                launcher: SystemdLauncher {
                    conn: self.conn.clone(),
                    layout: self.layout.clone(),
                },
                unit_proxy: u,
                service,
            }) as Box<dyn EngineHandle>)
        })
    }
}

struct SystemdEngine {
    unit: String,
    pid: u32,
    /// The unit's `NRestarts` when this engine was found: systemd counts its own restarts
    /// after failures there, and nothing else.
    restarts: u32,
    launcher: SystemdLauncher,
    unit_proxy: UnitProxy<'static>,
    service: ServiceProxy<'static>,
}

impl SystemdEngine {
    /// Stops the engine unit as the unit says (SIGTERM, TimeoutStopSec, SIGKILL).
    async fn stop_unit(&self) {
        if let Err(e) = self.launcher.job(&self.unit, "stop").await {
            tracing::warn!(unit = %self.unit, error = %e, "Cannot stop the engine unit.");
        }
    }

    /// How the engine this handle knows ended. When systemd already runs the next engine (a
    /// connection waiting on the socket started it right after a clean unload, or an operator
    /// restarted the unit), the exit status of ours is gone; without a restart of systemd's
    /// own (`NRestarts` unchanged) the exit was not a failure.
    async fn exit(&self) -> EngineExit {
        let exit = exit_of(&self.service, &self.unit).await;
        let known = exit.code.is_some() || exit.signal.is_some();
        if !known
            && self
                .service
                .n_restarts()
                .await
                .is_ok_and(|n| n == self.restarts)
        {
            return EngineExit {
                code: Some(0),
                signal: None,
                log_tail: format!(
                    "exited without a failure; systemd started the next engine (see journalctl -u {})",
                    self.unit
                ),
            };
        }
        exit
    }
}

impl EngineHandle for SystemdEngine {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    fn wait(&mut self) -> BoxFuture<'_, EngineExit> {
        Box::pin(async move {
            // The process this handle knows is gone when the unit's main pid changes (systemd
            // restarted it, or it exited) or the unit leaves `active`/`activating`.
            let mut changes = match self.launcher.changes(&self.unit).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(unit = %self.unit, error = %e, "No change signals; looking each second.");
                    futures_util::stream::pending().boxed()
                }
            };
            loop {
                // systemd's view (main pid, state), read fresh each turn: the signals wake us,
                // the one-second turn covers a missed one. (The engine's process is not
                // visible from pool-managerd's sandbox: ProtectProc.) A D-Bus error is not an
                // exit: look again.
                match (
                    self.service.main_pid().await,
                    self.unit_proxy.active_state().await,
                ) {
                    (Ok(pid), Ok(state)) => {
                        // `deactivating` with our pid: the engine said STOPPING=1 (an idle
                        // unload) and still runs; its exit status comes when it is gone.
                        if pid != self.pid || state == "inactive" || state == "failed" {
                            return self.exit().await;
                        }
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::debug!(unit = %self.unit, error = %e, "Cannot read the engine unit's state; looking again.");
                    }
                }
                tokio::select! {
                    _ = changes.next() => {}
                    // Signals are the fast path; this turn covers a missed one.
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        })
    }

    fn stop(&mut self, _grace: Duration) -> BoxFuture<'_, EngineExit> {
        Box::pin(async move {
            self.stop_unit().await;
            let socket = engine_socket_unit(
                self.unit
                    .trim_start_matches("llorch-engine@")
                    .trim_end_matches(".service"),
            );
            if let Err(e) = self.launcher.job(&socket, "stop").await {
                tracing::warn!(unit = %socket, error = %e, "Cannot stop the engine's socket unit.");
            }
            exit_of(&self.service, &self.unit).await
        })
    }

    fn stop_keeping_socket(&mut self, _grace: Duration) -> BoxFuture<'_, EngineExit> {
        Box::pin(async move {
            self.stop_unit().await;
            exit_of(&self.service, &self.unit).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_settings_file_quotes_values_and_carries_optional_flags() {
        let pool: PoolConfig = toml::from_str(
            r#"
id = "p0"
slots = 4
ctx = 2048
threads = 8
devices = "cuda:0"
prefix_cache_mib = 64
[model]
id = "m"
source = "/models/a \"b\".gguf"
sha256 = "abc"
"#,
        )
        .unwrap();
        let env = pool_env(&pool, &[]);
        assert!(
            env.contains("LLORCH_MODEL_SOURCE=\"/models/a \\\"b\\\".gguf\"\n"),
            "{env}"
        );
        assert!(env.contains("LLORCH_SLOTS=4\nLLORCH_CTX=2048\n"), "{env}");
        assert!(
            env.contains("LLORCH_PLAN_ARGS=\"--gpu-layers 999 --sha256 abc --threads 8 --prefix-cache-mib 64\"\n"),
            "{env}"
        );
        // A GPU pool's GPUs' free memory and gpu_only reach the provisioner.
        let gpu = PoolConfig {
            gpu_only: true,
            ..pool.clone()
        };
        let env = pool_env(&gpu, &[24_000 << 20, 11_800 << 20]);
        assert!(
            env.contains("LLORCH_PLAN_ARGS=\"--gpu-layers 999 --sha256 abc --threads 8 --gpu-free-mib 24000,11800 --gpu-only --prefix-cache-mib 64\"\n"),
            "{env}"
        );
        assert_eq!(engine_unit("p0"), "llorch-engine@p0.service");
        assert_eq!(provisioner_unit("p0"), "engine-provisioner@p0.service");
    }
}
