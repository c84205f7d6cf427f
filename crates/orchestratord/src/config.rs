//! orchestratord configuration: flags (each with an environment variable), validated before
//! the listener is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::admission::Policy;
use crate::auth::{ApiKeys, KeyKind, KeysError};

/// Defaults worth knowing.
pub mod defaults {
    pub const LISTEN: &str = "127.0.0.1:8080";
    pub const QUEUE_CAPACITY: usize = 256;
    pub const MAX_BODY_BYTES: usize = 1 << 20;
    pub const SESSION_TTL_SECS: u64 = 600;
    pub const RESPONSES_TTL_SECS: u64 = 3600;
    pub const RESPONSES_STORE_MIB: usize = 64;
    pub const DEFAULT_MAX_TOKENS: u32 = 1024;
    pub const STREAM_IDLE_SECS: u64 = 120;
    pub const SSE_KEEPALIVE_SECS: u64 = 15;
    pub const MAX_CONNECTIONS: usize = 4096;
    pub const HEADER_READ_SECS: u64 = 30;
    pub const REGISTRATION_GRACE_SECS: u64 = 15;
    pub const OFFLINE_AFTER_BEATS: u32 = llorch_wire::node::MISSED_HEARTBEATS_OFFLINE;
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "orchestratord",
    version,
    about = "The llama-orch control plane: OpenAI and native APIs, admission, placement, streaming."
)]
pub struct Args {
    /// Address of the public API.
    #[arg(long, env = "LLORCH_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,
    /// API key file: one `NAME KEY` per line, `NAME KEY admin` for an operator's key (drain,
    /// resume, nodes, reload). Default: `$CREDENTIALS_DIRECTORY/api-keys` when that file
    /// exists. Without keys the daemon serves loopback only.
    #[arg(long, env = "LLORCH_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// Node token file (`NAME TOKEN` lines) that pool-managerd must present to register and
    /// heartbeat. Default: `$CREDENTIALS_DIRECTORY/node-tokens` when that file exists.
    #[arg(long, env = "LLORCH_NODE_TOKENS")]
    pub node_tokens: Option<PathBuf>,
    /// File holding one token (its first line) that acts as an API key marked `admin`: the
    /// operator's credential where there are no API keys (`llorch up` writes one for each
    /// run). Default: `$CREDENTIALS_DIRECTORY/admin-token` when that file exists. Without it
    /// and without admin keys, the operator endpoints are refused over HTTP (D-Bus remains).
    #[arg(long, env = "LLORCH_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Names besides loopback ones under which clients reach this server (`Host`), comma
    /// separated: on a loopback listener (or wherever this is given) a request for any other
    /// name is refused with 421, which stops DNS rebinding. `*` turns the check off.
    #[arg(long, env = "LLORCH_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Web origins (`https://chat.example.com`) whose pages may call the API from a browser,
    /// comma separated; they get CORS answers. Other origins are refused with 403. `*` allows
    /// any origin and needs API keys.
    #[arg(long, env = "LLORCH_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Tasks that may wait in the queue.
    #[arg(long, env = "LLORCH_QUEUE_CAPACITY", default_value_t = defaults::QUEUE_CAPACITY)]
    pub queue_capacity: usize,
    /// What happens when the queue is full: `reject` or `drop-lru`.
    #[arg(long, env = "LLORCH_ADMISSION_POLICY", default_value = "reject")]
    pub admission_policy: Policy,
    /// Largest accepted request body.
    #[arg(long, env = "LLORCH_MAX_BODY_BYTES", default_value_t = defaults::MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Seconds a session keeps its affinity to the pool holding its KV cache.
    #[arg(long, env = "LLORCH_SESSION_TTL_SECS", default_value_t = defaults::SESSION_TTL_SECS)]
    pub session_ttl_secs: u64,
    /// Seconds a stored answer of the Responses API can be named by `previous_response_id`.
    #[arg(long, env = "LLORCH_RESPONSES_TTL_SECS", default_value_t = defaults::RESPONSES_TTL_SECS)]
    pub responses_ttl_secs: u64,
    /// Memory the stored answers of the Responses API may hold together, in MiB (one API key
    /// at most a quarter of it; the oldest go first). 0 stores nothing.
    #[arg(long, env = "LLORCH_RESPONSES_STORE_MIB", default_value_t = defaults::RESPONSES_STORE_MIB)]
    pub responses_store_mib: usize,
    /// Score pools by the prompt prefix they probably hold (cache-aware placement); `false`
    /// places by free slots alone.
    #[arg(long, env = "LLORCH_CACHE_AWARE_PLACEMENT", default_value_t = true, action = clap::ArgAction::Set)]
    pub cache_aware_placement: bool,
    /// `max_tokens` of a request that gives none (the engine also stops at its slot's context).
    #[arg(long, env = "LLORCH_DEFAULT_MAX_TOKENS", default_value_t = defaults::DEFAULT_MAX_TOKENS)]
    pub default_max_tokens: u32,
    /// Seconds a running task may go without any event from its engine (including the time to
    /// evaluate its prompt) before it ends with ENGINE_FAILED and its pool is skipped until its
    /// node reports again: a wedged engine must not hold a slot forever.
    #[arg(long, env = "LLORCH_STREAM_IDLE_SECS", default_value_t = defaults::STREAM_IDLE_SECS)]
    pub stream_idle_secs: u64,
    /// Seconds a stream may go without a byte while its task waits (in the queue, or for a
    /// model loading on demand) before it gets a `: keep-alive` comment; an OpenAI stream that
    /// has not started after this long sends its 200 head. Keep it below the idle timeout of
    /// any proxy in front.
    #[arg(long, env = "LLORCH_SSE_KEEPALIVE_SECS", default_value_t = defaults::SSE_KEEPALIVE_SECS)]
    pub sse_keepalive_secs: u64,
    /// Client connections served at once; further ones wait in the listen backlog until one
    /// closes. Each open stream holds one.
    #[arg(long, env = "LLORCH_MAX_CONNECTIONS", default_value_t = defaults::MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers, counted from when the
    /// server is ready to read them: a client that trickles its headers (slowloris), or a
    /// keep-alive connection idle for this long, is closed.
    #[arg(long, env = "LLORCH_HEADER_READ_SECS", default_value_t = defaults::HEADER_READ_SECS)]
    pub header_read_secs: u64,
    /// Seconds after start during which a request for a model no node has registered yet waits
    /// in the queue instead of being refused: after a restart, nodes register again within a
    /// heartbeat (default 3 × 5 s). When it ends, tasks for models still unknown end with
    /// MODEL_NOT_FOUND. 0 refuses at once (503 before any node registered, 404 after).
    #[arg(long, env = "LLORCH_REGISTRATION_GRACE_SECS", default_value_t = defaults::REGISTRATION_GRACE_SECS)]
    pub registration_grace_secs: u64,
    /// Heartbeat intervals without a heartbeat after which a node is offline and its running
    /// tasks end with NODE_UNAVAILABLE (2 to 20). It is suspect (nothing new is placed on it)
    /// after 1.5 intervals whatever this says.
    #[arg(long, env = "LLORCH_OFFLINE_AFTER_BEATS", default_value_t = defaults::OFFLINE_AFTER_BEATS)]
    pub offline_after_beats: u32,
    /// PEM certificate chain of the public listener; with `--tls-key`, every connection
    /// (clients and nodes) must speak TLS. Default: `$CREDENTIALS_DIRECTORY/tls-cert` when that
    /// file exists.
    #[arg(long, env = "LLORCH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`. Default: `$CREDENTIALS_DIRECTORY/tls-key` when that
    /// file exists.
    #[arg(long, env = "LLORCH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM file of the CA that signed the workers' node API certificates (`https://` node
    /// addresses are verified against it alone). Default: `$CREDENTIALS_DIRECTORY/node-ca` when
    /// that file exists, else the system's CA store.
    #[arg(long, env = "LLORCH_NODE_CA")]
    pub node_ca: Option<PathBuf>,
    /// Allow plain HTTP where it leaves this host: a listener off loopback without TLS, and
    /// nodes that register an `http://` address off loopback. Keys, tokens and prompts then
    /// cross the network in the clear; the daemon says so at start.
    #[arg(long, env = "LLORCH_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
    /// UDP address for nodes' liveness beats (docs/API.md, "Liveness beats"): a registered
    /// node then sends a 52-byte authenticated datagram each interval instead of an HTTPS
    /// heartbeat, and a full report only when something changed. Usually the API's address
    /// (same port, UDP). An inherited socket named `beats` (orchestratord-beats.socket) is
    /// taken without it. Without either, nodes heartbeat over HTTP as before.
    #[arg(long, env = "LLORCH_BEATS_LISTEN")]
    pub beats_listen: Option<SocketAddr>,
    /// A Unix socket serving the same API in plain HTTP, for the node agent of this machine
    /// when the API itself listens elsewhere (a LAN address, TLS only). Who may connect is the
    /// socket file's mode. An inherited socket named `local` (orchestratord-local.socket) is
    /// taken without it.
    #[arg(long, env = "LLORCH_LOCAL_SOCKET")]
    pub local_socket: Option<PathBuf>,
    /// Where to offer `org.llamaorch.Orchestrator1` (docs/DBUS.md): `auto` (the system bus
    /// when the name can be owned there, else none, said once), `system`, `session` (each
    /// fatal when it cannot be had) or `off`.
    #[arg(long, env = "LLORCH_DBUS", default_value = "auto")]
    pub dbus: llorch_bus::Mode,
    /// Validate the configuration (and key files) and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Copy node-tokens, api-keys and admin-token from /etc/llama-orch into
    /// `$RUNTIME_DIRECTORY` for the service's user, and exit: what the unit runs as root
    /// before each start and reload (`orchestratord::secrets`).
    #[arg(long)]
    pub stage_secrets: bool,
}

