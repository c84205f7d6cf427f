//! One task per pool: provision the model, start the engine, watch it exit, restart it with
//! exponential backoff, and stop it on shutdown.
//!
//! The supervisor owns the pool's process phase and its engine handle. Readiness is not its
//! business: the handoff watcher records the handoff file and [`crate::state::derive_state`]
//! combines both.
//!
//! An on-demand pool is provisioned at start like any other, then waits in `standby` with its
//! engine socket listening ([`Launcher::listen_on_demand`]); the first connection there starts
//! the engine ([`Launcher::wait_activation`]), and the request waits on the socket until the
//! model is loaded. An engine that exits cleanly on its own unloaded after its keep-alive: the
//! pool goes back to `standby`, with no restart counted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{PoolConfig, RuntimeLayout};
use crate::launcher::{EngineExit, EngineHandle, Launcher};
use crate::metrics::Restart;
pub use crate::state::{Command, Request};
use crate::state::{Node, Phase};

/// First retry delay after a failure.
pub const BACKOFF_START: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// An engine that was ready this long before it failed restarts from the first delay again.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// Retry delays: 0.5 s, 1 s, 2 s, ... capped at 30 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: BACKOFF_START,
        }
    }
}

impl Backoff {
    /// The delay before the next attempt; doubles the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        d
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_START;
    }
}

/// Commands that may wait for one pool's supervisor.
pub const COMMAND_QUEUE: usize = 8;

/// Answers a command that arrives while no engine runs (provisioning, failed, standby);
/// true when it asks for the engine to start now.
fn answer_without_engine(req: Request, pool: &PoolConfig) -> bool {
    let start = match req.command {
        Command::Unload if !pool.on_demand => {
            let _ = req.reply.send(Err(not_on_demand(pool)));
            return false;
        }
        Command::Unload => false,
        Command::Load | Command::Restart => true,
    };
    tracing::info!(pool_id = %pool.id, command = req.command.as_str(), by = %req.by, "Pool command from an operator.");
    let _ = req.reply.send(Ok(()));
    start
}

fn not_on_demand(pool: &PoolConfig) -> String {
    format!(
        "pool {} is not on demand: it stays loaded; drain it, or set on_demand = true (or remove it) in node.toml and reload",
        pool.id
    )
}

/// Runs one pool until `shutdown` is cancelled; on shutdown stops the engine (SIGTERM, grace,
/// SIGKILL) and returns once it is gone. Operator commands arrive on `commands` (the node's
/// table holds the sender) and are answered in every phase.
///
/// Each phase is one method of `Supervisor` that returns the next `Step`; this loop only
/// drives them.
pub async fn supervise(
    node: Arc<Node>,
    pool: PoolConfig,
    launcher: Arc<dyn Launcher>,
    layout: RuntimeLayout,
    grace: Duration,
    shutdown: CancellationToken,
) {
    let id = pool.id.clone();
    let (sender, commands) = tokio::sync::mpsc::channel(COMMAND_QUEUE);
    node.update(&id, |p| p.commands = Some(sender));
    let mut s = Supervisor {
        handoff_path: layout.handoff_file(&id),
        id,
        node,
        pool,
        launcher,
        layout,
        grace,
        shutdown,
        commands,
        backoff: Backoff::default(),
        plan: None,
        load_now: false,
    };
    let mut step = Step::Provision;
    loop {
        step = match step {
            Step::Provision => s.provision().await,
            Step::Activate(plan) => s.activate(plan).await,
            Step::Start(plan) => s.start(plan).await,
            Step::Serve { engine, pid } => s.serve(engine, pid).await,
            Step::Backoff { delay, restart } => s.backoff(delay, restart).await,
            Step::Stop => return s.stop().await,
            Step::Stopped => return,
        };
    }
}

