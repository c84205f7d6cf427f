//! The node's GPUs, from NVML (the NVIDIA driver's management library, loaded at run time by
//! nvml-wrapper): read at start and for every registration and heartbeat, so the control plane
//! and `llorch status` see each GPU's memory, utilization and temperature. Without the
//! library (no NVIDIA driver) the node is a CPU node: said once at start, and its reports carry
//! no `gpus`.

use llorch_wire::node::{GpuReport, GpuStatus};

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
