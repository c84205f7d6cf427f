//! The node configuration file (TOML): which node this is, where the control plane is, where the
//! node API listens, and the pools to run. Everything is parsed and validated before a socket is
//! bound; an error names the file, the key and what to do.
//!
//! This module owns parsing and validation only; the paths it derives (`RuntimeLayout`) are used
//! by the launcher and the handoff watcher.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
}

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
    /// GPU pools: refuse to start when the model's estimated memory does not fit the GPUs'
    /// free memory, instead of offloading only the layers that fit (the rest then run on the
    /// CPU, many times slower). Default false.
    #[serde(default)]
    pub gpu_only: bool,
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
}

/// Where the node API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Listen {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?} is not an absolute socket path; use unix:/path/to.sock"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
        addr.parse::<SocketAddr>().map(Self::Tcp).map_err(|_| {
            format!("{s:?} is neither unix:/path/to.sock nor an ip:port such as 127.0.0.1:9200")
        })
    }

    /// The address the control plane can use, if this one can be advertised as is.
    fn advertised(&self, tls: bool) -> Option<String> {
        match self {
            Self::Unix(p) => Some(format!("unix:{}", p.display())),
            Self::Tcp(a) if a.ip().is_unspecified() => None,
            Self::Tcp(a) if tls => Some(format!("https://{a}")),
            Self::Tcp(a) => Some(format!("http://{a}")),
        }
    }
}

/// A configuration that cannot be used, with the file and key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The key at fault, when one is.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// A secret read from a file; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A checked configuration, with derived values.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub config: Config,
    pub listen: Listen,
    /// The address sent to the control plane at registration.
    pub advertise: String,
    /// The node token, when one is configured.
    pub token: Option<Secret>,
    /// The node API's certificate and key files (checked to load), when it speaks TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The CA file an `https://` control plane is verified against (else the system's).
    pub control_plane_ca: Option<PathBuf>,
    /// Where to offer `org.llamaorch.PoolManager1` (`--dbus`; not part of node.toml).
    pub dbus: llorch_bus::Mode,
}

impl Checked {
    pub fn node(&self) -> &NodeConfig {
        &self.config.node
    }

    pub fn pools(&self) -> &[PoolConfig] {
        &self.config.pools
    }

    pub fn layout(&self) -> RuntimeLayout {
        RuntimeLayout::new(&self.config.node.runtime_dir)
    }
}

/// The `[node]` keys that differ between two configurations (they apply only at a restart).
pub fn node_changes(old: &NodeConfig, new: &NodeConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut differ = |key: &'static str, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    differ("node.id", old.id != new.id);
    differ("node.control_plane", old.control_plane != new.control_plane);
    differ("node.listen", old.listen != new.listen);
    differ("node.advertise", old.advertise != new.advertise);
    differ("node.cache_dir", old.cache_dir != new.cache_dir);
    differ("node.runtime_dir", old.runtime_dir != new.runtime_dir);
    differ(
        "node.heartbeat_secs",
        old.heartbeat_secs != new.heartbeat_secs,
    );
    differ("node.engine_bin", old.engine_bin != new.engine_bin);
    differ(
        "node.provisioner_bin",
        old.provisioner_bin != new.provisioner_bin,
    );
    differ("node.token_file", old.token_file != new.token_file);
    differ("node.tls_cert", old.tls_cert != new.tls_cert);
    differ("node.tls_key", old.tls_key != new.tls_key);
    differ(
        "node.control_plane_ca",
        old.control_plane_ca != new.control_plane_ca,
    );
    differ(
        "node.allow_plaintext",
        old.allow_plaintext != new.allow_plaintext,
    );
    differ(
        "node.metrics_listen",
        old.metrics_listen != new.metrics_listen,
    );
    differ("node.launcher", old.launcher != new.launcher);
    keys
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Checked, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates configuration text; `path` names the file in errors.
pub fn parse(path: &Path, text: &str) -> Result<Checked, ConfigError> {
    let value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_string(),
    })?;
    let config: Config =
        serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
            let key = e.path().to_string();
            // toml's value deserializer appends "in `table`" lines; the key says that already.
            let inner = e.into_inner().to_string();
            let inner = inner
                .lines()
                .next()
                .unwrap_or_default()
                .trim_end()
                .to_string();
            ConfigError::Invalid {
                path: path.to_owned(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: format!("{inner} (see crates/pool-managerd/examples/node.toml)"),
            }
        })?;
    validate(path, config)
}

fn invalid(path: &Path, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_owned(),
        key: key.into(),
        message: message.into(),
    }
}

