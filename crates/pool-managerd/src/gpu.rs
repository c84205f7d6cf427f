//! The node's GPUs, from NVML (the NVIDIA driver's management library, loaded at run time by
//! nvml-wrapper): read at start and for every registration and heartbeat, so the control plane
//! and `llorch status` see each GPU's memory, utilization and temperature. Without the
//! library (no NVIDIA driver) the node is a CPU node: said once at start, and its reports carry
//! no `gpus`.
//!
//! Under systemd a GPU pool's engine unit also needs its devices: [`engine_dropin`] is the
//! drop-in `llama-orch-gpu-generator` (a systemd generator, `src/bin/`) writes for each GPU
//! pool of node.toml at boot and on every `systemctl daemon-reload`.

use llorch_wire::node::{GpuReport, GpuStatus};

use crate::config::{Gpu, PoolConfig};

/// The drop-in file's name in `llorch-engine@<pool>.service.d/`.
pub const DROPIN_NAME: &str = "50-llama-orch-gpu.conf";

/// Where the NVIDIA driver describes each GPU it drives (`<pci address>/information`).
pub const PROC_GPUS: &str = "/proc/driver/nvidia/gpus";

/// GPU UUID → device minor (`/dev/nvidiaN`), as the loaded driver reports them under
/// `dir` ([`PROC_GPUS`]): what a pool bound by UUID opens. Empty when no driver is loaded.
pub fn driver_minors(dir: &std::path::Path) -> std::collections::HashMap<String, u32> {
    let mut minors = std::collections::HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return minors;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("information")) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        if let (Some(uuid), Some(minor)) = (
            field("GPU UUID:"),
            field("Device Minor:").and_then(|m| m.parse().ok()),
        ) {
            minors.insert(uuid, minor);
        }
    }
    minors
}

/// The engine unit's drop-in for a GPU pool; None for a CPU pool. The unit has
/// `PrivateDevices=yes` (no device at all); this opens exactly the pool's `/dev/nvidiaN` and
/// the driver's shared nodes (`nvidiactl`, `nvidia-uvm`, `nvidia-uvm-tools`, the MIG
/// capabilities read-only) under `DevicePolicy=closed`, lets CUDA read `/proc/driver/nvidia`
/// (`ProcSubset=all`), and makes CUDA's numbering the driver's (PCI bus order, as NVML and the
/// device minors count) so `cuda:N` is `/dev/nvidiaN`. A GPU named by UUID opens the node the
/// driver gives it in `minors` ([`driver_minors`]); one the driver does not know opens
/// nothing, and the drop-in says so.
pub fn engine_dropin(
    pool: &PoolConfig,
    minors: &std::collections::HashMap<String, u32>,
) -> Option<String> {
    let visible = pool.cuda_visible_devices()?;
    let mut text = format!(
        "# Written by llama-orch-gpu-generator from node.toml: pool {}, devices {}.\n\
         [Service]\n\
         Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID\n\
         Environment=CUDA_VISIBLE_DEVICES={visible}\n\
         PrivateDevices=no\n\
         DevicePolicy=closed\n\
         DeviceAllow=/dev/nvidiactl rw\n\
         DeviceAllow=/dev/nvidia-uvm rw\n\
         DeviceAllow=/dev/nvidia-uvm-tools rw\n\
         DeviceAllow=char-nvidia-caps r\n",
        pool.id, pool.devices
    );
    for gpu in pool.gpus() {
        match &gpu {
            Gpu::Index(n) => text.push_str(&format!("DeviceAllow=/dev/nvidia{n} rw\n")),
            Gpu::Uuid(u) => match minors.get(u) {
                Some(n) => text.push_str(&format!("DeviceAllow=/dev/nvidia{n} rw\n")),
                None => text.push_str(&format!(
                    "# {u} is not a GPU the NVIDIA driver knows now ({PROC_GPUS}): no device \
                     opened for it. Load the driver, then run systemctl daemon-reload.\n"
                )),
            },
        }
    }
    text.push_str("ProcSubset=all\n");
    Some(text)
}

