//! pool-managerd, the node agent: runs this machine's pools (provisioner and engine per pool),
//! learns of ready engines from their handoff files, registers and heartbeats to the control
//! plane, and serves the node API that forwards dispatched work to local engines.
//!
//! Modules, by what they own:
//! - [`config`]: the TOML configuration (`config/`: `schema.rs` the serde types, `validate.rs`
//!   the checks, one function per section, and the [`config::Checked`] result, `reload.rs` the
//!   `[node]` keys a reload cannot apply, `layout.rs` the runtime directory's files).
//! - [`launcher`]: starting and stopping processes, behind the [`launcher::Launcher`] trait
//!   (`launcher/mod.rs`); `process.rs` runs child processes, `systemd/` template units over
//!   D-Bus (its zbus proxies in `systemd/proxies.rs`).
//! - [`supervisor`]: one task per pool, one method per phase (provision, activate, start,
//!   serve, backoff); restarts with backoff.
//! - [`pools`]: the set of running pools, changed on reload (SIGHUP).
//! - [`handoff`]: the inotify watcher of the handoff directory.
//! - [`gpu`]: the GPU inventory from NVML (none on a CPU node).
//! - [`commands`]: the commands a pool's supervisor takes, and handing one over.
//! - [`state`]: the shared pool table, the derived pool state, and each pool's channel of
//!   commands ([`commands::Command`]) to its supervisor.
//! - [`api`]: the node API (axum) and the streaming forward.
//! - [`control`]: operator actions (drain, resume, load, unload, restart, reload), shared by
//!   the node API and the D-Bus front [`dbus`] (`org.llamaorch.PoolManager1`).
//! - [`register`]: registration and heartbeats (`register/mod.rs`), and the UDP liveness beats
//!   that replace unchanged heartbeats (`register/beats.rs`).
//! - [`metrics`]: Prometheus metrics, GPU gauges, the engines' metrics re-exported.
//! - [`budget`]: the node's memory budgets, what each pool is charged, and the pure decision
//!   of which idle pools to unload to make room (`budget/room.rs`).
//! - [`swap`]: making room for a request or an operator's load, one swap at a time.
//!
//! This file starts them in order ([`run_with`]: listener, watcher, pools, heartbeats, API,
//! D-Bus, then the reload loop) and stops them in reverse.
//!
//! Dependencies between the modules go one way: `config`, `gpu` and `commands` at the bottom, then
//! `budget`, `metrics`, `state`, `swap`, `launcher`, `supervisor`, `pools`, and the fronts (`api`, `control`,
//! `dbus`, `register`, `handoff`) on top; none imports a module that imports it back.

pub mod api;
pub mod budget;
pub mod commands;
pub mod config;
pub mod control;
pub mod dbus;
pub mod gpu;
pub mod handoff;
pub mod launcher;
pub mod metrics;
pub mod pools;
pub mod register;
pub mod state;
pub mod supervisor;
pub mod swap;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Checked, Listen};
use crate::launcher::{Launcher, ProcessLauncher};
use crate::state::Node;

/// Sets the node's memory budgets from its configuration, `MemAvailable` now and NVML, and
/// says what they are.
fn set_memory_budgets(node: &Node, config: &Checked) {
    let gpus = node.gpus.has_nvml().then(|| node.gpus.read());
    let budgets = budget::budgets(
        config.node(),
        config.pools(),
        llorch_os::mem::available_bytes(),
        gpus.as_ref(),
    );
    let min_resident = Duration::from_secs(
        config
            .node()
            .min_resident_secs
            .unwrap_or(config::MIN_RESIDENT_SECS),
    );
    for (device, bytes) in &budgets.bytes {
        tracing::info!(device = %device, budget_mib = bytes >> 20, "Memory budget for loaded pools.");
    }
    if let Some(m) = budgets.max_loaded {
        tracing::info!(max_loaded = m, "At most this many pools loaded at once.");
    }
    *llorch_os::sync::lock(&node.memory) = budget::Settings {
        budgets,
        min_resident,
    };
}

/// Exit codes (the workspace's, `llorch_wire::exit`): 64 the configuration is invalid; 69 the
/// node API cannot listen, or the runtime directory cannot be prepared; 70 an internal error.
pub use llorch_wire::exit;