/// A phase of a pool's supervision; each one's method returns the next.
enum Step {
    /// Stage the model and write the engine plan, unless a plan exists: every pass starts
    /// here, and a cancelled shutdown ends it.
    Provision,
    /// Clear a stale handoff file; an on-demand pool waits on standby until its engine is
    /// wanted.
    Activate(PathBuf),
    /// Start the engine from its plan.
    Start(PathBuf),
    /// The engine runs: wait for its exit, an operator's command or shutdown.
    Serve {
        engine: Box<dyn EngineHandle>,
        pid: Option<u32>,
    },
    /// Wait out a retry delay; `restart` counts a restart once it is over.
    Backoff { delay: Duration, restart: bool },
    /// Shutdown with no engine running: close the on-demand socket, mark the pool stopped.
    Stop,
    /// Shutdown that stopped the engine already; nothing is left to do.
    Stopped,
}

/// What one pool's supervision owns between its phases.
struct Supervisor {
    id: String,
    node: Arc<Node>,
    pool: PoolConfig,
    launcher: Arc<dyn Launcher>,
    layout: RuntimeLayout,
    grace: Duration,
    shutdown: CancellationToken,
    commands: tokio::sync::mpsc::Receiver<Request>,
    handoff_path: PathBuf,
    backoff: Backoff,
    /// The plan of the last provisioning, while it can be used again.
    plan: Option<PathBuf>,
    /// An operator asked for the engine: an on-demand pool does not wait for a request.
    load_now: bool,
}

impl Supervisor {
    async fn provision(&mut self) -> Step {
        let id = &self.id;
        if self.shutdown.is_cancelled() {
            return Step::Stop;
        }
        // The pool's own handoff directory (its engine may write nowhere else): made before
        // anything can start the engine (socket activation too), and again if it was removed.
        if let Err(e) = self.layout.create_pool_handoff_dir(id) {
            tracing::warn!(pool_id = %id, error = %e, "Cannot make the pool's handoff directory; the engine will not be able to report ready.");
        }
        if let Some(p) = self.plan.as_ref().filter(|p| p.exists()) {
            return Step::Activate(p.clone());
        }
        self.node.update(id, |p| {
            p.phase = Phase::Provisioning;
            p.engine_pid = None;
        });
        tracing::info!(pool_id = %id, model = %self.pool.model.id, "Provisioning the model.");
        let gpu_free = gpu_free(&self.node, &self.pool);
        let result = {
            let provision = self.launcher.provision(&self.pool, &gpu_free);
            tokio::pin!(provision);
            loop {
                tokio::select! {
                    r = &mut provision => break r,
                    () = self.shutdown.cancelled() => return Step::Stop,
                    Some(req) = self.commands.recv() => self.load_now |= answer_without_engine(req, &self.pool),
                }
            }
        };
        match result {
            Ok(p) => {
                let need = planned_vram(&p);
                let charge = planned_charge(&self.pool, &p);
                self.node.update(id, |e| {
                    e.staged = true;
                    e.vram_need = need;
                    e.charge = charge;
                });
                self.plan = Some(p.clone());
                Step::Activate(p)
            }
            Err(e) => {
                if let crate::launcher::LaunchError::Provision { exit, .. } = &e {
                    if exit.code.is_some_and(llorch_wire::exit::is_model_fault) {
                        self.node.metrics.verification_failed(id);
                        tracing::error!(
                            message_id = llorch_os::message_id::MODEL_VERIFICATION_FAILED,
                            pool_id = %id,
                            model = %self.pool.model.id,
                            exit = %exit.describe(),
                            "The provisioner refused the model file."
                        );
                    }
                }
                let why = format!("provisioning failed: {e}");
                self.node.metrics.start_failed(id, Restart::ProvisionFailed);
                fail(&self.node, id, why);
                self.retry()
            }
        }
    }

