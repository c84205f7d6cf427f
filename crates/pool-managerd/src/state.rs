//! The node's view of its pools: one short synchronous lock around a map of pool entries,
//! changed by the supervisors (process phase), the handoff watcher (handoff file present) and
//! the API (drain flag, in-flight forwards). A pool's reported state is a pure function of those
//! facts ([`derive_state`]), so no writer can leave it inconsistent.
//!
//! Every change of a reported state wakes the heartbeat task through a [`Notify`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use llorch_wire::handoff::Handoff;
use llorch_wire::node::{PoolState, PoolStatus};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::PoolConfig;

pub use crate::commands::{ask, Command, Request, Unanswered};

/// What the supervisor is doing with a pool's processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Provisioning,
    /// The engine process runs (loading, or ready once its handoff file is seen).
    Running,
    /// Provisioning or the engine failed; waiting to retry.
    Failed,
    /// An on-demand pool without an engine: its socket listens, and the first request starts
    /// the engine.
    Standby,
    /// pool-managerd is shutting down and stopping the engine.
    Stopping,
    /// The engine was stopped on shutdown.
    Stopped,
}

/// The reported state from the facts. The engine is ready only when the handoff file was written
/// by the engine this node started (its pid), so a stale file never makes a pool ready.
pub fn derive_state(
    phase: Phase,
    engine_pid: Option<u32>,
    handoff: Option<&Handoff>,
    draining: bool,
) -> PoolState {
    match phase {
        Phase::Provisioning => PoolState::Provisioning,
        Phase::Failed => PoolState::Failed,
        // A drained on-demand pool takes no work, loaded or not.
        Phase::Standby if draining => PoolState::Draining,
        Phase::Standby => PoolState::Standby,
        Phase::Stopping | Phase::Stopped => PoolState::Draining,
        Phase::Running => {
            let ready = matches!((engine_pid, handoff), (Some(pid), Some(h)) if h.pid == pid);
            match (ready, draining) {
                (true, true) => PoolState::Draining,
                (true, false) => PoolState::Ready,
                (false, _) => PoolState::Loading,
            }
        }
    }
}

/// Everything known about one pool.
#[derive(Debug)]
pub struct PoolEntry {
    pub config: PoolConfig,
    pub phase: Phase,
    pub engine_pid: Option<u32>,
    /// The last valid handoff file seen for this pool, whoever wrote it.
    pub handoff: Option<Handoff>,
    pub draining: bool,
    pub restarts: u32,
    pub last_error: Option<String>,
    /// The model got past provisioning at least once.
    pub staged: bool,
    /// When the pool last became ready (for the backoff reset).
    pub ready_since: Option<Instant>,
    /// When the supervisor started the current engine (for the load time).
    pub engine_started: Option<Instant>,
    /// How long the engine last took from its start to ready.
    pub load_time: Option<std::time::Duration>,
    /// On-demand pools: the socket that listens while no engine runs; a request sent there
    /// starts the engine and waits for the model.
    pub activation_socket: Option<PathBuf>,
    pub state: PoolState,
    /// Forwards in flight; shared with the forward guards.
    pub busy: Arc<AtomicU32>,
    /// Operator commands to the pool's supervisor, once it runs.
    pub commands: Option<tokio::sync::mpsc::Sender<Request>>,
    /// GPU pools: the VRAM the plan says the engine needs on its GPUs.
    pub vram_need: Option<u64>,
    /// What the pool is charged against the node's budgets while loaded (from its plan;
    /// empty until provisioned).
    pub charge: Vec<(crate::budget::Device, u64)>,
    /// Never unloaded to make room (node.toml's `pinned`, or an operator's pin).
    pub pinned: bool,
    /// When it last took a request or was admitted to load: the least recently used idle
    /// pool is unloaded first.
    pub last_used: Option<Instant>,
    /// When a request was admitted to load it (its charge counts from then, before the
    /// engine starts).
    pub admitted: Option<Instant>,
    /// Chosen to be unloaded for room: new requests wait for the swap instead of using it.
    pub evicting: bool,
    /// A swap waits for this pool's work to end: new requests queue behind the swap.
    pub yielding: bool,
    /// Unloads made to load another pool.
    pub swaps: u64,
}

