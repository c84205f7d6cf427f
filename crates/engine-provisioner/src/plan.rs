//! Building and writing the engine plan for a pool.

use std::path::Path;

use llorch_wire::plan::{EnginePlan, PlannedModel, PLAN_VERSION};

use crate::cache::{write_atomically, Staged};
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
}

pub fn build(settings: &PoolSettings, staged: &Staged) -> EnginePlan {
    EnginePlan {
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
        gpu_layers: settings.gpu_layers,
        socket: settings.socket.clone(),
        handoff_dir: settings.handoff_dir.clone(),
        idle_exit_secs: settings.idle_exit_secs.filter(|s| *s > 0),
    }
}

/// Writes the plan atomically, so an engine never reads half a plan.
pub fn write(path: &Path, plan: &EnginePlan) -> Result<(), ProvisionError> {
    let bytes = serde_json::to_vec_pretty(plan).expect("plans serialize");
    write_atomically(path, &bytes).map_err(|source| ProvisionError::CacheWrite {
        path: path.to_owned(),
        source,
    })
}