    async fn activate(&mut self, plan: PathBuf) -> Step {
        let id = &self.id;
        // A handoff file left by an engine that could not remove it (killed) is stale; one whose
        // engine still runs (systemd already restarted it, under the systemd launcher) is not.
        let found = read_handoff_pid(&self.handoff_path);
        let running = match found {
            Some(pid) => self.launcher.engine_running(&self.pool, pid).await,
            None => false,
        };
        if !running {
            // Only the file that was judged (or one that does not parse): an engine that
            // socket activation started meanwhile may have written a new one. No engine has
            // pid 0.
            remove_stale_handoff(&self.handoff_path, Some(found.unwrap_or(0)));
        }
        if self.pool.on_demand && !running {
            let wait = std::mem::take(&mut self.load_now);
            match standby(
                &self.node,
                &self.pool,
                self.launcher.as_ref(),
                &self.shutdown,
                &mut self.commands,
                wait,
            )
            .await
            {
                Ok(true) => {}
                Ok(false) => return Step::Stop,
                Err(e) => {
                    let why = format!("cannot listen for requests: {e}");
                    self.node.metrics.start_failed(id, Restart::StartFailed);
                    fail(&self.node, id, why);
                    return self.retry();
                }
            }
        }
        self.load_now = false;
        // The staged file may have gone since it was provisioned (deleted from the cache, a
        // cache on a tmpfs after a reboot): stage it again rather than start an engine that
        // cannot load it.
        if let Some(missing) = planned_model_missing(&plan) {
            tracing::warn!(pool_id = %id, model = %missing, "The staged model file is gone; provisioning it again.");
            self.plan = None;
            return Step::Provision;
        }
        Step::Start(plan)
    }

    async fn start(&mut self, plan: PathBuf) -> Step {
        let id = &self.id;
        let engine = match self.launcher.start_engine(&self.pool, &plan).await {
            Ok(h) => h,
            Err(e) => {
                let why = format!("cannot start the engine: {e}");
                self.node.metrics.start_failed(id, Restart::StartFailed);
                fail(&self.node, id, why);
                return self.retry();
            }
        };
        let pid = engine.pid();
        tracing::info!(pool_id = %id, pid, "Engine started; waiting for its handoff file.");
        self.node.update(id, |p| {
            p.phase = Phase::Running;
            p.engine_pid = pid;
            p.engine_started = Some(Instant::now());
            // Charged as running from here; the admission that led here is spent.
            p.admitted = None;
            p.last_used = Some(Instant::now());
        });
        Step::Serve { engine, pid }
    }

    async fn serve(&mut self, mut engine: Box<dyn EngineHandle>, pid: Option<u32>) -> Step {
        // Commands that need nothing done come back here without touching the engine.
        let outcome = loop {
            tokio::select! {
                exit = engine.wait() => break Running::Exited(exit),
                () = self.shutdown.cancelled() => break Running::Shutdown,
                Some(req) = self.commands.recv() => match req.command {
                    Command::Load => {
                        let _ = req.reply.send(Ok(()));
                    }
                    Command::Unload if !self.pool.on_demand => {
                        let _ = req.reply.send(Err(not_on_demand(&self.pool)));
                    }
                    // Nobody waits for it any more (a swap that gave up): the pool may have
                    // taken work since, so it is not carried out late.
                    Command::Unload if req.reply.is_closed() => {
                        tracing::info!(pool_id = %self.id, by = %req.by, "An unload nobody waits for any more is dropped.");
                    }
                    Command::Unload | Command::Restart => break Running::Asked(req),
                },
            }
        };
        match outcome {
            Running::Exited(exit) => self.exited(exit, pid),
            Running::Shutdown => {
                stop_engine(
                    &self.node,
                    &self.id,
                    engine,
                    self.grace,
                    &self.handoff_path,
                    false,
                )
                .await;
                if self.pool.on_demand {
                    self.launcher.close_on_demand(&self.pool).await;
                }
                Step::Stopped
            }
            Running::Asked(req) => {
                let id = &self.id;
                tracing::info!(pool_id = %id, command = req.command.as_str(), by = %req.by, "Pool command from an operator: stopping the engine.");
                // The socket keeps listening: requests made meanwhile wait for the next engine.
                stop_engine(&self.node, id, engine, self.grace, &self.handoff_path, true).await;
                self.node.update(id, |p| {
                    p.handoff = None;
                    p.engine_started = None;
                });
                self.backoff.reset();
                self.load_now = req.command == Command::Restart;
                let _ = req.reply.send(Ok(()));
                Step::Provision
            }
        }
    }