impl PoolEntry {
    fn new(config: PoolConfig) -> Self {
        Self {
            pinned: config.pinned,
            config,
            phase: Phase::Provisioning,
            engine_pid: None,
            handoff: None,
            draining: false,
            restarts: 0,
            last_error: None,
            staged: false,
            ready_since: None,
            engine_started: None,
            load_time: None,
            activation_socket: None,
            state: PoolState::Provisioning,
            busy: Arc::new(AtomicU32::new(0)),
            commands: None,
            vram_need: None,
            charge: Vec::new(),
            last_used: None,
            admitted: None,
            evicting: false,
            yielding: false,
            swaps: 0,
        }
    }

    pub fn status(&self) -> PoolStatus {
        let ready = matches!(self.state, PoolState::Ready | PoolState::Draining)
            && self.phase == Phase::Running;
        PoolStatus {
            pool_id: self.config.id.clone(),
            model_id: self.config.model.id.clone(),
            state: self.state,
            slots_total: self.config.slots,
            slots_busy: self.busy.load(Ordering::SeqCst),
            ctx_per_slot: self.config.ctx,
            device: self.config.devices.to_string(),
            engine_version: self
                .handoff
                .as_ref()
                .filter(|_| ready)
                .map(|h| h.engine_version.clone()),
            engine_pid: self.engine_pid,
            restarts: self.restarts,
            // The control plane refuses a longer one; the whole text stays in this node's log.
            last_error: self.last_error.as_deref().map(|e| {
                llorch_wire::node::truncate_text(e, llorch_wire::node::limits::MAX_LAST_ERROR_BYTES)
            }),
            draining: self.draining,
            on_demand: self.config.on_demand,
            load_ms: self.load_time.map(|d| d.as_millis() as u64),
            seq: 0,
            vram_need_bytes: self.vram_need,
            vram_free_bytes: None,
            memory_charge_bytes: (!self.charge.is_empty()).then(|| {
                self.charge
                    .iter()
                    .fold(0u64, |a, (_, b)| a.saturating_add(*b))
            }),
            memory_charged: self.charged(),
            pinned: self.pinned,
            swaps: self.swaps,
        }
    }

    /// Whether the pool's charge counts against the budgets now: an engine runs or stops, an
    /// always-loaded pool is on its way to loading, or a request was admitted to load it.
    pub fn charged(&self) -> bool {
        match self.phase {
            Phase::Running | Phase::Stopping => true,
            // An always-loaded pool loads again by itself after provisioning or a failure.
            Phase::Provisioning | Phase::Failed => !self.config.on_demand || self.admission(),
            Phase::Standby => self.admission(),
            Phase::Stopped => false,
        }
    }

    /// A request or an operator was admitted to load this pool and its engine has not started
    /// yet (an admission lapses after [`crate::budget::ADMITTED_FOR`]).
    pub fn admission(&self) -> bool {
        self.admitted
            .is_some_and(|t| t.elapsed() < crate::budget::ADMITTED_FOR)
    }

    /// Since when the pool holds its memory (ready, else started, else admitted): a pool
    /// loaded less than `min_resident_secs` ago is not unloaded for another.
    pub fn resident_since(&self) -> Option<Instant> {
        self.ready_since.or(self.engine_started).or(self.admitted)
    }

    /// The engine's socket, when the pool can take a forward: a ready engine's, or the
    /// listening socket of an on-demand pool that is unloaded or loading (the request waits
    /// there for the model).
    pub fn ready_socket(&self) -> Option<PathBuf> {
        match self.state {
            PoolState::Ready => self.handoff.as_ref().map(|h| PathBuf::from(&h.socket)),
            PoolState::Standby | PoolState::Loading if self.config.on_demand => {
                self.activation_socket.clone()
            }
            _ => None,
        }
    }
}