#[derive(Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub api_keys: Option<ApiKeys>,
    pub node_tokens: Option<ApiKeys>,
    /// Where the keys came from, to read them again on SIGHUP.
    pub api_keys_path: Option<PathBuf>,
    pub node_tokens_path: Option<PathBuf>,
    /// The operator's token (`--admin-token-file`), and where it came from.
    pub admin_token: Option<ApiKeys>,
    pub admin_token_path: Option<PathBuf>,
    /// `--allowed-hosts`.
    pub allowed_hosts: Vec<String>,
    /// `--cors-origins`.
    pub cors_origins: CorsOrigins,
    pub queue_capacity: usize,
    pub policy: Policy,
    pub max_body_bytes: usize,
    pub session_ttl: Duration,
    /// `--responses-ttl-secs`.
    pub responses_ttl: Duration,
    /// `--responses-store-mib`, in bytes.
    pub responses_store_bytes: usize,
    /// Cache-aware placement on (`--cache-aware-placement`).
    pub cache_aware_placement: bool,
    pub default_max_tokens: u32,
    pub stream_idle: Duration,
    pub sse_keepalive: Duration,
    pub max_connections: usize,
    pub header_read: Duration,
    /// How long after start requests for not-yet-registered models wait.
    pub registration_grace: Duration,
    /// Missed heartbeat intervals after which a node is offline.
    pub offline_after_beats: u32,
    /// TLS on the public listener.
    pub tls: Option<ServerTls>,
    /// The CAs `https://` node addresses are verified against.
    pub node_roots: llorch_client::TlsRoots,
    /// Plain HTTP off this host is allowed (`--allow-plaintext`).
    pub allow_plaintext: bool,
    /// The bus of the D-Bus front (`--dbus`).
    pub dbus: llorch_bus::Mode,
    /// Where to bind the beats socket when none is inherited (`--beats-listen`).
    pub beats_listen: Option<SocketAddr>,
    /// Where to bind the local socket when none is inherited (`--local-socket`).
    pub local_socket: Option<PathBuf>,
    /// The UDP port beats are read on, once the socket is taken or bound: registrations are
    /// granted beat sessions only then.
    pub beat_port: Option<u16>,
}

