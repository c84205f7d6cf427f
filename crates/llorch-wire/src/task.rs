//! The native task API of orchestratord (`/v2`): task requests, the 202 answer, task events,
//! sessions, and the views of pools, nodes and capabilities that clients and the CLI read.

use serde::{Deserialize, Serialize};

use crate::engine::{ChatMessage, FinishReason};
use crate::node::PoolState;
use crate::sampling::{sampling_fields, sampling_request};

/// Task priority: `interactive` tasks are always dispatched before `batch` tasks.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }
}

/// Placement hints of a task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementHints {
    /// Run only on this pool; an error when the pool does not exist or does not serve the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_pool_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefer_pools: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid_pools: Vec<String>,
    /// With `prefer_pools` or `prefer_nodes`: whether other pools may serve the task (default
    /// true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_fallback: Option<bool>,
    /// Run only on this node's pools (pool ids repeat across nodes; with `pin_pool_id`, that
    /// pool of that node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_node_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefer_nodes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub avoid_nodes: Vec<String>,
}

sampling_fields!(sampling_request! {
    /// `POST /v2/tasks`. Field names follow the original llama-orch design.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TaskRequest {
        /// Client-chosen id; generated when absent. A duplicate of a known task is a 409.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub task_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub session_id: Option<String>,
        /// A model id from `GET /v1/models` or `GET /v2/meta/capabilities`.
        pub model_ref: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub prompt: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub messages: Option<Vec<ChatMessage>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub max_tokens: Option<u32>,
        #[serde(default)]
        pub priority: Priority,
        /// Milliseconds from submission by which the task must have started.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub deadline_ms: Option<u64>,
    }
    // Then the sampling fields (`crate::sampling`), then these.
    {
        /// Structured output: the answer is JSON valid against this JSON Schema (`{"type":
        /// "object"}` for any object). See the engine's `GenerateRequest::json_schema`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub json_schema: Option<serde_json::Value>,
        /// Refuse schema keywords the grammar cannot enforce instead of ignoring them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub json_schema_strict: bool,
        /// A llama.cpp GBNF grammar the answer follows (not with `json_schema`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub grammar: Option<String>,
        /// Tools the model may call, `tool_choice` and `parallel_tool_calls`, as on
        /// `/v1/chat/completions`. The answer of a call is its JSON text (`{"name", "arguments"}`,
        /// or a list of them), in the `token` events.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub tools: Vec<crate::tools::Tool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tool_choice: Option<crate::tools::ToolChoice>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub parallel_tool_calls: bool,
        /// Answers to generate (1 to 16); `token` events carry their choice in `c`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub n: Option<u32>,
        /// Log-probabilities in each `token` event's `lp`, with this many alternatives (0 to 20).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub logprobs: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub placement: Option<PlacementHints>,
        /// Accepted for compatibility with the original API; only `completion` exists.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub workload: Option<String>,
        /// Accepted for compatibility; only `llamacpp` exists.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub engine: Option<String>,
        /// Accepted for compatibility: the context the task needs; checked against the pools.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub ctx: Option<u32>,
    }
});

/// The 202 answer to `POST /v2/tasks`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAccepted {
    pub task_id: String,
    /// Tasks ahead of this one for the same model (0: next to start).
    pub queue_position: u32,
    /// Predicted wait until the task starts, from the measured rate at which slots free up.
    pub predicted_start_ms: u64,
    pub streams: TaskStreams,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStreams {
    /// Path of the SSE event stream.
    pub sse: String,
}

/// SSE `started`: the task left the queue and runs on a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartedEvent {
    pub task_id: String,
    pub pool_id: String,
    pub node_id: String,
    pub queue_ms: u64,
}

/// SSE `metrics`: sent once, after the last token and before `end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsEvent {
    pub tokens_out: u32,
    /// Tokens of the prompt found in the slot's KV cache.
    pub cached_tokens: u32,
    pub tokens_per_second: f64,
}

/// SSE `end`: the last event of a task that finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEnd {
    pub task_id: String,
    pub tokens_in: u32,
    /// Prompt tokens that came from the engine's prefix cache instead of being computed.
    #[serde(default)]
    pub cached_tokens: u32,
    pub tokens_out: u32,
    pub queue_ms: u64,
    /// From submission to the first token, as orchestratord saw it.
    pub ttft_ms: u64,
    pub decode_time_ms: u64,
    pub finish_reason: FinishReason,
    /// With `n` > 1: how each choice ended (`tokens_out` is their sum).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<crate::engine::ChoiceEnd>,
    /// The stop string that ended the (last) answer, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequence: Option<String>,
    /// An embedding request's vectors, one per input in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<Vec<f32>>,
}

/// `GET /v2/tasks/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub task_id: String,
    /// `queued`, `running`, `done`, `failed` or `canceled`.
    pub state: String,
    pub model_ref: String,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
}

/// `GET /v2/sessions/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: String,
    pub pool_id: String,
    /// The slot holding the session's KV cache, sent to the engine as a preference.
    pub slot: u32,
    pub turns: u32,
    pub expires_in_ms: u64,
}

/// One pool in `GET /v2/pools`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolView {
    pub pool_id: String,
    pub node_id: String,
    pub model_id: String,
    pub state: PoolState,
    pub node_online: bool,
    pub slots_total: u32,
    /// Slots leased to running tasks by orchestratord.
    pub slots_busy: u32,
    pub ctx_per_slot: u32,
    pub device: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_version: Option<String>,
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Loaded by its first request, unloaded after its keep-alive.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub on_demand: bool,
    /// The engine's last load time, start to ready, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<u64>,
    /// What the pool is charged against its node's memory budgets while loaded (bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_charge_bytes: Option<u64>,
    /// The charge counts now (loaded, loading or admitted to load).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_charged: bool,
    /// Never unloaded to make room for another pool.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// Times the pool was unloaded to make room for another.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub swaps: u64,
}

/// One node in `GET /v2/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub node_id: String,
    pub address: String,
    pub online: bool,
    /// `online`, `suspect` (missed its last heartbeat: nothing new is placed on it) or
    /// `offline` (missed 3: its tasks ended with `NODE_UNAVAILABLE`).
    #[serde(default)]
    pub state: String,
    /// Drained by an operator: nothing new is placed on it.
    #[serde(default)]
    pub draining: bool,
    /// Tasks running on its pools now (a drained node is empty at 0).
    #[serde(default)]
    pub running: u32,
    pub version: String,
    /// Milliseconds since the last registration or heartbeat.
    pub last_seen_ms: u64,
    pub pools: Vec<String>,
    pub staged_models: Vec<String>,
    /// Its GPUs, as its last report gave them (`devices` empty on a CPU node).
    #[serde(default)]
    pub gpus: crate::node::GpuReport,
    /// Its memory budgets and what its loaded pools are charged on each device, as its last
    /// report gave them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory: Vec<crate::node::DeviceMemory>,
}

/// `GET /v2/pools`: pools and the queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolsAnswer {
    pub pools: Vec<PoolView>,
    pub queue: QueueView,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    pub depth: u32,
    pub capacity: u32,
    pub interactive: u32,
    pub batch: u32,
    pub running: u32,
    pub policy: String,
}

/// `GET /v2/meta/capabilities`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    pub api_version: String,
    pub pools: Vec<PoolCapability>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolCapability {
    pub pool_id: String,
    pub model_id: String,
    pub ctx_per_slot: u32,
    pub slots: u32,
    pub engine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine_version: Option<String>,
    pub state: PoolState,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
