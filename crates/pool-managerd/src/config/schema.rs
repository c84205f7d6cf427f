//! The configuration file's shape: the serde types of `[node]`, `[[pools]]` and
//! `[pools.model]`, with the limits their values must keep and what a pool's settings imply
//! (its GPUs, offload, keep-alive). Reading the file and checking the values are
//! `validate.rs`'s job.

use std::path::PathBuf;

use serde::Deserialize;

/// Most slots one pool may have (the engine's own limit).
pub const MAX_SLOTS: u32 = 64;
/// Smallest context per slot the engine accepts.
pub const MIN_CTX: u32 = 64;
/// Longest id (node, pool, model).
pub use llorch_wire::id::MAX_ID_LEN;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
}

/// `[node]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: String,
    /// orchestratord's base URL, `https://host:port` (or `http://` on this host).
    pub control_plane: String,
    /// PEM file of the CA that signed the control plane's certificate: an `https://`
    /// control plane is verified against it alone. Default:
    /// `$CREDENTIALS_DIRECTORY/control-plane-ca` when that file exists, else the system's store.
    #[serde(default)]
    pub control_plane_ca: Option<PathBuf>,
    /// Where the node API listens: `unix:/path/to.sock`, `ip:port` or `http://ip:port`.
    pub listen: String,
    /// Where orchestratord reaches the node API (`unix:/path` or `http://host:port`); derived
    /// from `listen` when absent.
    #[serde(default)]
    pub advertise: Option<String>,
    pub cache_dir: PathBuf,
    /// Engine sockets, handoff files, plans and logs go under it.
    pub runtime_dir: PathBuf,
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// `llorch-engine`; default: next to this executable, else from `PATH`.
    #[serde(default)]
    pub engine_bin: Option<PathBuf>,
    /// `engine-provisioner`; default: next to this executable, else from `PATH`.
    #[serde(default)]
    pub provisioner_bin: Option<PathBuf>,
    /// File holding this node's token, shared with the control plane (whose node-tokens file
    /// lists it). Sent when registering and heartbeating, and required from callers of the node
    /// API. Default: `$CREDENTIALS_DIRECTORY/node-token` when that file exists. Required when
    /// the node API listens on a non-loopback TCP address.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM certificate chain of the node API on TCP; with `tls_key`, the API speaks only TLS
    /// and is advertised as `https://`. Default: `$CREDENTIALS_DIRECTORY/tls-cert` when that
    /// file exists.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`. Default: `$CREDENTIALS_DIRECTORY/tls-key` when present.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Allow plain HTTP across the network: a node API on a non-loopback TCP address without
    /// TLS, an `http://` control plane on another host. Tokens and prompts then travel in the
    /// clear; the node says so at start.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// A TCP address (`ip:port`) that serves only `GET /metrics` and `/health`, for Prometheus
    /// when the node API is a Unix socket. Off when absent; the node API serves `/metrics` too.
    #[serde(default)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How engines are started: `process` (children of pool-managerd), `systemd` (the template
    /// units, over D-Bus), or `auto` (systemd when pool-managerd is itself a systemd service).
    #[serde(default)]
    pub launcher: LauncherKind,
    /// Host memory in MiB that CPU pools' engines may hold together (each charged its memory
    /// bound). Absent: three quarters of `MemAvailable` when pool-managerd starts. A request
    /// for an on-demand pool that does not fit unloads idle on-demand pools first
    /// (docs/OPERATIONS.md, "Many models on one box").
    #[serde(default)]
    pub memory_budget_mib: Option<u64>,
    /// Memory in MiB of each GPU that GPU pools may hold together. Absent: the GPU's total
    /// memory as NVML reports it (no GPU budget without NVML).
    #[serde(default)]
    pub gpu_memory_budget_mib: Option<u64>,
    /// The most pools loaded at once, always-loaded ones included. Absent: no limit but the
    /// memory budgets.
    #[serde(default)]
    pub max_loaded: Option<u32>,
    /// A pool that loaded less than this many seconds ago is not unloaded to make room for
    /// another (default 10): two models that take turns swap at most once per this period.
    #[serde(default)]
    pub min_resident_secs: Option<u64>,
}

/// Default `node.min_resident_secs`.
pub const MIN_RESIDENT_SECS: u64 = 10;

/// `node.launcher`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LauncherKind {
    #[default]
    Auto,
    Process,
    Systemd,
}

fn default_heartbeat_secs() -> u64 {
    llorch_wire::node::HEARTBEAT_SECS
}