/// Which origins may call the API from a browser (`--cors-origins`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CorsOrigins {
    /// None but the API's own origin.
    #[default]
    None,
    /// These origins (`scheme://host[:port]`, lower case).
    List(Vec<String>),
    /// Any origin (`*`; only with API keys, which a page cannot send on its own).
    Any,
}

impl CorsOrigins {
    /// Parses `--cors-origins` values: `*`, or origins such as `https://chat.example.com`.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        if values.is_empty() {
            return Ok(Self::None);
        }
        if values.iter().any(|v| v == "*") {
            if values.len() > 1 {
                return Err("`*` allows every origin and must stand alone".into());
            }
            return Ok(Self::Any);
        }
        let mut list = Vec::new();
        for v in values {
            let origin = v.trim_end_matches('/').to_ascii_lowercase();
            let Some((scheme, authority)) = origin.split_once("://") else {
                return Err(format!(
                    "{v:?} is not an origin: write it as scheme://host[:port], e.g. https://chat.example.com"
                ));
            };
            if !matches!(scheme, "http" | "https")
                || authority.is_empty()
                || authority.contains(['/', '?', '#', '@', ' '])
            {
                return Err(format!(
                    "{v:?} is not an origin: write it as http(s)://host[:port], no path"
                ));
            }
            list.push(origin);
        }
        Ok(Self::List(list))
    }

    pub(crate) fn allows(&self, origin: &str) -> bool {
        match self {
            Self::None => false,
            Self::Any => true,
            Self::List(list) => list.iter().any(|o| o.eq_ignore_ascii_case(origin)),
        }
    }
}

