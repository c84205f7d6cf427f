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

/// Default seconds between heartbeats.
pub const HEARTBEAT_SECS: u64 = 5;
/// A node that missed this many heartbeat intervals is offline.
pub const MISSED_HEARTBEATS_OFFLINE: u32 = 3;

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
}

impl PoolState {
    /// Every state, in lifecycle order.
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
}

/// `POST /v2/nodes/{id}/heartbeat`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub pools: Vec<PoolStatus>,
    #[serde(default)]
    pub staged_models: Vec<String>,
}

/// The control plane's answer to a registration or heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeAck {
    pub node_id: String,
    /// Seconds until the control plane marks the node offline without another heartbeat.
    pub offline_after_secs: u64,
}