/// Shared state of the node.
#[derive(Debug)]
pub struct Node {
    pools: Mutex<BTreeMap<String, PoolEntry>>,
    /// Woken on every change of a reported state.
    pub changed: Notify,
    /// Counts changes of reported states, for any number of watchers (a forward waiting for
    /// an on-demand engine watches for its pool failing to start).
    pub generation: tokio::sync::watch::Sender<u64>,
    /// Set at shutdown: no new forwards.
    pub shutting_down: AtomicBool,
    /// Operator changes (drain, resume) so far, counted under the table's lock and stamped
    /// on every status read (`PoolStatus::seq`): the control plane keeps the newest report.
    changes: std::sync::atomic::AtomicU64,
    pub metrics: crate::metrics::Metrics,
    /// The node's GPUs (NVML), reported with every registration and heartbeat.
    pub gpus: Arc<crate::gpu::Inventory>,
    /// The memory budgets and the swap rule's settings (`crate::memory`).
    pub memory: Mutex<crate::budget::Settings>,
    /// Held by the one swap in progress: requests that need room take turns in arrival order.
    pub room: tokio::sync::Mutex<()>,
    /// Woken each time a forward ends (a swap may be waiting for a pool to go idle).
    pub work_done: Notify,
}

impl Node {
    /// The node's state, its GPUs probed (NVML) once.
    pub fn new(pools: &[PoolConfig]) -> Arc<Self> {
        Self::with_gpus(pools, crate::gpu::Inventory::probe())
    }

    pub fn with_gpus(pools: &[PoolConfig], gpus: crate::gpu::Inventory) -> Arc<Self> {
        let gpus = Arc::new(gpus);
        Arc::new(Self {
            pools: Mutex::new(
                pools
                    .iter()
                    .map(|p| (p.id.clone(), PoolEntry::new(p.clone())))
                    .collect(),
            ),
            changed: Notify::new(),
            generation: tokio::sync::watch::Sender::new(0),
            shutting_down: AtomicBool::new(false),
            changes: std::sync::atomic::AtomicU64::new(1),
            metrics: crate::metrics::Metrics::new(pools.iter().map(|p| p.id.as_str()), &gpus),
            gpus,
            memory: Mutex::new(crate::budget::Settings::default()),
            room: tokio::sync::Mutex::new(()),
            work_done: Notify::new(),
        })
    }

    /// Runs `f` on a pool's entry under the lock, then re-derives its state, logs and announces
    /// a change. Returns `None` for an unknown pool.
    pub fn update<R>(&self, pool: &str, f: impl FnOnce(&mut PoolEntry) -> R) -> Option<R> {
        self.apply(pool, f, false)
    }

    fn apply<R>(
        &self,
        pool: &str,
        f: impl FnOnce(&mut PoolEntry) -> R,
        operator: bool,
    ) -> Option<R> {
        let (r, changed) = {
            let mut pools = llorch_os::sync::lock(&self.pools);
            let entry = pools.get_mut(pool)?;
            let before = entry.state;
            let r = f(entry);
            if operator {
                self.changes.fetch_add(1, Ordering::SeqCst);
            }
            let after = derive_state(
                entry.phase,
                entry.engine_pid,
                entry.handoff.as_ref(),
                entry.draining,
            );
            entry.state = after;
            if after != before {
                let mut load = None;
                if after == PoolState::Ready && before != PoolState::Draining {
                    entry.ready_since = Some(Instant::now());
                    // Once per engine start: a pool resumed after draining was not loaded again.
                    load = entry.engine_started.take().map(|s| s.elapsed());
                    if let Some(load) = load {
                        entry.load_time = Some(load);
                        self.metrics.engine_ready(&entry.config.id, load);
                    }
                }
                if !matches!(after, PoolState::Ready | PoolState::Draining) {
                    entry.ready_since = None;
                }
                log_transition(entry, before, after, load);
            }
            (r, after != before)
        };
        if changed {
            self.changed.notify_one();
            self.generation.send_modify(|g| *g += 1);
        }
        Some(r)
    }