/// `[[pools]]`: one model loaded by one engine.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub id: String,
    pub slots: u32,
    pub ctx: u32,
    /// `cpu`, `cuda:0` / `cuda:0,1` (CUDA indices in PCI bus order, as `nvidia-smi` counts),
    /// or a list of GPU UUIDs (`["GPU-8d2a…", "GPU-41c0…"]`, from `nvidia-smi -L`), which
    /// stay right when cards are added or moved.
    #[serde(default)]
    pub devices: DeviceList,
    /// CPU threads for the engine; absent means one per available core.
    #[serde(default)]
    pub threads: Option<u32>,
    /// Load the model when the first request arrives (socket activation) instead of at start;
    /// the pool is `standby` while unloaded.
    #[serde(default)]
    pub on_demand: bool,
    /// Seconds without a request after which an on-demand pool's engine unloads (default
    /// 300; 0 keeps it loaded once started). Only for `on_demand` pools.
    #[serde(default)]
    pub keep_alive_secs: Option<u64>,
    /// The engine's memory bound in MiB (systemd `MemoryMax=`, systemd launcher only); absent:
    /// sized from the model, its KV cache and a margin ([`crate::launcher::engine_memory_bound`]);
    /// 0: no bound.
    #[serde(default)]
    pub memory_max_mib: Option<u64>,
    /// Host memory in MiB for the engine's prefix cache: prompt states kept after their slot
    /// moved on, restored instead of recomputed (0: off). Absent: an eighth of the memory
    /// available when the pool is planned, at most 2 GiB. Counted in the engine's memory
    /// bound.
    #[serde(default)]
    pub prefix_cache_mib: Option<u64>,
    /// GPU pools: refuse to start when the model's estimated memory does not fit the GPUs'
    /// free memory, instead of offloading only the layers that fit (the rest then run on the
    /// CPU, many times slower). Default false.
    #[serde(default)]
    pub gpu_only: bool,
    /// Serve embeddings (`/v1/embeddings`, `/api/embed`) from this pool too: the engine keeps
    /// a context of `ctx` tokens for them beside its slots. Default false.
    #[serde(default)]
    pub embeddings: bool,
    /// On-demand pools: never unloaded to make room for another pool (it still unloads after
    /// its keep-alive). Default false.
    #[serde(default)]
    pub pinned: bool,
    pub model: ModelConfig,
}

/// `devices` as written: one string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum DeviceList {
    One(String),
    Many(Vec<String>),
}

impl Default for DeviceList {
    fn default() -> Self {
        Self::One("cpu".into())
    }
}

impl std::fmt::Display for DeviceList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::One(s) => f.write_str(s),
            Self::Many(v) => f.write_str(&v.join(",")),
        }
    }
}

/// One GPU of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gpu {
    /// The CUDA index in PCI bus order (`cuda:N`), which is also `/dev/nvidiaN`'s number on
    /// a machine whose GPUs all use the NVIDIA driver.
    Index(u32),
    /// `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
    Uuid(String),
}

impl std::fmt::Display for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Index(n) => write!(f, "{n}"),
            Self::Uuid(u) => f.write_str(u),
        }
    }
}