    /// The engine exited without being asked to: an on-demand engine that unloaded goes back
    /// to standby; anything else is a failure, retried after a delay.
    fn exited(&mut self, exit: EngineExit, pid: Option<u32>) -> Step {
        let id = &self.id;
        if self.pool.on_demand && exit.success() {
            // It unloaded itself after its keep-alive without work.
            tracing::info!(pool_id = %id, pid, "The engine unloaded after its keep-alive; the pool is on standby.");
            remove_stale_handoff(&self.handoff_path, pid);
            self.node.update(id, |p| {
                if p.handoff.as_ref().is_some_and(|h| Some(h.pid) == pid) {
                    p.handoff = None;
                }
                p.engine_pid = None;
                p.engine_started = None;
            });
            self.backoff.reset();
            return Step::Provision;
        }
        let ready_for = self
            .node
            .read(id, |p| p.ready_since.map(|t| t.elapsed()))
            .flatten();
        if ready_for.is_some_and(|d| d >= BACKOFF_RESET_AFTER) {
            self.backoff.reset();
        }
        // The start time is taken when the engine becomes ready.
        let was_ready = self
            .node
            .read(id, |p| p.engine_started.is_none())
            .unwrap_or(false);
        let restart = if was_ready {
            Restart::Crashed
        } else {
            // It could not load: the staged file may be damaged. Provisioning verifies
            // it again (and fetches it again when it is) before the next start.
            self.plan = None;
            Restart::StartFailed
        };
        self.node.metrics.start_failed(id, restart);
        tracing::error!(
            message_id = llorch_os::message_id::ENGINE_CRASHED,
            pool_id = %id,
            pid,
            exit = %exit.describe(),
            was_ready,
            "The engine exited without being asked to."
        );
        // A killed engine cannot remove its handoff file; do it for it.
        remove_stale_handoff(&self.handoff_path, pid);
        let delay = self.backoff.next_delay();
        fail(&self.node, id, format!("the engine {exit}"));
        // Forget the exited engine's handoff, not a newer one's.
        self.node.update(id, |p| {
            if p.handoff.as_ref().is_some_and(|h| Some(h.pid) == pid) {
                p.handoff = None;
            }
        });
        tracing::info!(pool_id = %id, delay_ms = delay.as_millis() as u64, "Restarting the engine after a delay.");
        Step::Backoff {
            delay,
            restart: true,
        }
    }

    /// A failed phase: retry after the next backoff delay (no restart counted).
    fn retry(&mut self) -> Step {
        Step::Backoff {
            delay: self.backoff.next_delay(),
            restart: false,
        }
    }

    async fn backoff(&mut self, delay: Duration, restart: bool) -> Step {
        match backoff_wait(delay, &self.shutdown, &mut self.commands, &self.pool).await {
            Wait::Shutdown => return Step::Stop,
            Wait::Elapsed => {}
            Wait::Asked => self.load_now = true,
        }
        if restart {
            self.node.update(&self.id, |p| p.restarts += 1);
        }
        Step::Provision
    }

    /// Leaves the pool stopped, with its on-demand socket closed.
    async fn stop(self) {
        if self.pool.on_demand {
            self.launcher.close_on_demand(&self.pool).await;
        }
        self.node.update(&self.id, |p| {
            p.phase = Phase::Stopped;
            p.engine_pid = None;
            p.activation_socket = None;
        });
    }
}

/// The model file a plan names, when it no longer exists (None when it does, or when the plan
/// cannot be read: starting the engine then says why).
fn planned_model_missing(plan: &std::path::Path) -> Option<String> {
    let bytes = llorch_os::fs::read_untrusted(plan, llorch_wire::plan::MAX_PLAN_BYTES).ok()?;
    let plan: llorch_wire::plan::EnginePlan = serde_json::from_slice(&bytes).ok()?;
    (!std::path::Path::new(&plan.model.path).exists()).then_some(plan.model.path)
}