/// Whether `id` is a usable node, pool or model id: `[A-Za-z0-9_.-]{1,64}`, not `.` or `..`.
pub use llorch_wire::id::valid_id;

fn check_id(path: &Path, key: &str, id: &str) -> Result<(), ConfigError> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(invalid(
            path,
            key,
            format!("{id:?} is not a valid id; use 1 to {MAX_ID_LEN} of A-Z a-z 0-9 _ . -"),
        ))
    }
}

fn validate(path: &Path, config: Config) -> Result<Checked, ConfigError> {
    let node = &config.node;
    check_id(path, "node.id", &node.id)?;
    let control_plane_ok = (node.control_plane.starts_with("http://")
        || node.control_plane.starts_with("https://"))
        && llorch_client::HttpClient::new(&node.control_plane).is_ok();
    if !control_plane_ok {
        return Err(invalid(
            path,
            "node.control_plane",
            format!(
                "{:?} is not an https://host:port (or http://host:port) address of orchestratord",
                node.control_plane
            ),
        ));
    }
    if !node.allow_plaintext && llorch_client::leaves_host_in_clear(&node.control_plane) {
        return Err(invalid(
            path,
            "node.control_plane",
            format!(
                "{} is plain HTTP to another host: the node token and prompts would cross the network in the clear; use https:// (with control_plane_ca), or set allow_plaintext = true",
                node.control_plane
            ),
        ));
    }
    let control_plane_ca = node
        .control_plane_ca
        .clone()
        .or_else(|| llorch_os::service::credential("control-plane-ca"));
    if let Some(ca) = &control_plane_ca {
        llorch_client::TlsRoots::from_pem_file(ca)
            .map_err(|e| invalid(path, "node.control_plane_ca", e.to_string()))?;
    }
    let listen = Listen::parse(&node.listen).map_err(|m| invalid(path, "node.listen", m))?;
    let tls_cert = node
        .tls_cert
        .clone()
        .or_else(|| llorch_os::service::credential("tls-cert"));
    let tls_key = node
        .tls_key
        .clone()
        .or_else(|| llorch_os::service::credential("tls-key"));
    let tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => {
            if !matches!(listen, Listen::Tcp(_)) {
                return Err(invalid(
                    path,
                    "node.tls_cert",
                    "TLS is for a node API on TCP; a unix: socket stays on this host",
                ));
            }
            llorch_http::tls::acceptor(&cert, &key)
                .map_err(|e| invalid(path, "node.tls_cert", e.to_string()))?;
            Some((cert, key))
        }
        (None, None) => None,
        (Some(_), None) => {
            return Err(invalid(
                path,
                "node.tls_key",
                "tls_cert is given without its key; give both or neither",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                path,
                "node.tls_cert",
                "tls_key is given without its certificate; give both or neither",
            ))
        }
    };
    if let Listen::Tcp(addr) = &listen {
        if tls.is_none() && !node.allow_plaintext && !addr.ip().is_loopback() {
            return Err(invalid(
                path,
                "node.listen",
                format!("the node API listens on {addr}, which is not loopback, without TLS: the control plane's token and users' prompts would arrive in the clear; give tls_cert and tls_key (or the tls-cert and tls-key credentials), or set allow_plaintext = true"),
            ));
        }
    }
    let advertise = match &node.advertise {
        Some(a) => {
            llorch_client::HttpClient::new(a).map_err(|_| {
                invalid(
                    path,
                    "node.advertise",
                    format!("{a:?} is neither unix:/path/to.sock nor http(s)://host:port"),
                )
            })?;
            if tls.is_some() != a.starts_with("https://") {
                return Err(invalid(
                    path,
                    "node.advertise",
                    if tls.is_some() {
                        format!("{a:?} must be https:// as the node API speaks TLS")
                    } else {
                        format!("{a:?} is https:// but the node API has no TLS; give tls_cert and tls_key")
                    },
                ));
            }
            a.trim_end_matches('/').to_string()
        }
        None => listen.advertised(tls.is_some()).ok_or_else(|| {
            invalid(
                path,
                "node.advertise",
                format!(
                    "listen is {:?}, which the control plane cannot dial; set advertise to this node's https://host:port",
                    node.listen
                ),
            )
        })?,
    };
    if !(1..=300).contains(&node.heartbeat_secs) {
        return Err(invalid(
            path,
            "node.heartbeat_secs",
            format!(
                "{} is out of range; use 1 to 300 seconds",
                node.heartbeat_secs
            ),
        ));
    }
    for (key, dir) in [
        ("node.cache_dir", &node.cache_dir),
        ("node.runtime_dir", &node.runtime_dir),
    ] {
        if !dir.is_absolute() {
            return Err(invalid(
                path,
                key,
                format!("{} is not an absolute path", dir.display()),
            ));
        }
    }
    // The control plane refuses a node that reports more (llorch-wire's node limits).
    let max_pools = llorch_wire::node::limits::MAX_POOLS;
    if config.pools.len() > max_pools {
        return Err(invalid(
            path,
            "pools",
            format!(
                "{} pools are configured; a node serves at most {max_pools}",
                config.pools.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    for (i, pool) in config.pools.iter().enumerate() {
        let key = |k: &str| format!("pools[{i}].{k}");
        check_id(path, &key("id"), &pool.id)?;
        if !seen.insert(pool.id.as_str()) {
            return Err(invalid(
                path,
                key("id"),
                format!(
                    "pool id {:?} is used twice; pool ids must be unique",
                    pool.id
                ),
            ));
        }
        if !(1..=MAX_SLOTS).contains(&pool.slots) {
            return Err(invalid(
                path,
                key("slots"),
                format!("{} is out of range; use 1 to {MAX_SLOTS}", pool.slots),
            ));
        }
        if pool.ctx < MIN_CTX {
            return Err(invalid(
                path,
                key("ctx"),
                format!(
                    "{} is too small; use at least {MIN_CTX} tokens per slot",
                    pool.ctx
                ),
            ));
        }
        if pool.memory_max_mib.is_some_and(|m| m > 0 && m < 64) {
            return Err(invalid(
                path,
                key("memory_max_mib"),
                "is below 64 MiB, where no engine runs; give the bound in MiB, or 0 for none",
            ));
        }
        if pool.keep_alive_secs.is_some() && !pool.on_demand {
            return Err(invalid(
                path,
                key("keep_alive_secs"),
                "only on-demand pools unload; set on_demand = true, or remove keep_alive_secs",
            ));
        }
        if pool.threads == Some(0) {
            return Err(invalid(
                path,
                key("threads"),
                "0 threads cannot run; leave threads out to use one per core",
            ));
        }
        if let Err(reason) = pool.devices.gpus() {
            return Err(invalid(path, key("devices"), reason));
        }
        if pool.gpu_only && pool.gpus().is_empty() {
            return Err(invalid(
                path,
                key("gpu_only"),
                "is for GPU pools; give the pool its GPUs in devices, or remove gpu_only",
            ));
        }
        check_id(path, &key("model.id"), &pool.model.id)?;
        if pool.model.source.is_empty() {
            return Err(invalid(
                path,
                key("model.source"),
                "the model source is empty; give a path or an https:// URL",
            ));
        }
        // The source travels in the pool's settings file (one KEY="value" per line) and in
        // command lines: a newline or another control character would break both.
        if pool.model.source.chars().any(char::is_control) {
            return Err(invalid(
                path,
                key("model.source"),
                "the model source holds a newline or another control character; give a plain path or URL",
            ));
        }
        if let Some(h) = &pool.model.sha256 {
            if h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(invalid(
                    path,
                    key("model.sha256"),
                    "not a sha256; use 64 lowercase hex digits (sha256sum FILE)",
                ));
            }
        } else if pool.model.source.starts_with("http://")
            || pool.model.source.starts_with("https://")
        {
            return Err(invalid(
                path,
                key("model.sha256"),
                "a model downloaded from a URL needs its sha256; add sha256 = \"<64 hex digits>\"",
            ));
        }
    }
    let token_path = node
        .token_file
        .clone()
        .or_else(|| llorch_os::service::credential("node-token"));
    let token = match token_path {
        Some(p) => {
            let text = std::fs::read_to_string(&p).map_err(|e| {
                invalid(
                    path,
                    "node.token_file",
                    format!("cannot read {}: {e}", p.display()),
                )
            })?;
            let t = text.trim().to_string();
            if t.len() < 16 || t.contains(char::is_whitespace) {
                return Err(invalid(
                    path,
                    "node.token_file",
                    format!(
                        "{} must hold one token of at least 16 characters without spaces",
                        p.display()
                    ),
                ));
            }
            Some(Secret(t))
        }
        None => None,
    };
    if let Listen::Tcp(addr) = &listen {
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(invalid(
                path,
                "node.token_file",
                format!("the node API listens on {addr}, which is not loopback; give a token_file (or the node-token credential) so only the control plane can use it"),
            ));
        }
    }
    Ok(Checked {
        listen,
        advertise,
        config,
        token,
        tls,
        control_plane_ca,
        dbus: llorch_bus::Mode::Off,
    })
}

/// The files a node keeps under its runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeLayout {
    pub root: PathBuf,
}