/// The public listener's TLS acceptor.
#[derive(Clone)]
pub struct ServerTls(pub llorch_http::tls::Acceptor);

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// Off loopback, every missing guard at once (API keys, node tokens, TLS), one per line.
    #[error("--listen {listen} is not a loopback address, and:\n{}", .missing.join("\n"))]
    OffLoopback {
        listen: SocketAddr,
        missing: Vec<&'static str>,
    },
    #[error(transparent)]
    Tls(#[from] llorch_http::tls::TlsError),
    #[error("--node-ca: {0}")]
    NodeCa(llorch_client::ClientError),
    #[error("--{0}: {1}")]
    Value(&'static str, String),
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: defaults::LISTEN.parse().expect("valid default"),
            api_keys: None,
            node_tokens: None,
            api_keys_path: None,
            node_tokens_path: None,
            admin_token: None,
            admin_token_path: None,
            allowed_hosts: Vec::new(),
            cors_origins: Default::default(),
            queue_capacity: defaults::QUEUE_CAPACITY,
            policy: Policy::Reject,
            max_body_bytes: defaults::MAX_BODY_BYTES,
            session_ttl: Duration::from_secs(defaults::SESSION_TTL_SECS),
            responses_ttl: Duration::from_secs(defaults::RESPONSES_TTL_SECS),
            responses_store_bytes: defaults::RESPONSES_STORE_MIB << 20,
            cache_aware_placement: true,
            default_max_tokens: defaults::DEFAULT_MAX_TOKENS,
            stream_idle: Duration::from_secs(defaults::STREAM_IDLE_SECS),
            sse_keepalive: Duration::from_secs(defaults::SSE_KEEPALIVE_SECS),
            max_connections: defaults::MAX_CONNECTIONS,
            header_read: Duration::from_secs(defaults::HEADER_READ_SECS),
            registration_grace: Duration::from_secs(defaults::REGISTRATION_GRACE_SECS),
            offline_after_beats: defaults::OFFLINE_AFTER_BEATS,
            tls: None,
            node_roots: llorch_client::TlsRoots::system(),
            allow_plaintext: false,
            dbus: llorch_bus::Mode::Off,
            beats_listen: None,
            local_socket: None,
            beat_port: None,
        }
    }
}

use llorch_os::service::credential;