/// How the wait on a running engine ended.
enum Running {
    Exited(EngineExit),
    Shutdown,
    Asked(Request),
}

/// How a backoff delay ended.
enum Wait {
    Elapsed,
    Shutdown,
    /// An operator asked for the engine now (Load, Restart).
    Asked,
}

/// Waits out a backoff delay, answering commands meanwhile; `Load` and `Restart` end it early.
async fn backoff_wait(
    d: Duration,
    shutdown: &CancellationToken,
    commands: &mut tokio::sync::mpsc::Receiver<Request>,
    pool: &PoolConfig,
) -> Wait {
    let until = Instant::now() + d;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(until) => return Wait::Elapsed,
            () = shutdown.cancelled() => return Wait::Shutdown,
            Some(req) = commands.recv() => {
                if answer_without_engine(req, pool) {
                    return Wait::Asked;
                }
            }
        }
    }
}

/// Puts an on-demand pool on standby with its socket listening, and returns once a request
/// (or anyone, or an operator's `Load`) asks for its engine: true to start it, false on
/// shutdown. With `now`, it does not wait for a request.
async fn standby(
    node: &Node,
    pool: &PoolConfig,
    launcher: &dyn Launcher,
    shutdown: &CancellationToken,
    commands: &mut tokio::sync::mpsc::Receiver<Request>,
    now: bool,
) -> Result<bool, crate::launcher::LaunchError> {
    let id = pool.id.as_str();
    let socket = tokio::select! {
        r = launcher.listen_on_demand(pool) => r?,
        () = shutdown.cancelled() => return Ok(false),
    };
    node.update(id, |p| {
        p.phase = Phase::Standby;
        p.engine_pid = None;
        p.activation_socket = Some(socket.clone());
    });
    if now {
        tracing::info!(pool_id = %id, "Loading the model at an operator's request.");
        return Ok(true);
    }
    tracing::info!(pool_id = %id, socket = %socket.display(), keep_alive_secs = pool.idle_exit_secs().unwrap_or(0), "On standby: the first request loads the model.");
    let activation = launcher.wait_activation(pool);
    tokio::pin!(activation);
    loop {
        tokio::select! {
            r = &mut activation => {
                r?;
                tracing::info!(pool_id = %id, "A request is waiting: starting the engine.");
                return Ok(true);
            }
            () = shutdown.cancelled() => return Ok(false),
            Some(req) = commands.recv() => {
                if answer_without_engine(req, pool) {
                    tracing::info!(pool_id = %id, "Loading the model at an operator's request.");
                    return Ok(true);
                }
            }
        }
    }
}

async fn stop_engine(
    node: &Node,
    id: &str,
    mut engine: Box<dyn EngineHandle>,
    grace: Duration,
    handoff_path: &Path,
    keep_socket: bool,
) {
    node.update(id, |p| p.phase = Phase::Stopping);
    let pid = engine.pid();
    tracing::info!(pool_id = %id, pid, "Stopping the engine.");
    let exit = if keep_socket {
        engine.stop_keeping_socket(grace).await
    } else {
        engine.stop(grace).await
    };
    if exit.success() {
        tracing::info!(pool_id = %id, "Engine stopped.");
    } else {
        tracing::warn!(pool_id = %id, exit = %exit, "Engine stopped uncleanly.");
    }
    remove_stale_handoff(handoff_path, pid);
    node.update(id, |p| {
        p.phase = Phase::Stopped;
        p.engine_pid = None;
    });
}

fn fail(node: &Node, id: &str, error: String) {
    node.update(id, |p| {
        p.phase = Phase::Failed;
        p.engine_pid = None;
        p.last_error = Some(error);
        // The request that was admitted to load it will not be served by this engine.
        p.admitted = None;
    });
}