/// Why the node could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot prepare the runtime directory {}: {source} (check node.runtime_dir and its permissions)", path.display())]
    Runtime {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Listen(#[from] llorch_os::ListenError),
    #[error("cannot listen on {addr}: {source} (check node.listen)")]
    Tcp {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Watch(#[from] handoff::WatchError),
    #[error("the control plane address is unusable: {0}")]
    ControlPlane(llorch_client::ClientError),
    #[error("the node API failed: {0}")]
    Serve(std::io::Error),
    #[error("the node API's TLS files are unusable: {0}")]
    Tls(llorch_http::tls::TlsError),
    #[error("cannot use systemd to run the engines: {0}")]
    Launcher(launcher::LaunchError),
    #[error("{0} (choose another bus with --dbus, or --dbus off)")]
    Bus(String),
}

impl RunError {
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Runtime { .. } | Self::Listen(_) | Self::Tcp { .. } | Self::Watch(_) => {
                exit::UNAVAILABLE
            }
            Self::ControlPlane(_) | Self::Tls(_) => exit::USAGE,
            Self::Launcher(_) | Self::Bus(_) => exit::UNAVAILABLE,
            Self::Serve(_) => exit::SOFTWARE,
        }
    }
}

/// Runs the node with child-process engines until `shutdown` is cancelled, then stops every
/// engine and returns. On SIGHUP it reads `config_path` again and applies its pools.
pub async fn run(
    config: Checked,
    config_path: PathBuf,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let node = &config.config.node;
    let systemd = match node.launcher {
        config::LauncherKind::Systemd => true,
        config::LauncherKind::Process => false,
        // A systemd service: systemd (PID 1) is the parent and set INVOCATION_ID. A child of
        // anything else (llorch up, a test under a CI runner's service) inherits at most the
        // variable, not the parent.
        config::LauncherKind::Auto => {
            std::env::var_os("INVOCATION_ID").is_some() && std::os::unix::process::parent_id() == 1
        }
    };
    let launcher: Arc<dyn Launcher> = if systemd {
        use launcher::systemd::{UNIT_CACHE_DIR, UNIT_RUNTIME_DIR};
        for (key, have, want) in [
            ("node.runtime_dir", &node.runtime_dir, UNIT_RUNTIME_DIR),
            ("node.cache_dir", &node.cache_dir, UNIT_CACHE_DIR),
        ] {
            if have != std::path::Path::new(want) {
                return Err(RunError::Launcher(launcher::LaunchError::Systemd {
                    unit: key.into(),
                    reason: format!(
                        "{key} is {}, but the engine units use {want}: set {key} = \"{want}\" (or launcher = \"process\")",
                        have.display()
                    ),
                }));
            }
        }
        let l = launcher::systemd::SystemdLauncher::connect(config.layout())
            .await
            .map_err(RunError::Launcher)?;
        tracing::info!("Engines run as systemd units (llorch-engine@<pool>), started over D-Bus.");
        Arc::new(l)
    } else {
        Arc::new(ProcessLauncher::new(
            node.engine_bin.clone(),
            node.provisioner_bin.clone(),
            node.cache_dir.clone(),
            config.layout(),
        ))
    };
    run_with(
        config,
        launcher,
        launcher::STOP_GRACE,
        Some(config_path),
        shutdown,
    )
    .await
}

/// Runs the node with the given launcher; `grace` is how long each engine may drain on
/// shutdown before it is killed. With `reload_from`, SIGHUP re-reads that file.
pub async fn run_with(
    config: Checked,
    launcher: Arc<dyn Launcher>,
    grace: Duration,
    reload_from: Option<PathBuf>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let layout = config.layout();
    layout.create().map_err(|source| RunError::Runtime {
        path: layout.root.clone(),
        source,
    })?;
    let node = Node::new(config.pools());
    set_memory_budgets(&node, &config);
    let client = control_plane_client(&config)?;
    // Listen first, so a bad address fails before any engine starts.
    let (listener, bound) = listen_node_api(&config.listen).await?;

    // Tasks that must end before the engines stop (watcher, heartbeats) and the supervisors.
    let stop_pools = CancellationToken::new();
    let watcher = handoff::spawn(node.clone(), layout.clone(), stop_pools.clone())?;
    let mut pools = pools::Pools::new(
        node.clone(),
        launcher.clone(),
        layout.clone(),
        grace,
        stop_pools.clone(),
    );
    for pool in config.pools() {
        pools.start(pool.clone());
    }
    let identity = register::Identity {
        node_id: config.node().id.clone(),
        advertise: config.advertise.clone(),
        heartbeat_secs: config.node().heartbeat_secs,
    };
    let heartbeats = tokio::spawn(register::run(
        node.clone(),
        client.clone(),
        identity.clone(),
        stop_pools.clone(),
    ));

    let stop_api = CancellationToken::new();
    let metrics_server = serve_metrics(&config, &node, &stop_api).await?;
    let server = serve_node_api(&config, &node, listener, &stop_api)?;
    // Operators' reloads (D-Bus) join SIGHUP's in the loop below.
    let (reloads, mut reload_requests) = tokio::sync::mpsc::channel::<control::ReloadRequest>(4);
    let bus = dbus::start(
        node.clone(),
        config.node().id.clone(),
        config.dbus,
        reloads,
        stop_api.clone(),
    )
    .await
    .map_err(RunError::Bus)?;
    tracing::info!(node_id = %config.node().id, pools = config.pools().len(), "Node started.");

    serve_until_shutdown(
        config,
        reload_from.as_deref(),
        &mut pools,
        &mut reload_requests,
        &shutdown,
    )
    .await?;
    tracing::info!("Shutting down: no new forwards; stopping every engine.");
    llorch_os::service::stopping();
    node.shutting_down.store(true, Ordering::SeqCst);
    // Tell the control plane first, so it stops placing work here before the engines go.
    register::final_heartbeat(&node, &client, &identity).await;
    stop_pools.cancel();
    pools.join().await;
    let _ = watcher.await;
    let _ = heartbeats.await;
    // A clean stop is not a lost node: the control plane forgets it now, without an alert.
    register::leave(&client, &identity).await;
    // Engines are gone, so every forwarded stream has ended; the server stops at once.
    stop_api.cancel();
    let served = server.await;
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    if let Some(b) = bus {
        let _ = b.await;
    }
    if let Some(path) = bound {
        // We bound the socket file ourselves, so nobody else removes it.
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("Node stopped.");
    // The loop itself cannot fail (accept errors are retried); a panic in it is reported.
    served.map_err(|e| RunError::Serve(std::io::Error::other(e.to_string())))
}

/// The HTTP client of the control plane, with the configured CA (else the system's roots)
/// and the node token.
fn control_plane_client(config: &Checked) -> Result<llorch_client::HttpClient, RunError> {
    let roots = match &config.control_plane_ca {
        Some(ca) => llorch_client::TlsRoots::from_pem_file(ca).map_err(RunError::ControlPlane)?,
        None => llorch_client::TlsRoots::system(),
    };
    Ok(
        llorch_client::HttpClient::with_roots(&config.node().control_plane, &roots)
            .map_err(RunError::ControlPlane)?
            .with_token(config.token.as_ref().map(|t| t.0.clone())),
    )
}

/// The node API's listener (passed by systemd, or bound here); with the socket file's path
/// when this process bound it and so must remove it.
async fn listen_node_api(listen: &Listen) -> Result<(Listener, Option<PathBuf>), RunError> {
    let mut bound = None;
    let listener = match listen {
        Listen::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| RunError::Runtime {
                    path: dir.to_owned(),
                    source,
                })?;
            }
            let (l, origin) = llorch_os::unix_listener("node-api", path)?;
            tracing::info!(socket = %path.display(), origin = ?origin, "Node API listening.");
            if matches!(origin, llorch_os::ListenerOrigin::Bound(_)) {
                bound = Some(path.clone());
            }
            Listener::Unix(l)
        }
        Listen::Tcp(addr) => {
            // Socket activation on TCP too: a cloud node's pool-managerd.socket drop-in
            // (ListenStream=<ip>:9200) passes the listener, and a restart refuses nobody.
            let (l, origin) = llorch_os::tcp_listener("node-api", *addr).await?;
            let local = l.local_addr().map_err(|source| RunError::Tcp {
                addr: *addr,
                source,
            })?;
            tracing::info!(address = %local, origin = ?origin, "Node API listening.");
            Listener::Tcp(l)
        }
    };
    Ok((listener, bound))
}