/// The drop-in of `pool-managerd.service` on a node with GPU pools (None without): the node
/// agent reads every GPU through NVML (its reports, the fit check), and NVML numbers them as
/// the driver does only when it can open them all, so it may open the driver's control device
/// and its GPU device class (major 195, named `nvidia-frontend` or `nvidia` in
/// `/proc/devices`), under `DevicePolicy=closed`; not `nvidia-uvm`, which only CUDA uses. The
/// NixOS module writes the same settings (tests/nix.rs compares them).
pub fn node_agent_dropin(pools: &[PoolConfig]) -> Option<String> {
    let gpu_pools: Vec<&str> = pools
        .iter()
        .filter(|p| p.cuda_visible_devices().is_some())
        .map(|p| p.id.as_str())
        .collect();
    if gpu_pools.is_empty() {
        return None;
    }
    Some(format!(
        "# Written by llama-orch-gpu-generator from node.toml: GPU pools {}.\n\
         [Service]\n\
         PrivateDevices=no\n\
         DevicePolicy=closed\n\
         DeviceAllow=/dev/nvidiactl rw\n\
         DeviceAllow=char-nvidia-frontend rw\n\
         DeviceAllow=char-nvidia rw\n\
         ProcSubset=all\n",
        gpu_pools.join(", ")
    ))
}

/// The GPU of `report` that `gpu` names (by CUDA index or UUID).
fn find<'a>(report: &'a GpuReport, gpu: &Gpu) -> Option<&'a GpuStatus> {
    report.devices.iter().find(|d| match gpu {
        Gpu::Index(n) => d.index == *n,
        Gpu::Uuid(u) => d.uuid == *u,
    })
}

/// The free bytes of each of `gpus` in `report`, in their order; the `Err` names a GPU the
/// report lacks.
pub fn free_each(report: &GpuReport, gpus: &[Gpu]) -> Result<Vec<u64>, String> {
    gpus.iter()
        .map(|g| {
            find(report, g)
                .map(|d| d.memory_free_bytes)
                .ok_or_else(|| format!("NVML does not report GPU {g}"))
        })
        .collect()
}

/// The total memory of `gpu` in `report`, when NVML reports it.
pub fn total_of(report: &GpuReport, gpu: &Gpu) -> Option<u64> {
    find(report, gpu).map(|d| d.memory_total_bytes)
}

/// The free bytes of `gpus` together in `report`; None for a CPU pool or when one of them is
/// not in the report.
pub fn free_of(report: &GpuReport, gpus: &[Gpu]) -> Option<u64> {
    let each = free_each(report, gpus).ok().filter(|e| !e.is_empty())?;
    Some(each.iter().fold(0u64, |a, b| a.saturating_add(*b)))
}

pub struct Inventory {
    nvml: Option<nvml_wrapper::Nvml>,
}

impl std::fmt::Debug for Inventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inventory")
            .field("nvml", &self.nvml.is_some())
            .finish()
    }
}

impl Inventory {
    /// Loads NVML, or says once that this is a CPU node.
    pub fn probe() -> Self {
        match nvml_wrapper::Nvml::init() {
            Ok(nvml) => {
                let inventory = Self { nvml: Some(nvml) };
                let report = inventory.read();
                tracing::info!(
                    gpus = report.devices.len(),
                    driver = report.driver_version.as_deref().unwrap_or("?"),
                    cuda = report.cuda_version.as_deref().unwrap_or("?"),
                    names = ?report.devices.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
                    "NVML loaded: reporting the GPUs."
                );
                inventory
            }
            Err(e) => {
                tracing::info!(reason = %e, "NVML is not available: a CPU node (no GPU inventory or metrics).");
                Self { nvml: None }
            }
        }
    }

    /// A CPU node's inventory, without looking for NVML (tests).
    pub fn none() -> Self {
        Self { nvml: None }
    }

    pub fn has_nvml(&self) -> bool {
        self.nvml.is_some()
    }

    /// Free bytes of each of `gpus` now, in their order; an `Err` says why they are unknown
    /// (a CPU node, or a GPU NVML does not report).
    pub fn free_bytes(&self, gpus: &[Gpu]) -> Result<Vec<u64>, String> {
        if self.nvml.is_none() {
            return Err("NVML is not available".into());
        }
        free_each(&self.read(), gpus)
    }