impl Args {
    pub fn into_config(mut self) -> Result<Config, ConfigError> {
        let api_keys_path = self.api_keys.take().or_else(|| credential("api-keys"));
        let node_tokens_path = self
            .node_tokens
            .take()
            .or_else(|| credential("node-tokens"));
        let api_keys = match &api_keys_path {
            Some(p) => Some(ApiKeys::load(p, KeyKind::Api)?),
            None => None,
        };
        let node_tokens = match &node_tokens_path {
            Some(p) => Some(ApiKeys::load(p, KeyKind::Node)?),
            None => None,
        };
        let admin_token_path = self
            .admin_token_file
            .take()
            .or_else(|| credential("admin-token"));
        let admin_token = match &admin_token_path {
            Some(p) => Some(ApiKeys::load_admin_token(p)?),
            None => None,
        };
        let cors_origins = CorsOrigins::parse(&self.cors_origins)
            .map_err(|e| ConfigError::Value("cors-origins", e))?;
        if cors_origins == CorsOrigins::Any && api_keys.is_none() {
            return Err(ConfigError::Value(
                "cors-origins",
                "`*` without API keys would let every web page the user opens drive this server; list the origins, or give --api-keys".into(),
            ));
        }
        for h in &self.allowed_hosts {
            if h.is_empty()
                || (h != "*"
                    && !h
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-_[]:".contains(c)))
            {
                return Err(ConfigError::Value(
                    "allowed-hosts",
                    format!("{h:?} is not a host name; give names such as box.lan, without scheme or port"),
                ));
            }
        }
        let tls_cert = self.tls_cert.take().or_else(|| credential("tls-cert"));
        let tls_key = self.tls_key.take().or_else(|| credential("tls-key"));
        let tls = match (&tls_cert, &tls_key) {
            (Some(cert), Some(key)) => Some(ServerTls(llorch_http::tls::acceptor(cert, key)?)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Value(
                    "tls-key",
                    "--tls-cert is given without its key; give both or neither".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::Value(
                    "tls-cert",
                    "--tls-key is given without its certificate; give both or neither".into(),
                ))
            }
        };
        let node_roots = match self.node_ca.take().or_else(|| credential("node-ca")) {
            Some(p) => llorch_client::TlsRoots::from_pem_file(&p).map_err(ConfigError::NodeCa)?,
            None => llorch_client::TlsRoots::system(),
        };
        if !self.listen.ip().is_loopback() {
            // Each missing guard is named, not only the first: one fix, one restart.
            let missing: Vec<&'static str> = [
                (api_keys.is_none(), "- no API keys are configured: anyone who reaches it could use the API; give --api-keys (or the api-keys credential) or listen on 127.0.0.1"),
                (node_tokens.is_none(), "- no node tokens are configured: anyone who reaches it could register a node and receive prompts; give --node-tokens (or the node-tokens credential)"),
                (tls.is_none() && !self.allow_plaintext, "- it has no TLS: API keys, node tokens and prompts would cross the network in the clear; give --tls-cert and --tls-key (or the tls-cert and tls-key credentials), or --allow-plaintext to accept that"),
            ]
            .into_iter()
            .filter_map(|(missing, why)| missing.then_some(why))
            .collect();
            if !missing.is_empty() {
                return Err(ConfigError::OffLoopback {
                    listen: self.listen,
                    missing,
                });
            }
        }
        self.check_ranges()?;
        Ok(Config {
            listen: self.listen,
            api_keys,
            node_tokens,
            api_keys_path,
            node_tokens_path,
            admin_token,
            admin_token_path,
            allowed_hosts: std::mem::take(&mut self.allowed_hosts),
            cors_origins,
            queue_capacity: self.queue_capacity,
            policy: self.admission_policy,
            max_body_bytes: self.max_body_bytes,
            session_ttl: Duration::from_secs(self.session_ttl_secs),
            responses_ttl: Duration::from_secs(self.responses_ttl_secs),
            responses_store_bytes: self.responses_store_mib.saturating_mul(1 << 20),
            cache_aware_placement: self.cache_aware_placement,
            default_max_tokens: self.default_max_tokens,
            stream_idle: Duration::from_secs(self.stream_idle_secs),
            sse_keepalive: Duration::from_secs(self.sse_keepalive_secs),
            max_connections: self.max_connections,
            header_read: Duration::from_secs(self.header_read_secs),
            registration_grace: Duration::from_secs(self.registration_grace_secs),
            offline_after_beats: self.offline_after_beats,
            tls,
            node_roots,
            allow_plaintext: self.allow_plaintext,
            dbus: self.dbus,
            beats_listen: self.beats_listen,
            local_socket: self.local_socket,
            beat_port: None,
        })
    }

