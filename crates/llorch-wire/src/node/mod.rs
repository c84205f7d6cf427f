//! The node API between orchestratord and pool-managerd: registration, heartbeats, pool status,
//! drain and resume, and the forwarding endpoint.
//!
//! Routes served by pool-managerd (on a Unix socket at home, TCP in the cloud):
//! `GET /v2/pools`, `GET /v2/pools/{id}`, `POST /v2/pools/{id}/drain`,
//! `POST /v2/pools/{id}/resume`, `POST /v2/pools/{id}/generate` (body: an engine
//! [`GenerateRequest`](crate::engine::GenerateRequest), answer: the engine's SSE stream),
//! `GET /health`.
//!
//! Routes served by orchestratord for nodes: `POST /v2/nodes/register` ([`Registration`]),
//! `POST /v2/nodes/{id}/heartbeat` ([`Heartbeat`]; 404 `NODE_UNAVAILABLE` when the control
//! plane does not know the node, which then registers again).

use serde::{Deserialize, Serialize};

mod validate;

/// Default seconds between heartbeats.
pub const HEARTBEAT_SECS: u64 = 5;
/// A node that missed this many heartbeat intervals is offline.
pub const MISSED_HEARTBEATS_OFFLINE: u32 = 3;

/// Bounds on what a node may report. The control plane refuses a registration or heartbeat
/// beyond any of them with 400 `INVALID_PARAMS` naming the field; none is near what a real node
/// sends, and together they keep every sum over nodes far from overflowing.
pub mod limits {
    /// Seconds between heartbeats a node may ask for.
    pub const HEARTBEAT_SECS: std::ops::RangeInclusive<u64> = 1..=300;
    /// Pools on one node.
    pub const MAX_POOLS: usize = 256;
    /// Slots of one pool.
    pub const MAX_SLOTS: u32 = 1024;
    /// Context tokens per slot.
    pub const MAX_CTX_PER_SLOT: u32 = 1 << 24;
    /// Model ids a node reports as staged.
    pub const MAX_STAGED_MODELS: usize = 1024;
    /// Bytes of a node address.
    pub const MAX_ADDRESS_BYTES: usize = 256;
    /// Bytes of short free text: versions, device lists.
    pub const MAX_TEXT_BYTES: usize = 256;
    /// Bytes of a pool's `last_error` (the node cuts a longer one before sending it).
    pub const MAX_LAST_ERROR_BYTES: usize = 8192;
    /// GPUs of one node.
    pub const MAX_GPUS: usize = 64;
    /// A GPU temperature a node may report, in degrees Celsius.
    pub const MAX_GPU_CELSIUS: u32 = 200;
    /// A model load time a node may report: one day.
    pub const MAX_LOAD_MS: u64 = 86_400_000;
    /// Bytes of a registration or heartbeat body: room for the largest valid one (every pool
    /// with a whole `last_error`), so an oversized report is refused by its field, not its size.
    pub const MAX_BODY_BYTES: usize = 4 << 20;
}

/// Life cycle of a pool on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    /// The provisioner is staging and verifying the model.
    Provisioning,
    /// The engine is starting or loading the model.
    Loading,
    /// The engine's handoff file is present: it serves requests.
    Ready,
    /// Takes no new work; in-flight work finishes.
    Draining,
    /// Provisioning or the engine failed; `last_error` says why. The node retries with backoff.
    Failed,
    /// An on-demand pool whose model is not loaded: the first request starts its engine.
    Standby,
    /// The control plane's word, never a node's: the pool's node missed its heartbeats, so
    /// nothing is known of the pool and nothing is placed on it. What `/v2/pools`, `llorch
    /// status`, D-Bus and `llorch_pools{state}` say of every pool of an offline node.
    Offline,
}

impl PoolState {
    /// Every state a node reports, in lifecycle order ([`PoolState::Offline`] is not one).
    pub const ALL: [PoolState; 6] = [
        Self::Provisioning,
        Self::Loading,
        Self::Ready,
        Self::Draining,
        Self::Failed,
        Self::Standby,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Failed => "failed",
            Self::Standby => "standby",
            Self::Offline => "offline",
        }
    }
}

