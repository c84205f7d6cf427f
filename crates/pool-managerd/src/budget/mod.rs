//! Many models on one box: the node's memory budgets, what each pool is charged, and the
//! decision of which idle pools to unload to make room (`room.rs`, a pure function). Carrying
//! it out for a request or an operator's load is [`crate::swap`]'s job.
//!
//! A pool's charge is what it may hold: a CPU pool its engine's memory bound (the same number
//! the systemd launcher sets as the engine unit's `MemoryMax=`, so the kernel holds the engine
//! to it), a GPU pool what the provisioner's plan puts on each of its GPUs. Charging the bound
//! rather than the engine's resident memory keeps the sum of the charges an upper bound of
//! what the engines can take, whatever their prefix caches grow to.

pub mod room;

use llorch_wire::node::GpuReport;
use llorch_wire::plan::EnginePlan;

pub use room::{decide, Budgets, Decision, Device, Resident};

use crate::config::{NodeConfig, PoolConfig};

/// An admission that no engine start followed within this long stops being charged.
pub const ADMITTED_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// The budgets and the swap rule's settings of a node.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub budgets: Budgets,
    pub min_resident: std::time::Duration,
}

/// The default host budget: this share (percent) of `MemAvailable` when pool-managerd starts.
pub const HOST_SHARE_PERCENT: u64 = 75;

/// The node's budgets from its configuration, the memory available now (`available`, bytes)
/// and NVML's report (`gpus`, None without NVML).
pub fn budgets(
    node: &NodeConfig,
    pools: &[PoolConfig],
    available: Option<u64>,
    gpus: Option<&GpuReport>,
) -> Budgets {
    let mut bytes = std::collections::BTreeMap::new();
    let host = node
        .memory_budget_mib
        .map(|m| m.saturating_mul(1 << 20))
        .or_else(|| available.map(|a| a / 100 * HOST_SHARE_PERCENT));
    if let Some(h) = host {
        bytes.insert(Device::Host, h);
    }
    for pool in pools {
        for gpu in pool.gpus() {
            let total = node
                .gpu_memory_budget_mib
                .map(|m| m.saturating_mul(1 << 20))
                .or_else(|| gpus.and_then(|r| crate::gpu::total_of(r, &gpu)));
            if let Some(t) = total {
                bytes.insert(Device::Gpu(gpu.to_string()), t);
            }
        }
    }
    Budgets {
        bytes,
        max_loaded: node.max_loaded,
    }
}

/// What `pool` is charged while loaded, from its plan: a CPU pool its engine's memory bound on
/// the host (the model file and a quarter more when the header does not size the KV cache),
/// a GPU pool the plan's bytes on each GPU (its estimate split evenly when the plan was made
/// without NVML).
pub fn charge(pool: &PoolConfig, plan: &EnginePlan) -> Vec<(Device, u64)> {
    let gpus = pool.gpus();
    if gpus.is_empty() {
        let prefix = plan.prefix_cache_mib.unwrap_or(0).saturating_mul(1 << 20);
        let bound = crate::launcher::engine_memory_bound(
            pool,
            plan.model.size_bytes,
            plan.model.kv_bytes_per_token,
            prefix,
        )
        .unwrap_or_else(|| {
            let size = plan.model.size_bytes;
            size.saturating_add(size / 4)
                .saturating_add(crate::launcher::MEMORY_MARGIN)
        });
        return vec![(Device::Host, bound)];
    }
    let per_gpu = plan.memory.as_ref().map(|m| {
        if m.per_gpu_bytes.len() == gpus.len() {
            m.per_gpu_bytes.clone()
        } else {
            let total = m
                .gpu_weights_bytes
                .saturating_add(m.gpu_kv_bytes)
                .saturating_add(m.compute_bytes);
            vec![total / gpus.len() as u64; gpus.len()]
        }
    });
    match per_gpu {
        Some(each) => gpus
            .iter()
            .zip(each)
            .map(|(g, b)| (Device::Gpu(g.to_string()), b))
            .collect(),
        // No estimate: the model file, spread over the GPUs.
        None => gpus
            .iter()
            .map(|g| {
                (
                    Device::Gpu(g.to_string()),
                    plan.model.size_bytes / gpus.len() as u64,
                )
            })
            .collect(),
    }
}
