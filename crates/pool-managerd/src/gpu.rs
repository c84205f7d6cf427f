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

use crate::config::PoolConfig;

/// The drop-in file's name in `llorch-engine@<pool>.service.d/`.
pub const DROPIN_NAME: &str = "50-llama-orch-gpu.conf";

/// The engine unit's drop-in for a GPU pool (`devices = "cuda:0,1"`); None for a CPU pool.
/// The unit has `PrivateDevices=yes` (no device at all); this opens exactly the pool's
/// `/dev/nvidiaN` and the driver's shared nodes (`nvidiactl`, `nvidia-uvm`,
/// `nvidia-uvm-tools`, the MIG capabilities read-only) under `DevicePolicy=closed`, lets CUDA
/// read `/proc/driver/nvidia` (`ProcSubset=all`), and makes CUDA's numbering the driver's
/// (PCI bus order, as NVML and the device minors count) so `cuda:N` is `/dev/nvidiaN`.
pub fn engine_dropin(pool: &PoolConfig) -> Option<String> {
    let devices = pool.cuda_devices()?;
    let mut text = format!(
        "# Written by llama-orch-gpu-generator from node.toml: pool {}, devices {}.\n\
         [Service]\n\
         Environment=CUDA_DEVICE_ORDER=PCI_BUS_ID\n\
         Environment=CUDA_VISIBLE_DEVICES={devices}\n\
         PrivateDevices=no\n\
         DevicePolicy=closed\n\
         DeviceAllow=/dev/nvidiactl rw\n\
         DeviceAllow=/dev/nvidia-uvm rw\n\
         DeviceAllow=/dev/nvidia-uvm-tools rw\n\
         DeviceAllow=char-nvidia-caps r\n",
        pool.id, pool.devices
    );
    for n in devices.split(',') {
        text.push_str(&format!("DeviceAllow=/dev/nvidia{n} rw\n"));
    }
    text.push_str("ProcSubset=all\n");
    Some(text)
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
        let dropin = engine_dropin(&cfg.pools()[0]).unwrap();
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
        assert_eq!(engine_dropin(&cpu.pools()[0]), None);
    }
}