impl std::fmt::Display for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One pool as its node reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub pool_id: String,
    pub model_id: String,
    pub state: PoolState,
    pub slots_total: u32,
    /// Requests the node is forwarding to this pool's engine right now.
    pub slots_busy: u32,
    pub ctx_per_slot: u32,
    /// `cpu`, or the devices the engine runs on.
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_version: Option<String>,
    /// Process id of the running engine, when one runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_pid: Option<u32>,
    /// Times the engine was restarted after it exited unexpectedly.
    #[serde(default)]
    pub restarts: u32,
    /// The last failure (provisioning or engine exit), kept after recovery for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Set by an operator's drain; survives engine restarts until resume.
    #[serde(default)]
    pub draining: bool,
    /// The engine is started by the first request and unloaded after its keep-alive
    /// (`standby` while unloaded).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_demand: bool,
    /// How long the engine last took from its start to ready, in milliseconds: what a request
    /// to a `standby` pool waits before its first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<u64>,
    /// The node's count of operator changes (drain, resume) when this status was read; 0 when
    /// the node does not count. The control plane keeps the status of the highest count it
    /// has seen, so a heartbeat that was on its way while a drain was answered cannot undo it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: u64,
    /// GPU pools: the VRAM its engine needs on its GPUs (the provisioner's estimate from the
    /// model's header, CUDA's own share included), once the model is staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_need_bytes: Option<u64>,
    /// GPU pools on a node with NVML: the free VRAM of the pool's GPUs when this status was
    /// read. Placement does not load a standby pool whose need is larger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vram_free_bytes: Option<u64>,
    /// What the pool is charged against its node's memory budgets while loaded (bytes, summed
    /// over its devices), once the model is staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_charge_bytes: Option<u64>,
    /// The charge counts now: loaded, loading, or admitted to load.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_charged: bool,
    /// Never unloaded to make room for another pool.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// How many times the pool was unloaded to make room for another.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub swaps: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl PoolStatus {
    /// A pool with its identity, state and size; the counters and optional fields empty.
    pub fn new(
        pool_id: impl Into<String>,
        model_id: impl Into<String>,
        state: PoolState,
        slots_total: u32,
        ctx_per_slot: u32,
    ) -> Self {
        Self {
            pool_id: pool_id.into(),
            model_id: model_id.into(),
            state,
            slots_total,
            slots_busy: 0,
            ctx_per_slot,
            device: "cpu".into(),
            engine_version: None,
            engine_pid: None,
            restarts: 0,
            last_error: None,
            draining: false,
            on_demand: false,
            load_ms: None,
            seq: 0,
            vram_need_bytes: None,
            vram_free_bytes: None,
            memory_charge_bytes: None,
            memory_charged: false,
            pinned: false,
            swaps: 0,
        }
    }
}

/// One GPU of a node, as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuStatus {
    /// NVML's (and CUDA's, in PCI bus order) index on the node: `cuda:N` in node.toml.
    pub index: u32,
    /// `GPU-…`, stable across reboots and slots.
    pub uuid: String,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_free_bytes: u64,
    /// Percent of the last sample period a kernel ran, when NVML says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<u32>,
}

/// A node's GPUs and driver; empty on a CPU node (no NVML).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuReport {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// The newest CUDA version the driver supports, `major.minor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    #[serde(default)]
    pub devices: Vec<GpuStatus>,
}

impl GpuReport {
    /// No driver and no device: a CPU node.
    pub fn is_empty(&self) -> bool {
        self.driver_version.is_none() && self.cuda_version.is_none() && self.devices.is_empty()
    }
}

/// `POST /v2/nodes/register`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub node_id: String,
    /// Where the control plane reaches the node API: `unix:/path/to.sock` or `http://host:port`.
    pub address: String,
    pub version: String,
    pub heartbeat_secs: u64,
    pub pools: Vec<PoolStatus>,
    /// Model ids staged in the node's cache.
    #[serde(default)]
    pub staged_models: Vec<String>,
    /// The node's GPUs; left out by a CPU node (so an older control plane accepts it).
    #[serde(default, skip_serializing_if = "GpuReport::is_empty")]
    pub gpus: GpuReport,
    /// Its memory budgets and what is charged on each (docs/OPERATIONS.md, "Many models on
    /// one box").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<DeviceMemory>,
}

/// One budgeted device of a node (`host`, or `gpu:<id>` as node.toml names the GPU): its
/// memory budget for loaded pools and what the pools it charges hold now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMemory {
    pub device: String,
    pub budget_bytes: u64,
    pub charged_bytes: u64,
}

/// `POST /v2/nodes/{id}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub pools: Vec<PoolStatus>,
    #[serde(default)]
    pub staged_models: Vec<String>,
    /// Free memory and utilization move: every heartbeat carries them.
    #[serde(default, skip_serializing_if = "GpuReport::is_empty")]
    pub gpus: GpuReport,
    /// The memory budgets and charges, as in [`Registration::memory`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<DeviceMemory>,
}

/// The control plane's answer to a registration or heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeAck {
    pub node_id: String,
    /// Seconds until the control plane marks the node offline without another heartbeat.
    pub offline_after_secs: u64,
    /// In the answer to a registration, when the control plane takes liveness beats: the
    /// node may beat ([`crate::beat`]) between full reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beat: Option<crate::beat::BeatGrant>,
    /// In the answer to a heartbeat of a node with a beat session: the highest beat counter the
    /// control plane took. A node whose beats since its last report were none of them taken
    /// knows they do not arrive (UDP filtered) and heartbeats over HTTP instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beat_counter: Option<u64>,
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut.
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    const MARK: &str = " [...]";
    let mut end = max.saturating_sub(MARK.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{MARK}", &text[..end])
}
