//! Building and writing the engine plan for a pool.

use std::path::Path;

use llorch_gguf::memory::{self, mib, Fit, Request};
use llorch_wire::plan::{EnginePlan, PlannedMemory, PlannedModel, PLAN_VERSION};

use crate::cache::Staged;
use crate::ProvisionError;

/// What the operator chose for the pool; the model part comes from staging.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub pool_id: String,
    pub model_id: String,
    pub slots: u32,
    pub ctx_per_slot: u32,
    pub threads: Option<u32>,
    pub gpu_layers: u32,
    pub socket: String,
    pub handoff_dir: String,
    /// Seconds without work after which the engine unloads (on-demand pools); None: never.
    pub idle_exit_secs: Option<u64>,
    /// The engine's host prefix cache in MiB (0: off; None: the engine's default).
    pub prefix_cache_mib: Option<u64>,
    /// Free bytes of each of the pool's GPUs, in the pool's order (pool-managerd reads them
    /// from NVML); empty when unknown, and then nothing is refused.
    pub gpu_free_bytes: Vec<u64>,
    /// Refuse the pool when the model does not fit its GPUs, instead of offloading only the
    /// layers that fit and running the rest on the CPU.
    pub gpu_only: bool,
    /// Serve embeddings too.
    pub embeddings: bool,
}

/// Tokens per micro-batch of the engine (`llorch_engine::decode::BATCH_TOKENS`).
pub const ENGINE_UBATCH: u32 = 512;

/// The plan for `settings` and the staged model; for a GPU pool with known free memory, the
/// memory estimate decides how many layers are offloaded, or refuses the pool.
pub fn build(settings: &PoolSettings, staged: &Staged) -> Result<EnginePlan, ProvisionError> {
    let mut gpu_layers = settings.gpu_layers;
    let request = Request {
        slots: settings.slots,
        ctx_per_slot: settings.ctx_per_slot,
        gpu_layers,
        ubatch: ENGINE_UBATCH,
    };
    let memory = match memory::estimate(&staged.info, request) {
        Ok(estimate) => {
            let free = &settings.gpu_free_bytes;
            let mut chosen = estimate.clone();
            let mut per_gpu = Vec::new();
            if gpu_layers > 0 && !free.is_empty() {
                match estimate.fit(&staged.info, request, free) {
                    Fit::Fits { per_gpu: p } => per_gpu = p,
                    Fit::Partial { layers, per_gpu: p } => {
                        let detail = does_not_fit(settings, &estimate, free);
                        if settings.gpu_only {
                            return Err(ProvisionError::DoesNotFit(detail));
                        }
                        tracing::warn!(
                            pool = %settings.pool_id,
                            layers_on_gpu = layers,
                            layers = estimate.layers,
                            "{detail}; gpu_only is off, so {layers} of {} layers go to the GPUs and the rest run on the CPU (slower).",
                            estimate.layers
                        );
                        gpu_layers = layers;
                        per_gpu = p;
                        chosen = memory::estimate(
                            &staged.info,
                            Request {
                                gpu_layers,
                                ..request
                            },
                        )
                        .unwrap_or(estimate);
                    }
                }
            }
            Some(PlannedMemory {
                layers: chosen.layers,
                offloaded_layers: chosen.offloaded_layers,
                gpu_weights_bytes: chosen.gpu_weights,
                cpu_weights_bytes: chosen.cpu_weights,
                gpu_kv_bytes: chosen.gpu_kv,
                cpu_kv_bytes: chosen.cpu_kv,
                compute_bytes: chosen.compute,
                per_gpu_bytes: per_gpu,
                gpu_free_bytes: free.clone(),
            })
        }
        Err(e) => {
            if settings.gpu_only && gpu_layers > 0 && !settings.gpu_free_bytes.is_empty() {
                return Err(ProvisionError::DoesNotFit(format!(
                    "pool {}: {e}, so gpu_only cannot be checked",
                    settings.pool_id
                )));
            }
            tracing::info!(pool = %settings.pool_id, "No memory estimate: {e}.");
            None
        }
    };
    Ok(EnginePlan {
        version: PLAN_VERSION,
        pool_id: settings.pool_id.clone(),
        model: PlannedModel {
            id: settings.model_id.clone(),
            path: staged.path.display().to_string(),
            sha256: staged.sha256.clone(),
            size_bytes: staged.size_bytes,
            architecture: staged.info.architecture().map(str::to_string),
            context_length: staged.info.context_length(),
            has_chat_template: staged.info.has_chat_template(),
            kv_bytes_per_token: staged.info.kv_bytes_per_token(),
        },
        slots: settings.slots,
        ctx_per_slot: settings.ctx_per_slot,
        threads: settings.threads,
        gpu_layers,
        socket: settings.socket.clone(),
        handoff_dir: settings.handoff_dir.clone(),
        idle_exit_secs: settings.idle_exit_secs.filter(|s| *s > 0),
        prefix_cache_mib: settings.prefix_cache_mib,
        embeddings: settings.embeddings,
        memory,
    })
}

