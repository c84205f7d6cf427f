//! The engine plan: everything `llorch-engine` needs to start one pool, written by
//! `engine-provisioner` once the model is staged and verified.

use serde::{Deserialize, Serialize};

/// Version of the plan format.
pub const PLAN_VERSION: u32 = 1;

/// Defaults for the engine's settings when neither the plan nor a flag gives them.
pub mod defaults {
    pub const SLOTS: u32 = 4;
    pub const CTX_PER_SLOT: u32 = 2048;

    /// The default bound of an engine's host prefix cache, in MiB: an eighth of the memory
    /// available (`MemAvailable`) when the pool is planned, at most 2 GiB; 256 MiB when the
    /// available memory is unknown.
    pub fn prefix_cache_mib(available_bytes: Option<u64>) -> u64 {
        match available_bytes {
            Some(b) => ((b / 8) >> 20).min(2048),
            None => 256,
        }
    }
}

/// The largest plan file a reader takes (the provisioner writes a few kilobytes).
pub const MAX_PLAN_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnginePlan {
    pub version: u32,
    pub pool_id: String,
    pub model: PlannedModel,
    /// Parallel sequences served by continuous batching.
    pub slots: u32,
    /// Context, in tokens, of each slot.
    pub ctx_per_slot: u32,
    /// CPU threads for decoding; absent means one per available core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Layers offloaded to the GPU (needs a CUDA build); 0 keeps the model on the CPU.
    #[serde(default)]
    pub gpu_layers: u32,
    pub socket: String,
    pub handoff_dir: String,
    /// Seconds without a generation request after which the engine exits cleanly (code 0) and
    /// removes its handoff file, freeing the model's memory (on-demand pools); absent or 0:
    /// it stays loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_exit_secs: Option<u64>,
    /// Host memory, in MiB, for prompt states kept after their slot moved on (the engine's
    /// prefix cache); 0: off; absent: the engine's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_cache_mib: Option<u64>,
    /// Serve embeddings too (`embed` requests), from a context of their own beside the slots.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub embeddings: bool,
    /// The provisioner's estimate of the engine's memory (absent when the header lacks the
    /// numbers); for GPU pools also how it fits the GPUs' free memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<PlannedMemory>,
}

/// The engine's memory, estimated from the GGUF header before loading (bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedMemory {
    /// The model's repeating layers, and how many of them are on the GPUs.
    pub layers: u32,
    pub offloaded_layers: u32,
    pub gpu_weights_bytes: u64,
    pub cpu_weights_bytes: u64,
    pub gpu_kv_bytes: u64,
    pub cpu_kv_bytes: u64,
    pub compute_bytes: u64,
    /// What each of the pool's GPUs will hold (weights, KV, compute, CUDA's own), in the
    /// pool's device order; empty for a CPU pool, or when the GPUs' free memory was unknown
    /// (the split follows it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_gpu_bytes: Vec<u64>,
    /// The GPUs' free memory the fit was computed against (from pool-managerd's NVML
    /// reading); empty when it was not known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_free_bytes: Vec<u64>,
}

impl PlannedMemory {
    /// Everything on the GPUs.
    pub fn gpu_total_bytes(&self) -> u64 {
        self.per_gpu_bytes
            .iter()
            .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedModel {
    pub id: String,
    /// Absolute path of the staged GGUF file in the node's model cache.
    pub path: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub architecture: Option<String>,
    /// The context length the model was trained with.
    pub context_length: Option<u64>,
    pub has_chat_template: bool,
    /// Bytes of f16 KV cache one token takes, from the header (the provisioner read it once,
    /// in its sandbox); pool-managerd sizes the engine's memory bound with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bytes_per_token: Option<u64>,
}