    /// Runs `f` on the whole table under its lock, without re-deriving states: for the memory
    /// module's own fields (charges, admissions, eviction marks), which no state depends on.
    /// The heartbeat is woken (the charges are reported); state watchers are not.
    pub fn with_table<R>(&self, f: impl FnOnce(&mut BTreeMap<String, PoolEntry>) -> R) -> R {
        let r = f(&mut llorch_os::sync::lock(&self.pools));
        self.changed.notify_one();
        r
    }

    /// Reads a pool's entry under the lock.
    pub fn read<R>(&self, pool: &str, f: impl FnOnce(&PoolEntry) -> R) -> Option<R> {
        let pools = llorch_os::sync::lock(&self.pools);
        pools.get(pool).map(f)
    }

    /// An operator's change of a pool's own flags (drain, resume) under the table's lock,
    /// counted: every status read afterwards carries a higher `seq` than any read before.
    pub fn operator_change<R>(&self, pool: &str, f: impl FnOnce(&mut PoolEntry) -> R) -> Option<R> {
        self.apply(pool, f, true)
    }

    pub fn status(&self, pool: &str) -> Option<PoolStatus> {
        let pools = llorch_os::sync::lock(&self.pools);
        let seq = self.changes.load(Ordering::SeqCst);
        pools.get(pool).map(|p| PoolStatus { seq, ..p.status() })
    }

    /// Every pool's status; while the node shuts down, ready pools are reported draining.
    pub fn statuses(&self) -> Vec<PoolStatus> {
        self.report().0
    }

    /// Every pool's status and the GPUs, from one NVML reading (a registration or heartbeat
    /// carries both). NVML is read before the table is locked: a slow driver call never holds
    /// it.
    pub fn report(&self) -> (Vec<PoolStatus>, llorch_wire::node::GpuReport) {
        let gpus = self.gpus.read();
        let pools = llorch_os::sync::lock(&self.pools);
        let statuses = self.statuses_of(&pools, self.gpus.has_nvml().then_some(&gpus));
        (statuses, gpus)
    }

    fn statuses_of(
        &self,
        pools: &BTreeMap<String, PoolEntry>,
        gpus: Option<&llorch_wire::node::GpuReport>,
    ) -> Vec<PoolStatus> {
        let stopping = self.shutting_down.load(std::sync::atomic::Ordering::SeqCst);
        let seq = self.changes.load(Ordering::SeqCst);
        pools
            .values()
            .map(|p| {
                let mut s = p.status();
                s.seq = seq;
                // What the pool could have once idle on-demand pools on its GPUs made room:
                // placement does not refuse a standby pool that a swap would fit.
                s.vram_free_bytes = gpus
                    .and_then(|g| crate::gpu::free_of(g, &p.config.gpus()))
                    .map(|free| free.saturating_add(reclaimable(pools, p)));
                if stopping && s.state == PoolState::Ready {
                    s.state = PoolState::Draining;
                }
                s
            })
            .collect()
    }

