//! Checking a parsed configuration and deriving what the node runs with ([`Checked`]): the
//! node API's address and TLS files, the advertised address, the token, each pool's values.
//! One function per section; the first error found is returned, naming the file and the key.
//! The order of the checks is the order in which errors are reported, so it is kept stable.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{
    Config, ConfigError, ModelConfig, NodeConfig, PoolConfig, RuntimeLayout, MAX_ID_LEN, MAX_SLOTS,
    MIN_CTX,
};

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

/// Checks every section in turn and derives the values the node runs with.
pub(super) fn validate(path: &Path, config: Config) -> Result<Checked, ConfigError> {
    let node = &config.node;
    check_id(path, "node.id", &node.id)?;
    let control_plane_ca = check_control_plane(path, node)?;
    let listen = Listen::parse(&node.listen).map_err(|m| invalid(path, "node.listen", m))?;
    let tls = check_tls(path, node, &listen)?;
    let advertise = check_advertise(path, node, &listen, tls.is_some())?;
    check_node_values(path, node)?;
    check_pools(path, &config.pools)?;
    let token = read_token(path, node, &listen)?;
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

/// `node.control_plane` and `node.control_plane_ca`; returns the CA file to verify against.
fn check_control_plane(path: &Path, node: &NodeConfig) -> Result<Option<PathBuf>, ConfigError> {
    let control_plane_ok = ["http://", "https://", "unix:/"]
        .iter()
        .any(|scheme| node.control_plane.starts_with(scheme))
        && llorch_client::HttpClient::new(&node.control_plane).is_ok();
    if !control_plane_ok {
        return Err(invalid(
            path,
            "node.control_plane",
            format!(
                "{:?} is not an https://host:port (or http://host:port) address of orchestratord, nor the unix:/path of its local socket",
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
    Ok(control_plane_ca)
}

/// `node.tls_cert` and `node.tls_key` (or their credentials), and whether a node API off
/// loopback may serve without them; returns the certificate and key files.
fn check_tls(
    path: &Path,
    node: &NodeConfig,
    listen: &Listen,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
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
    if let Listen::Tcp(addr) = listen {
        if tls.is_none() && !node.allow_plaintext && !addr.ip().is_loopback() {
            return Err(invalid(
                path,
                "node.listen",
                format!("the node API listens on {addr}, which is not loopback, without TLS: the control plane's token and users' prompts would arrive in the clear; give tls_cert and tls_key (or the tls-cert and tls-key credentials), or set allow_plaintext = true"),
            ));
        }
    }
    Ok(tls)
}

/// `node.advertise`, or the address derived from `node.listen`.
fn check_advertise(
    path: &Path,
    node: &NodeConfig,
    listen: &Listen,
    tls: bool,
) -> Result<String, ConfigError> {
    match &node.advertise {
        Some(a) => {
            llorch_client::HttpClient::new(a).map_err(|_| {
                invalid(
                    path,
                    "node.advertise",
                    format!("{a:?} is neither unix:/path/to.sock nor http(s)://host:port"),
                )
            })?;
            if tls != a.starts_with("https://") {
                return Err(invalid(
                    path,
                    "node.advertise",
                    if tls {
                        format!("{a:?} must be https:// as the node API speaks TLS")
                    } else {
                        format!("{a:?} is https:// but the node API has no TLS; give tls_cert and tls_key")
                    },
                ));
            }
            Ok(a.trim_end_matches('/').to_string())
        }
        None => listen.advertised(tls).ok_or_else(|| {
            invalid(
                path,
                "node.advertise",
                format!(
                    "listen is {:?}, which the control plane cannot dial; set advertise to this node's https://host:port",
                    node.listen
                ),
            )
        }),
    }
}

/// `node.heartbeat_secs`, `node.cache_dir` and `node.runtime_dir`.
fn check_node_values(path: &Path, node: &NodeConfig) -> Result<(), ConfigError> {
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
    for (key, value) in [
        ("node.memory_budget_mib", node.memory_budget_mib),
        ("node.gpu_memory_budget_mib", node.gpu_memory_budget_mib),
    ] {
        if value.is_some_and(|m| m < 64) {
            return Err(invalid(
                path,
                key,
                "is below 64 MiB, where no engine fits; give the budget in MiB, or leave it out for the default",
            ));
        }
    }
    if node.max_loaded == Some(0) {
        return Err(invalid(
            path,
            "node.max_loaded",
            "0 would let no pool load; leave it out for no limit",
        ));
    }
    if node.min_resident_secs.is_some_and(|s| s > 3600) {
        return Err(invalid(
            path,
            "node.min_resident_secs",
            "is more than an hour; a waiting request would give up long before; use 0 to 3600",
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
    Ok(())
}

/// `[[pools]]`: how many, unique ids, and each pool's values.
fn check_pools(path: &Path, pools: &[PoolConfig]) -> Result<(), ConfigError> {
    // The control plane refuses a node that reports more (llorch-wire's node limits).
    let max_pools = llorch_wire::node::limits::MAX_POOLS;
    if pools.len() > max_pools {
        return Err(invalid(
            path,
            "pools",
            format!(
                "{} pools are configured; a node serves at most {max_pools}",
                pools.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    for (i, pool) in pools.iter().enumerate() {
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
        check_pool(path, &key, pool)?;
        check_model(path, &key, &pool.model)?;
    }
    Ok(())
}

/// One pool's engine settings; `key` names a key of this pool (`pools[i].<k>`).
fn check_pool(
    path: &Path,
    key: &dyn Fn(&str) -> String,
    pool: &PoolConfig,
) -> Result<(), ConfigError> {
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
    if pool.pinned && !pool.on_demand {
        return Err(invalid(
            path,
            key("pinned"),
            "only on-demand pools are unloaded to make room, so only they can be pinned; set on_demand = true, or remove pinned",
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
    Ok(())
}

/// `[pools.model]`: its id, source and checksum.
fn check_model(
    path: &Path,
    key: &dyn Fn(&str) -> String,
    model: &ModelConfig,
) -> Result<(), ConfigError> {
    check_id(path, &key("model.id"), &model.id)?;
    if model.source.is_empty() {
        return Err(invalid(
            path,
            key("model.source"),
            "the model source is empty; give a path or an https:// URL",
        ));
    }
    // The source travels in the pool's settings file (one KEY="value" per line) and in
    // command lines: a newline or another control character would break both.
    if model.source.chars().any(char::is_control) {
        return Err(invalid(
            path,
            key("model.source"),
            "the model source holds a newline or another control character; give a plain path or URL",
        ));
    }
    if let Some(h) = &model.sha256 {
        if h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid(
                path,
                key("model.sha256"),
                "not a sha256; use 64 lowercase hex digits (sha256sum FILE)",
            ));
        }
    } else if model.source.starts_with("http://") || model.source.starts_with("https://") {
        return Err(invalid(
            path,
            key("model.sha256"),
            "a model downloaded from a URL needs its sha256; add sha256 = \"<64 hex digits>\"",
        ));
    }
    if model.source.starts_with("http://")
        && !model.allow_http
        && !llorch_client::names_this_host(&model.source)
    {
        return Err(invalid(
            path,
            key("model.allow_http"),
            "the model source is plain http://: anyone on the path sees which model is fetched and can cut it off; use https://, or set allow_http = true",
        ));
    }
    Ok(())
}

/// `node.token_file` (or the node-token credential), required when the node API listens off
/// loopback.
fn read_token(
    path: &Path,
    node: &NodeConfig,
    listen: &Listen,
) -> Result<Option<Secret>, ConfigError> {
    let token_path = node
        .token_file
        .clone()
        .or_else(|| llorch_os::service::credential("node-token"));
    let token = match token_path {
        Some(p) => {
            if let Ok(Some(mode)) = llorch_os::fs::exposed_secret(&p) {
                return Err(invalid(
                    path,
                    "node.token_file",
                    format!(
                        "{} can be read by other users (mode {mode:o}); it holds the node's token: chmod 600 it (or pass it as the node-token credential)",
                        p.display()
                    ),
                ));
            }
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
    if let Listen::Tcp(addr) = listen {
        if !addr.ip().is_loopback() && token.is_none() {
            return Err(invalid(
                path,
                "node.token_file",
                format!("the node API listens on {addr}, which is not loopback; give a token_file (or the node-token credential) so only the control plane can use it"),
            ));
        }
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{key_of, parse_str, EXAMPLE};
    use super::*;

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
        // Plain http:// to another host needs allow_http; loopback does not.
        // (The example's model has its sha256.)
        let plain = "source = \"http://models.example.com/m.gguf\"".to_string();
        assert_eq!(
            key_of(&EXAMPLE.replace(source, &plain)),
            "pools[0].model.allow_http"
        );
        let allowed = format!("{plain}\nallow_http = true");
        assert!(parse_str(&EXAMPLE.replace(source, &allowed)).is_ok());
        let local = "source = \"http://127.0.0.1:8000/m.gguf\"";
        assert!(parse_str(&EXAMPLE.replace(source, local)).is_ok());
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
            key_of(&EXAMPLE.replace("heartbeat_secs = 5", "heartbeat_secs = 5\nmax_loaded = 0")),
            "node.max_loaded"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace(
                "heartbeat_secs = 5",
                "heartbeat_secs = 5\nmemory_budget_mib = 1"
            )),
            "node.memory_budget_mib"
        );
        assert_eq!(
            key_of(&EXAMPLE.replace("slots = 4", "slots = 4\npinned = true")),
            "pools[0].pinned"
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
            "source = \"/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf\"",
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
        // Readable by others: refused, naming the fix.
        let err = parse_str(&with(&good)).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&good, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let c = parse_str(&with(&good)).unwrap();
        assert_eq!(c.token, Some(Secret("node-token-0123456789".into())));
        assert!(!format!("{c:?}").contains("node-token-0123456789"));
    }
}