    /// What NVML says now; a GPU it cannot read (fallen off the bus) is left out, and a value
    /// it cannot give is absent. Empty on a CPU node.
    pub fn read(&self) -> GpuReport {
        let Some(nvml) = &self.nvml else {
            return GpuReport::default();
        };
        let count = nvml.device_count().unwrap_or(0);
        let devices = (0..count)
            .filter_map(|i| {
                let dev = nvml.device_by_index(i).ok()?;
                let mem = dev.memory_info().ok()?;
                Some(GpuStatus {
                    index: i,
                    uuid: dev.uuid().ok()?,
                    name: dev.name().unwrap_or_else(|_| "unknown".into()),
                    memory_total_bytes: mem.total,
                    memory_used_bytes: mem.used.min(mem.total),
                    memory_free_bytes: mem.free.min(mem.total),
                    utilization_percent: dev.utilization_rates().ok().map(|u| u.gpu.min(100)),
                    temperature_celsius: dev
                        .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                        .ok()
                        .map(|t| t.min(llorch_wire::node::limits::MAX_GPU_CELSIUS)),
                })
            })
            .take(llorch_wire::node::limits::MAX_GPUS)
            .collect();
        GpuReport {
            driver_version: nvml.sys_driver_version().ok(),
            cuda_version: nvml
                .sys_cuda_driver_version()
                .ok()
                .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10)),
            devices,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gpu_pool_gets_exactly_its_devices_and_a_cpu_pool_nothing() {
        let text = include_str!("../examples/node.toml")
            .replace("devices = \"cpu\"", "devices = \"cuda:0,2\"");
        let cfg = crate::config::parse(std::path::Path::new("node.toml"), &text).unwrap();
        let dropin = engine_dropin(&cfg.pools()[0], &Default::default()).unwrap();
        let allowed: Vec<&str> = dropin
            .lines()
            .filter_map(|l| l.strip_prefix("DeviceAllow="))
            .collect();
        assert_eq!(
            allowed,
            [
                "/dev/nvidiactl rw",
                "/dev/nvidia-uvm rw",
                "/dev/nvidia-uvm-tools rw",
                "char-nvidia-caps r",
                "/dev/nvidia0 rw",
                "/dev/nvidia2 rw"
            ]
        );
        assert!(
            dropin.contains("\nEnvironment=CUDA_VISIBLE_DEVICES=0,2\n"),
            "{dropin}"
        );
        assert!(
            dropin.contains("\nPrivateDevices=no\nDevicePolicy=closed\n"),
            "{dropin}"
        );
        let cpu = crate::config::parse(
            std::path::Path::new("node.toml"),
            include_str!("../examples/node.toml"),
        )
        .unwrap();
        assert_eq!(engine_dropin(&cpu.pools()[0], &Default::default()), None);
        // The node agent: NVML's devices on a GPU node, nothing on a CPU node.
        let agent = node_agent_dropin(cfg.pools()).unwrap();
        assert!(
            agent.contains(
                "\nPrivateDevices=no\nDevicePolicy=closed\nDeviceAllow=/dev/nvidiactl rw\n"
            ),
            "{agent}"
        );
        assert!(!agent.contains("nvidia-uvm"), "{agent}");
        assert_eq!(node_agent_dropin(cpu.pools()), None);
    }

    #[test]
    fn a_pool_bound_by_uuid_opens_the_node_the_driver_gives_that_uuid() {
        // The driver's own description of two GPUs, as /proc/driver/nvidia/gpus shows them.
        let proc = tempfile::tempdir().unwrap();
        let (a, b) = (
            "GPU-8d2a5f31-1c44-4b6e-9a0b-3f9e2c7d1e11",
            "GPU-41c0e2aa-77d3-4c2b-8e1f-5a6b7c8d9e02",
        );
        for (bus, uuid, minor) in [("0000:18:00.0", a, 0), ("0000:3b:00.0", b, 1)] {
            let dir = proc.path().join(bus);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(
                dir.join("information"),
                format!("Model: \t\t NVIDIA GeForce RTX 4090\nGPU UUID: \t {uuid}\nBus Location: \t {bus}\nDevice Minor: \t {minor}\n"),
            )
            .unwrap();
        }
        let minors = driver_minors(proc.path());
        assert_eq!(minors.len(), 2);
        let text = include_str!("../examples/node.toml")
            .replace("devices = \"cpu\"", &format!("devices = [\"{b}\"]"));
        let cfg = crate::config::parse(std::path::Path::new("node.toml"), &text).unwrap();
        let dropin = engine_dropin(&cfg.pools()[0], &minors).unwrap();
        assert!(
            dropin.contains(&format!("\nEnvironment=CUDA_VISIBLE_DEVICES={b}\n")),
            "{dropin}"
        );
        assert!(
            dropin.contains("\nDeviceAllow=/dev/nvidia1 rw\n"),
            "{dropin}"
        );
        assert!(!dropin.contains("/dev/nvidia0"), "{dropin}");
        // A UUID the driver does not know opens nothing, and says why.
        let none = engine_dropin(&cfg.pools()[0], &Default::default()).unwrap();
        assert!(!none.contains("DeviceAllow=/dev/nvidia1"), "{none}");
        assert!(none.contains("daemon-reload"), "{none}");
    }
}