/// The pid a pool's handoff file names, if it exists and parses.
fn read_handoff_pid(path: &Path) -> Option<u32> {
    let bytes =
        llorch_os::fs::read_untrusted(path, llorch_wire::handoff::MAX_HANDOFF_BYTES).ok()?;
    serde_json::from_slice::<llorch_wire::handoff::Handoff>(&bytes)
        .ok()
        .map(|h| h.pid)
}

/// Removes the pool's handoff file when it is stale: always when `pid` is None (the caller
/// found no engine of ours running), otherwise only when the file names `pid` (the engine that
/// just exited), so a file written by a newer engine is never removed.
fn remove_stale_handoff(path: &Path, pid: Option<u32>) {
    let stale = match pid {
        None => path.exists(),
        Some(pid) => llorch_os::fs::read_untrusted(path, llorch_wire::handoff::MAX_HANDOFF_BYTES)
            .ok()
            .and_then(|b| serde_json::from_slice::<llorch_wire::handoff::Handoff>(&b).ok())
            .is_none_or(|h| h.pid == pid),
    };
    if stale {
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(file = %path.display(), "Removed a stale handoff file."),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "Cannot remove a stale handoff file.")
            }
        }
    }
}

/// The pool's GPUs' free memory now (NVML), for the provisioner's fit check; empty for a CPU
/// pool, or when NVML cannot say (the plan is then not checked, and the log says why).
fn gpu_free(node: &Node, pool: &PoolConfig) -> Vec<u64> {
    let gpus = pool.gpus();
    if gpus.is_empty() {
        return Vec::new();
    }
    match node.gpus.free_bytes(&gpus) {
        Ok(free) => free,
        Err(reason) => {
            tracing::warn!(pool_id = %pool.id, %reason, "The GPUs' free memory is unknown: the model's fit is not checked before it loads.");
            Vec::new()
        }
    }
}

/// What the pool is charged while loaded, from the plan at `path` (nothing when it cannot be
/// read: the pool is then not budgeted, and the log says so).
fn planned_charge(pool: &PoolConfig, path: &Path) -> Vec<(crate::budget::Device, u64)> {
    let plan = llorch_os::fs::read_untrusted(path, llorch_wire::plan::MAX_PLAN_BYTES)
        .ok()
        .and_then(|t| serde_json::from_slice::<llorch_wire::plan::EnginePlan>(&t).ok());
    match plan {
        Some(plan) => crate::budget::charge(pool, &plan),
        None => {
            tracing::warn!(pool_id = %pool.id, "Cannot read the pool's plan: its memory is not charged against the node's budgets.");
            Vec::new()
        }
    }
}

/// The VRAM the plan at `path` says the engine needs on its GPUs; None for a CPU pool or a
/// plan without an estimate.
fn planned_vram(path: &Path) -> Option<u64> {
    let text = llorch_os::fs::read_untrusted(path, llorch_wire::plan::MAX_PLAN_BYTES).ok()?;
    let plan: llorch_wire::plan::EnginePlan = serde_json::from_slice(&text).ok()?;
    plan.memory.map(|m| m.gpu_total_bytes()).filter(|b| *b > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_thirty_seconds_and_resets() {
        let mut b = Backoff::default();
        let ms: Vec<u128> = (0..9).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(
            ms,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(500));
    }

    #[test]
    fn only_stale_handoff_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let h = |pid: u32| {
            serde_json::json!({
                "version": 1, "pool_id": "p", "model_id": "m", "model_sha256": "0",
                "socket": "/s", "slots": 1, "ctx_per_slot": 64, "device": "cpu",
                "engine_version": "0", "pid": pid
            })
            .to_string()
        };
        std::fs::write(&path, h(5)).unwrap();
        remove_stale_handoff(&path, Some(6));
        assert!(path.exists(), "a newer engine's file stays");
        remove_stale_handoff(&path, Some(5));
        assert!(!path.exists());
        std::fs::write(&path, h(5)).unwrap();
        assert_eq!(read_handoff_pid(&path), Some(5));
        remove_stale_handoff(&path, None);
        assert!(!path.exists());
    }
}