impl RuntimeLayout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    pub fn engines_dir(&self) -> PathBuf {
        self.root.join("engines")
    }

    pub fn handoff_dir(&self) -> PathBuf {
        self.root.join("handoff")
    }

    pub fn plans_dir(&self) -> PathBuf {
        self.root.join("plans")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn engine_socket(&self, pool: &str) -> PathBuf {
        self.engines_dir().join(format!("{pool}.sock"))
    }

    /// The pool's own handoff directory: under systemd its engine may write there and in no
    /// other pool's (the unit's `ReadWritePaths=`).
    pub fn pool_handoff_dir(&self, pool: &str) -> PathBuf {
        self.handoff_dir().join(pool)
    }

    pub fn handoff_file(&self, pool: &str) -> PathBuf {
        self.pool_handoff_dir(pool)
            .join(llorch_wire::handoff::Handoff::file_name(pool))
    }

    /// Makes the pool's handoff directory (0770: the engines, in group llama-orch, write
    /// there) when it is missing.
    pub fn create_pool_handoff_dir(&self, pool: &str) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = self.pool_handoff_dir(pool);
        match std::fs::DirBuilder::new().mode(0o770).create(&dir) {
            Ok(()) => std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn plan_file(&self, pool: &str) -> PathBuf {
        self.plans_dir().join(format!("{pool}.json"))
    }

    pub fn provision_log(&self, pool: &str) -> PathBuf {
        self.logs_dir().join(format!("{pool}.provision.log"))
    }

    pub fn engine_log(&self, pool: &str) -> PathBuf {
        self.logs_dir().join(format!("{pool}.engine.log"))
    }

    /// Creates every directory.
    pub fn create(&self) -> std::io::Result<()> {
        for d in [
            self.engines_dir(),
            self.handoff_dir(),
            self.plans_dir(),
            self.logs_dir(),
        ] {
            std::fs::create_dir_all(d)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../examples/node.toml");

    fn parse_str(text: &str) -> Result<Checked, ConfigError> {
        parse(Path::new("node.toml"), text)
    }

    fn key_of(text: &str) -> String {
        let err = parse_str(text).unwrap_err();
        assert!(err.to_string().starts_with("node.toml: "), "{err}");
        err.key()
            .unwrap_or_else(|| panic!("no key in {err}"))
            .to_string()
    }

    #[test]
    fn the_shipped_example_parses() {
        let c = parse_str(EXAMPLE).unwrap();
        assert_eq!(c.node().id, "home");
        assert_eq!(c.node().heartbeat_secs, 5);
        assert_eq!(
            c.listen,
            Listen::Unix("/run/llama-orch/pool-managerd.sock".into())
        );
        assert_eq!(c.advertise, "unix:/run/llama-orch/pool-managerd.sock");
        assert_eq!(c.pools().len(), 1);
        let p = &c.pools()[0];
        assert_eq!((p.id.as_str(), p.slots, p.ctx), ("default", 4, 2048));
        assert_eq!(p.model.id, "smollm2-135m");
        assert_eq!(p.gpu_layers(), 0);
        assert_eq!(
            c.layout().handoff_file("default"),
            PathBuf::from("/run/llama-orch/handoff/default/default.json")
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let text = EXAMPLE.replace("slots = 4", "slots = 4\nslotz = 3");
        assert_eq!(key_of(&text), "pools[0].slotz");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(
            err.contains("unknown field `slotz`") && !err.contains('\n'),
            "{err}"
        );
        let text = EXAMPLE.replace("[node]", "[node]\ncolour = \"blue\"");
        assert_eq!(key_of(&text), "node.colour");
    }

    #[test]
    fn bad_values_are_named() {
        let source = EXAMPLE
            .lines()
            .find(|l| l.trim_start().starts_with("source = "))
            .expect("the example has a model source");
        assert_eq!(
            key_of(&EXAMPLE.replace(source, "source = \"/srv/a\\nLLORCH_CTX=\\\"1\\\"\"")),
            "pools[0].model.source"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("slots = 4", "slots = 0")),
            "pools[0].slots"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("slots = 4", "slots = 65")),
            "pools[0].slots"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("slots = 4", "slots = \"four\"")),
            "pools[0].slots"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("ctx = 2048", "ctx = 10")),
            "pools[0].ctx"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("slots = 4", "slots = 4\nmemory_max_mib = 10")),
            "pools[0].memory_max_mib"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("heartbeat_secs = 5", "heartbeat_secs = 0")),
            "node.heartbeat_secs"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("id = \"home\"", "id = \"a b\"")),
            "node.id"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("http://127.0.0.1:8080", "ftp://cp:8080")),
            "node.control_plane"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("unix:/run/llama-orch/pool-managerd.sock", "somewhere")),
            "node.listen"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("devices = \"cpu\"", "devices = \"tpu\"")),
            "pools[0].devices"
        );
    }

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

    #[test]
    fn duplicate_pool_ids_are_named() {
        let second = &EXAMPLE[EXAMPLE.find("[[pools]]").unwrap()..];
        let text = format!("{EXAMPLE}\n{second}");
        let err = parse_str(&text).unwrap_err();
        assert_eq!(err.key(), Some("pools[1].id"), "{err}");
        assert!(err.to_string().contains("used twice"), "{err}");
    }

    #[test]
    fn urls_need_a_sha256() {
        let text = EXAMPLE.replace(
            "source = \"/var/cache/llama-orch/default-model/SmolLM2-135M-Instruct.Q4_1.gguf\"",
            "source = \"https://example.org/m.gguf\"",
        );
        let text = text
            .lines()
            .filter(|l| !l.starts_with("sha256"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(key_of(&text), "pools[0].model.sha256");
    }

    #[test]
    fn tcp_listen_addresses() {
        assert_eq!(
            Listen::parse("127.0.0.1:9200")
                .unwrap()
                .advertised(false)
                .unwrap(),
            "http://127.0.0.1:9200"
        );
        assert_eq!(
            Listen::parse("http://127.0.0.1:9200").unwrap(),
            Listen::Tcp("127.0.0.1:9200".parse().unwrap())
        );
        // A wildcard address cannot be dialled: advertise must be given.
        let text = EXAMPLE
            .replace("unix:/run/llama-orch/pool-managerd.sock", "0.0.0.0:9200")
            .replace("# allow_plaintext = false", "allow_plaintext = true");
        assert_eq!(key_of(&text), "node.advertise");
    }

    #[test]
    fn a_node_api_off_loopback_needs_a_token() {
        let open = EXAMPLE
            .replace("unix:/run/llama-orch/pool-managerd.sock", "0.0.0.0:9200")
            .replace("# advertise = ", "advertise = ");
        // In the clear: refused unless asked for, naming what to give.
        let err = parse_str(&open).unwrap_err();
        assert_eq!(err.key(), Some("node.listen"), "{err}");
        assert!(err.to_string().contains("tls_cert"), "{err}");
        // An https:// advertise without TLS is refused too.
        assert_eq!(
            key_of(&open.replace("# allow_plaintext = false", "allow_plaintext = true")),
            "node.advertise"
        );
        let open = open
            .replace("# allow_plaintext = false", "allow_plaintext = true")
            .replace("https://10.0.0.5:9200", "http://10.0.0.5:9200");
        assert_eq!(key_of(&open), "node.token_file");
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        let with = |p: &Path| {
            format!(
                "{}\n",
                open.replace(
                    "# token_file = \"/etc/llama-orch/node-token\"",
                    &format!("token_file = \"{}\"", p.display())
                )
            )
        };
        assert_eq!(key_of(&with(&short)), "node.token_file");
        let good = dir.path().join("good");
        std::fs::write(&good, "node-token-0123456789\n").unwrap();
        let c = parse_str(&with(&good)).unwrap();
        assert_eq!(c.token, Some(Secret("node-token-0123456789".into())));
        assert!(!format!("{c:?}").contains("node-token-0123456789"));
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let err = parse_str("[node\nid = 1").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }));
        assert!(err.to_string().starts_with("node.toml: "), "{err}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: proptest::prelude::ProptestConfig::default().cases.max(1000), ..proptest::prelude::ProptestConfig::default() })]

        /// The shipped example with a span of it replaced by anything: parsed, or refused
        /// with the file's name, never a panic.
        #[test]
        fn any_node_toml_parses_or_names_the_file(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            len in 0usize..40,
            with in ".{0,40}",
        ) {
            let mut text = EXAMPLE.to_string();
            let mut start = at.index(text.len());
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let mut end = (start + len).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.replace_range(start..end, &with);
            if let Err(e) = parse_str(&text) {
                proptest::prop_assert!(e.to_string().starts_with("node.toml"), "{}", e);
            }
        }
    }
}