fn is_gpu_uuid(s: &str) -> bool {
    let Some(hex) = s.strip_prefix("GPU-") else {
        return false;
    };
    let groups: Vec<&str> = hex.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl DeviceList {
    /// The pool's GPUs (empty: a CPU pool), or what is wrong with the list.
    pub fn gpus(&self) -> Result<Vec<Gpu>, String> {
        let index = |n: &str| {
            n.parse::<u32>()
                .ok()
                .filter(|_| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .map(Gpu::Index)
        };
        let gpus: Vec<Gpu> = match self {
            Self::One(s) if s == "cpu" => return Ok(Vec::new()),
            Self::One(s) => match s.strip_prefix("cuda:") {
                Some(list) => list.split(',').map(index).collect::<Option<_>>(),
                None if is_gpu_uuid(s) => Some(vec![Gpu::Uuid(s.clone())]),
                None => None,
            }
            .ok_or_else(|| {
                format!(
                    "{s:?} is not a device set; use \"cpu\", \"cuda:0\" (\"cuda:0,1\") or a list of GPU UUIDs from `nvidia-smi -L` ([\"GPU-…\"])"
                )
            })?,
            Self::Many(v) if v.is_empty() => {
                return Err("is an empty list; use \"cpu\" for a CPU pool".into())
            }
            Self::Many(v) => v
                .iter()
                .map(|d| {
                    if is_gpu_uuid(d) {
                        Ok(Gpu::Uuid(d.clone()))
                    } else {
                        d.strip_prefix("cuda:").and_then(index).ok_or_else(|| {
                            format!("{d:?} is neither a GPU UUID (\"GPU-\" and 32 hex digits in 8-4-4-4-12 groups, from `nvidia-smi -L`) nor \"cuda:N\"")
                        })
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        let uuids = gpus.iter().filter(|g| matches!(g, Gpu::Uuid(_))).count();
        if uuids > 0 && uuids < gpus.len() {
            return Err("mixes CUDA indices and UUIDs; name every GPU the same way".into());
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = gpus.iter().find(|g| !seen.insert(g.to_string())) {
            return Err(format!("names GPU {dup} twice"));
        }
        Ok(gpus)
    }
}

/// An on-demand pool's keep-alive when the configuration gives none: 5 minutes.
pub const DEFAULT_KEEP_ALIVE_SECS: u64 = 300;

impl PoolConfig {
    /// Layers to offload: none on the CPU, all of them on a GPU.
    pub fn gpu_layers(&self) -> u32 {
        if self.gpus().is_empty() {
            0
        } else {
            999
        }
    }

    /// The pool's GPUs, in the order written (empty for a CPU pool; the configuration was
    /// checked when read).
    pub fn gpus(&self) -> Vec<Gpu> {
        self.devices.gpus().unwrap_or_default()
    }

    /// Seconds without work after which the engine exits to free its memory: on-demand pools
    /// with a keep-alive other than 0.
    pub fn idle_exit_secs(&self) -> Option<u64> {
        self.on_demand
            .then(|| self.keep_alive_secs.unwrap_or(DEFAULT_KEEP_ALIVE_SECS))
            .filter(|s| *s > 0)
    }

    /// The engine's prefix cache in MiB: `prefix_cache_mib`, or the default for the memory
    /// available now.
    pub fn prefix_cache_mib(&self) -> u64 {
        self.prefix_cache_mib.unwrap_or_else(|| {
            llorch_wire::plan::defaults::prefix_cache_mib(llorch_os::mem::available_bytes())
        })
    }

    /// `CUDA_VISIBLE_DEVICES` for a GPU pool (`0,1`, or its UUIDs), None for a CPU pool.
    pub fn cuda_visible_devices(&self) -> Option<String> {
        let gpus = self.gpus();
        (!gpus.is_empty()).then(|| {
            gpus.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
    }
}

/// `[pools.model]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub id: String,
    /// A path, a `file:` URL or an `http(s)://` URL.
    pub source: String,
    /// Required for URLs (the provisioner refuses downloads without it).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Allow a plain `http://` source on another host (loopback is always allowed): anyone on
    /// the path sees which model is fetched and can cut it off; the sha256 still decides what
    /// is staged.
    #[serde(default)]
    pub allow_http: bool,
}

#[cfg(test)]
mod tests {
    use super::super::testing::{key_of, parse_str, EXAMPLE};
    use super::*;

    #[test]
    fn devices_are_cuda_indices_or_gpu_uuids() {
        let with = |devices: &str| EXAMPLE.replace("devices = \"cpu\"", devices);
        let a = "GPU-8d2a5f31-1c44-4b6e-9a0b-3f9e2c7d1e11";
        let b = "GPU-41c0e2aa-77d3-4c2b-8e1f-5a6b7c8d9e02";
        let pool = |devices: &str| parse_str(&with(devices)).unwrap().pools()[0].clone();
        assert_eq!(pool("devices = \"cpu\"").gpus(), []);
        assert_eq!(pool("devices = \"cpu\"").gpu_layers(), 0);
        let p = pool("devices = \"cuda:0,2\"");
        assert_eq!(p.gpus(), [Gpu::Index(0), Gpu::Index(2)]);
        assert_eq!(p.cuda_visible_devices().as_deref(), Some("0,2"));
        assert_eq!(p.gpu_layers(), 999);
        let p = pool(&format!("devices = [\"{a}\", \"{b}\"]\ngpu_only = true"));
        assert_eq!(p.gpus(), [Gpu::Uuid(a.into()), Gpu::Uuid(b.into())]);
        assert_eq!(p.cuda_visible_devices(), Some(format!("{a},{b}")));
        assert!(p.gpu_only);
        assert_eq!(
            pool(&format!("devices = \"{a}\"")).gpus(),
            [Gpu::Uuid(a.into())]
        );
        assert_eq!(pool("devices = [\"cuda:1\"]").gpus(), [Gpu::Index(1)]);
        // Each wrong list is refused with what is wrong, under the key.
        for (devices, says) in [
            ("devices = []", "empty list"),
            ("devices = [\"GPU-1234\"]", "neither a GPU UUID"),
            (&format!("devices = [\"{a}\", \"cuda:1\"]"), "mixes"),
            (&format!("devices = [\"{a}\", \"{a}\"]"), "twice"),
            ("devices = \"cuda:0,0\"", "twice"),
            ("devices = \"cuda:\"", "not a device set"),
            ("devices = 3", "devices"),
        ] {
            let err = parse_str(&with(devices)).unwrap_err();
            assert_eq!(err.key(), Some("pools[0].devices"), "{devices}: {err}");
            assert!(err.to_string().contains(says), "{devices}: {err}");
        }
        // gpu_only on a CPU pool is a mistake, named.
        assert_eq!(
            key_of(&with("devices = \"cpu\"\ngpu_only = true")),
            "pools[0].gpu_only"
        );
    }
}