    /// Model ids whose pool got past provisioning.
    pub fn staged_models(&self) -> Vec<String> {
        let pools = llorch_os::sync::lock(&self.pools);
        let mut ids: Vec<String> = pools
            .values()
            .filter(|p| p.staged)
            .map(|p| p.config.model.id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Adds a pool, or replaces the entry of one with the same id (configuration reload), in
    /// one step under the table's lock.
    pub fn put_pool(&self, config: PoolConfig) {
        let id = config.id.clone();
        llorch_os::sync::lock(&self.pools).insert(id.clone(), PoolEntry::new(config));
        self.metrics.add_pool(&id);
        self.changed.notify_one();
    }

    /// Removes a pool whose supervisor has stopped (configuration reload).
    pub fn remove_pool(&self, id: &str) {
        {
            let mut pools = llorch_os::sync::lock(&self.pools);
            pools.remove(id);
            // Under the same lock as a scrape's gauge update, so the gauges stay gone.
            self.metrics.remove_pool(id);
        }
        self.changed.notify_one();
    }

    /// The node's metrics exposition: pool gauges set from the table under its lock.
    pub fn encode_metrics(&self) -> String {
        {
            let pools = llorch_os::sync::lock(&self.pools);
            self.metrics
                .set_pool_gauges(&self.statuses_of(&pools, None));
            self.metrics.set_memory(&self.memory_of(&pools));
        }
        self.metrics.encode()
    }

    /// Each budgeted device: its name, budget and what the charged pools hold on it (bytes).
    pub fn memory_report(&self) -> Vec<(String, u64, u64)> {
        self.memory_of(&llorch_os::sync::lock(&self.pools))
    }

    /// The same, as a registration or heartbeat reports it.
    pub fn device_memory(&self) -> Vec<llorch_wire::node::DeviceMemory> {
        self.memory_report()
            .into_iter()
            .map(
                |(device, budget_bytes, charged_bytes)| llorch_wire::node::DeviceMemory {
                    device,
                    budget_bytes,
                    charged_bytes,
                },
            )
            .collect()
    }

    fn memory_of(&self, pools: &BTreeMap<String, PoolEntry>) -> Vec<(String, u64, u64)> {
        let budgets = llorch_os::sync::lock(&self.memory).budgets.bytes.clone();
        budgets
            .into_iter()
            .map(|(device, budget)| {
                let charged = pools
                    .values()
                    .filter(|p| p.charged())
                    .flat_map(|p| p.charge.iter())
                    .filter(|(d, _)| *d == device)
                    .fold(0u64, |a, (_, b)| a.saturating_add(*b));
                (device.to_string(), budget, charged)
            })
            .collect()
    }

    /// The sockets of the engines that serve now (ready or draining), by pool.
    pub fn engine_sockets(&self) -> Vec<(String, PathBuf)> {
        let pools = llorch_os::sync::lock(&self.pools);
        pools
            .values()
            .filter(|p| matches!(p.state, PoolState::Ready | PoolState::Draining))
            .filter_map(|p| {
                let h = p.handoff.as_ref()?;
                Some((p.config.id.clone(), PathBuf::from(&h.socket)))
            })
            .collect()
    }

    pub fn pool_ids(&self) -> Vec<String> {
        let pools = llorch_os::sync::lock(&self.pools);
        pools.keys().cloned().collect()
    }
}

/// The bytes idle, unpinned on-demand pools other than `p` hold on `p`'s GPUs: what making room
/// for `p` could free now.
fn reclaimable(pools: &BTreeMap<String, PoolEntry>, p: &PoolEntry) -> u64 {
    let mine: Vec<&crate::budget::Device> = p
        .charge
        .iter()
        .map(|(d, _)| d)
        .filter(|d| matches!(d, crate::budget::Device::Gpu(_)))
        .collect();
    pools
        .values()
        .filter(|q| q.config.id != p.config.id && q.config.on_demand && !q.pinned && q.charged())
        .filter(|q| q.busy.load(Ordering::SeqCst) == 0)
        .flat_map(|q| q.charge.iter())
        .filter(|(d, _)| mine.contains(&d))
        .fold(0u64, |a, (_, b)| a.saturating_add(*b))
}

fn log_transition(
    entry: &PoolEntry,
    before: PoolState,
    after: PoolState,
    load: Option<std::time::Duration>,
) {
    let pool = entry.config.id.as_str();
    match after {
        PoolState::Ready => tracing::info!(
            message_id = llorch_os::message_id::ENGINE_READY,
            pool_id = pool,
            model = %entry.config.model.id,
            load_ms = load.map(|l| l.as_millis() as u64),
            pid = entry.engine_pid,
            engine_version = entry.handoff.as_ref().map(|h| h.engine_version.as_str()),
            "Engine ready."
        ),
        PoolState::Failed => tracing::warn!(
            pool_id = pool,
            error = entry.last_error.as_deref().unwrap_or(""),
            "Pool failed."
        ),
        _ => tracing::info!(pool_id = pool, from = %before, to = %after, "Pool state changed."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff(pid: u32) -> Handoff {
        Handoff {
            version: 1,
            pool_id: "p".into(),
            model_id: "m".into(),
            model_sha256: "0".repeat(64),
            socket: "/run/e.sock".into(),
            slots: 1,
            ctx_per_slot: 64,
            device: "cpu".into(),
            engine_version: "0.0.0".into(),
            pid,
        }
    }

    #[test]
    fn states_follow_the_facts() {
        use Phase::*;
        use PoolState as S;
        let h = handoff(7);
        assert_eq!(
            derive_state(Provisioning, None, None, false),
            S::Provisioning
        );
        assert_eq!(derive_state(Running, Some(7), None, false), S::Loading);
        assert_eq!(derive_state(Running, Some(7), Some(&h), false), S::Ready);
        assert_eq!(derive_state(Running, Some(7), Some(&h), true), S::Draining);
        // Drain is only reported for a ready engine.
        assert_eq!(derive_state(Running, Some(7), None, true), S::Loading);
        // A stale handoff of an earlier engine does not make the pool ready.
        assert_eq!(derive_state(Running, Some(8), Some(&h), false), S::Loading);
        assert_eq!(derive_state(Failed, None, Some(&h), false), S::Failed);
        assert_eq!(derive_state(Standby, None, None, false), S::Standby);
        assert_eq!(derive_state(Standby, None, None, true), S::Draining);
        assert_eq!(
            derive_state(Stopping, Some(7), Some(&h), false),
            S::Draining
        );
    }

    #[tokio::test]
    async fn changes_are_announced_and_recorded() {
        let cfg = crate::config::parse(
            std::path::Path::new("t.toml"),
            include_str!("../examples/node.toml"),
        )
        .unwrap();
        let node = Node::new(cfg.pools());
        assert_eq!(
            node.status("default").unwrap().state,
            PoolState::Provisioning
        );
        node.update("default", |p| {
            p.phase = Phase::Running;
            p.engine_pid = Some(7);
        });
        node.changed.notified().await;
        node.update("default", |p| p.handoff = Some(handoff(7)));
        let st = node.status("default").unwrap();
        assert_eq!(st.state, PoolState::Ready);
        assert_eq!(st.engine_version.as_deref(), Some("0.0.0"));
        assert!(node.read("default", |p| p.ready_since.is_some()).unwrap());
        assert_eq!(
            node.read("default", |p| p.ready_socket()).unwrap(),
            Some(PathBuf::from("/run/e.sock"))
        );
        node.update("default", |p| p.draining = true);
        assert_eq!(node.status("default").unwrap().state, PoolState::Draining);
        assert_eq!(node.read("default", |p| p.ready_socket()).unwrap(), None);
        assert!(node.update("nope", |_| ()).is_none());
    }

    /// What counts against the budgets: an always-loaded pool in every phase but stopped (it
    /// loads again by itself), an on-demand pool while its engine runs or while an admission to
    /// load it is fresh, never one whose admission lapsed or whose start failed.
    #[test]
    fn charges_follow_what_can_hold_memory() {
        let cfg = crate::config::parse(
            std::path::Path::new("t.toml"),
            include_str!("../examples/node.toml"),
        )
        .unwrap();
        let mut pool = PoolEntry::new(cfg.pools()[0].clone());
        for phase in [Phase::Provisioning, Phase::Running, Phase::Failed] {
            pool.phase = phase;
            assert!(pool.charged(), "always loaded, {phase:?}");
        }
        pool.phase = Phase::Stopped;
        assert!(!pool.charged());
        pool.config.on_demand = true;
        pool.phase = Phase::Standby;
        assert!(!pool.charged());
        pool.admitted = Some(Instant::now());
        assert!(pool.charged() && pool.admission());
        pool.admitted = Some(Instant::now() - crate::budget::ADMITTED_FOR);
        assert!(!pool.charged(), "a lapsed admission is not charged");
        pool.admitted = Some(Instant::now());
        pool.phase = Phase::Failed;
        assert!(pool.charged());
        pool.admitted = None;
        assert!(!pool.charged(), "a failed on-demand pool holds nothing");
    }
}