/// A listener's serving task; it ends once its stop token is cancelled.
type ServeTask = tokio::task::JoinHandle<()>;

/// The metrics-only listener (`node.metrics_listen`), when one is configured.
async fn serve_metrics(
    config: &Checked,
    node: &Arc<Node>,
    stop_api: &CancellationToken,
) -> Result<Option<ServeTask>, RunError> {
    let Some(addr) = config.node().metrics_listen else {
        return Ok(None);
    };
    let (l, _) = llorch_os::tcp_listener("metrics", addr).await?;
    tracing::info!(address = %addr, "Metrics listening.");
    let app = api::metrics_router(node.clone());
    let stop_api = stop_api.clone();
    Ok(Some(tokio::spawn(llorch_http::serve(
        l,
        app,
        llorch_http::Limits::default(),
        None,
        stop_api,
    ))))
}

/// Serves the node API on `listener` (TLS when configured) until `stop_api` is cancelled;
/// warns when tokens or prompts would cross the network in the clear.
fn serve_node_api(
    config: &Checked,
    node: &Arc<Node>,
    listener: Listener,
    stop_api: &CancellationToken,
) -> Result<ServeTask, RunError> {
    let app = api::router(node.clone(), config.token.as_ref().map(|t| t.0.clone()));
    let tls = match &config.tls {
        Some((cert, key)) => Some(llorch_http::tls::acceptor(cert, key).map_err(RunError::Tls)?),
        None => None,
    };
    if let Listen::Tcp(addr) = &config.listen {
        if tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(listen = %addr, "The node API serves plain HTTP off loopback (allow_plaintext): the node token and prompts cross the network in the clear.");
        }
    }
    if llorch_client::leaves_host_in_clear(&config.node().control_plane) {
        tracing::warn!(control_plane = %config.node().control_plane, "The control plane is reached over plain HTTP on another host (allow_plaintext): the node token crosses the network in the clear.");
    }
    let stop_api = stop_api.clone();
    // The node API takes the control plane's forwards (one connection per running task)
    // and, in the cloud, faces the network: bounded like orchestratord's listener.
    let limits = llorch_http::Limits::default();
    Ok(tokio::spawn(async move {
        match listener {
            Listener::Unix(l) => llorch_http::serve(l, app, limits, None, stop_api).await,
            Listener::Tcp(l) => llorch_http::serve(l, app, limits, tls, stop_api).await,
        }
    }))
}