/// The refusal, with every number an operator needs to choose what to change.
fn does_not_fit(settings: &PoolSettings, e: &memory::Estimate, free: &[u64]) -> String {
    let per_gpu = e.split(free);
    let gpus: Vec<String> = per_gpu
        .iter()
        .zip(free)
        .enumerate()
        .map(|(i, (need, have))| format!("GPU {i}: needs {}, has {} free", mib(*need), mib(*have)))
        .collect();
    format!(
        "pool {} does not fit its GPUs ({}): weights {}, KV cache {} ({} slots x {} tokens), \
         compute buffer {}, CUDA's own {} per GPU; lower ctx or slots, use a smaller quantization \
         or add a GPU to the pool",
        settings.pool_id,
        gpus.join("; "),
        mib(e.gpu_weights),
        mib(e.gpu_kv),
        settings.slots,
        settings.ctx_per_slot,
        mib(e.compute),
        mib(memory::CUDA_OVERHEAD_BYTES),
    )
}

/// Writes the plan atomically, so an engine never reads half a plan.
pub fn write(path: &Path, plan: &EnginePlan) -> Result<(), ProvisionError> {
    let bytes = serde_json::to_vec_pretty(plan).expect("plans serialize");
    llorch_os::fs::write_atomic(path, &bytes).map_err(|source| ProvisionError::CacheWrite {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_gguf::write::ggml::{Q4_0, Q6_K};
    use llorch_gguf::write::{Header, LlamaShape};

    /// A Llama-2-70B-shaped Q4_0 header (output head Q6_K, norms F32).
    fn llama_70b() -> llorch_gguf::GgufInfo {
        Header::llama(LlamaShape {
            layers: 80,
            embd: 8192,
            ff: 28672,
            heads: 64,
            kv_heads: 8,
            vocab: 32_000,
            ty: Q4_0,
            output_ty: Q6_K,
        })
        .info()
    }

    #[test]
    fn the_refusal_gives_each_gpus_need_and_free_memory_and_what_to_change() {
        let info = llama_70b();
        let settings = PoolSettings {
            pool_id: "big".into(),
            model_id: "llama-70b".into(),
            slots: 2,
            ctx_per_slot: 2048,
            threads: None,
            gpu_layers: 999,
            socket: String::new(),
            handoff_dir: String::new(),
            idle_exit_secs: None,
            prefix_cache_mib: None,
            gpu_free_bytes: vec![23_500 << 20, 11_600 << 20],
            gpu_only: true,
            embeddings: false,
        };
        let request = Request {
            slots: 2,
            ctx_per_slot: 2048,
            gpu_layers: 999,
            ubatch: ENGINE_UBATCH,
        };
        let e = memory::estimate(&info, request).unwrap();
        let said = does_not_fit(&settings, &e, &settings.gpu_free_bytes);
        for part in [
            "pool big does not fit its GPUs (GPU 0: needs ",
            "has 23500.00 MiB free; GPU 1: needs ",
            "has 11600.00 MiB free)",
            "KV cache 1280.00 MiB (2 slots x 2048 tokens)",
            "CUDA's own 512.00 MiB per GPU",
        ] {
            assert!(said.contains(part), "{part:?} not in {said}");
        }
    }
}