    /// Refuses numbers out of their range, naming the flag.
    fn check_ranges(&self) -> Result<(), ConfigError> {
        if self.queue_capacity == 0 || self.queue_capacity > 1_000_000 {
            return Err(ConfigError::Value(
                "queue-capacity",
                format!("{} is out of range; use 1 to 1000000", self.queue_capacity),
            ));
        }
        if self.max_body_bytes < 1024 {
            return Err(ConfigError::Value(
                "max-body-bytes",
                format!("{} is too small; use at least 1024", self.max_body_bytes),
            ));
        }
        if self.stream_idle_secs == 0 {
            return Err(ConfigError::Value(
                "stream-idle-secs",
                "must be at least 1".into(),
            ));
        }
        if !(1..=300).contains(&self.sse_keepalive_secs) {
            return Err(ConfigError::Value(
                "sse-keepalive-secs",
                format!("{} is out of range; use 1 to 300", self.sse_keepalive_secs),
            ));
        }
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(ConfigError::Value(
                "max-connections",
                format!("{} is out of range; use 1 to 1000000", self.max_connections),
            ));
        }
        if !(1..=3600).contains(&self.header_read_secs) {
            return Err(ConfigError::Value(
                "header-read-secs",
                format!("{} is out of range; use 1 to 3600", self.header_read_secs),
            ));
        }
        if !(2..=20).contains(&self.offline_after_beats) {
            return Err(ConfigError::Value(
                "offline-after-beats",
                format!(
                    "{} is out of range; use 2 to 20 (a node is suspect after 1.5 intervals, offline after this many)",
                    self.offline_after_beats
                ),
            ));
        }
        if self.registration_grace_secs > 300 {
            return Err(ConfigError::Value(
                "registration-grace-secs",
                format!(
                    "{} is out of range; use 0 to 300",
                    self.registration_grace_secs
                ),
            ));
        }
        if self.default_max_tokens == 0 {
            return Err(ConfigError::Value(
                "default-max-tokens",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_name_the_flag() {
        for (flag, value) in [
            ("--sse-keepalive-secs", "0"),
            ("--sse-keepalive-secs", "301"),
            ("--stream-idle-secs", "0"),
            ("--max-connections", "0"),
            ("--header-read-secs", "0"),
            ("--registration-grace-secs", "301"),
            ("--offline-after-beats", "1"),
            ("--offline-after-beats", "21"),
        ] {
            let err = Args::parse_from(["orchestratord", flag, value])
                .into_config()
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(flag), "{flag} {value}: {err}");
        }
        let ok = Args::parse_from(["orchestratord", "--sse-keepalive-secs", "5"])
            .into_config()
            .unwrap();
        assert_eq!(ok.sse_keepalive, Duration::from_secs(5));
    }

    #[test]
    fn off_loopback_every_missing_guard_is_named() {
        // CREDENTIALS_DIRECTORY may name files in the test's environment; none here.
        let err = Args::parse_from(["orchestratord", "--listen", "0.0.0.0:8443"])
            .into_config()
            .unwrap_err()
            .to_string();
        for flag in ["--api-keys", "--node-tokens", "--tls-cert"] {
            assert!(err.contains(flag), "{flag} missing from: {err}");
        }
        let err = Args::parse_from([
            "orchestratord",
            "--listen",
            "0.0.0.0:8443",
            "--allow-plaintext",
        ])
        .into_config()
        .unwrap_err()
        .to_string();
        assert!(!err.contains("--tls-cert"), "{err}");
    }

    #[test]
    fn browser_settings_are_checked() {
        let err = |args: &[&str]| {
            let mut all = vec!["orchestratord"];
            all.extend_from_slice(args);
            Args::parse_from(all).into_config().unwrap_err().to_string()
        };
        // Every origin, without keys: every page the user opens could drive the server.
        assert!(err(&["--cors-origins", "*"]).starts_with("--cors-origins"));
        assert!(err(&["--cors-origins", "chat.example.com"]).contains("scheme://"));
        assert!(err(&["--allowed-hosts", "http://box.lan"]).starts_with("--allowed-hosts"));
        let ok = Args::parse_from([
            "orchestratord",
            "--cors-origins",
            "https://chat.example.com,http://localhost:3000",
            "--allowed-hosts",
            "box.lan",
        ])
        .into_config()
        .unwrap();
        assert_eq!(ok.allowed_hosts, ["box.lan"]);
        assert!(ok.cors_origins.allows("http://localhost:3000"));
    }

    #[test]
    fn off_loopback_needs_api_keys_and_node_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "a 0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let keys = keys.to_str().unwrap();
        let open = |args: &[&str]| {
            let mut all = vec!["orchestratord", "--listen", "0.0.0.0:8080"];
            all.extend_from_slice(args);
            Args::parse_from(all)
                .into_config()
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(open(&[]).unwrap_err().contains("no API keys"));
        // API keys alone leave node registration open to the network: refused too.
        let err = open(&["--api-keys", keys]).unwrap_err();
        assert!(
            err.contains("no node tokens") && err.contains("--node-tokens"),
            "{err}"
        );
        // Both, in the clear: refused unless asked for.
        let err = open(&["--api-keys", keys, "--node-tokens", keys]).unwrap_err();
        assert!(
            err.contains("--tls-cert") && err.contains("--allow-plaintext"),
            "{err}"
        );
        open(&[
            "--api-keys",
            keys,
            "--node-tokens",
            keys,
            "--allow-plaintext",
        ])
        .unwrap();
        let err = open(&["--tls-cert", keys, "--allow-plaintext"]).unwrap_err();
        assert!(err.starts_with("--tls-key"), "{err}");
        let err = open(&["--tls-cert", keys, "--tls-key", keys]).unwrap_err();
        assert!(
            err.contains("TLS certificate") && err.contains("keys"),
            "{err}"
        );
        // On loopback neither is required.
        Args::parse_from(["orchestratord"]).into_config().unwrap();
    }
}