/// The main loop: applies reloads (SIGHUP when `reload_from` is given, and operators'
/// requests) until `shutdown` is cancelled.
async fn serve_until_shutdown(
    config: Checked,
    reload_from: Option<&std::path::Path>,
    pools: &mut pools::Pools,
    reload_requests: &mut tokio::sync::mpsc::Receiver<control::ReloadRequest>,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let mut hangups = match reload_from {
        Some(_) => Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(RunError::Serve)?,
        ),
        None => None,
    };
    let mut running = config;
    loop {
        let hangup = async {
            match hangups.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = hangup => {
                if let Some(path) = reload_from {
                    let _ = reload(path, &mut running, pools).await;
                }
            }
            Some(reply) = reload_requests.recv() => {
                let outcome = match reload_from {
                    Some(path) => reload(path, &mut running, pools).await,
                    None => Err("pool-managerd runs without a configuration file to read again".into()),
                };
                let _ = reply.send(outcome);
            }
        }
    }
}

/// SIGHUP: reads the configuration again. A file that does not pass the checks changes
/// nothing (and is logged with the configuration-rejected MESSAGE_ID); otherwise the pools are
/// made those of the file, and changes to `[node]` are reported as needing a restart.
async fn reload(
    path: &std::path::Path,
    running: &mut Checked,
    pools: &mut pools::Pools,
) -> Result<pools::Changes, String> {
    llorch_os::service::reloading();
    let outcome = match config::load(path) {
        Err(e) => {
            tracing::error!(
                message_id = llorch_os::message_id::CONFIG_REJECTED,
                error = %e,
                "Reload refused; the configuration in force is unchanged."
            );
            Err(format!("{e}; the configuration in force is unchanged"))
        }
        Ok(new) => {
            let restart_needed = config::node_changes(running.node(), new.node());
            if !restart_needed.is_empty() {
                tracing::warn!(
                    keys = %restart_needed.join(", "),
                    "These [node] settings changed; they take effect when pool-managerd restarts."
                );
            }
            let changes = pools.apply(new.pools()).await;
            tracing::info!(
                added = %changes.added.join(","),
                removed = %changes.removed.join(","),
                restarted = %changes.replaced.join(","),
                "Configuration reloaded."
            );
            running.config.pools = new.config.pools;
            Ok(changes)
        }
    };
    llorch_os::service::ready();
    outcome
}

enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}
