//! `orchestratord`: parses configuration, sets up logging and signals, and runs the library.

use clap::Parser;
use orchestratord::{exit, Args};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    llorch_os::service::init_logging("info");
    let args = Args::parse();
    if args.stage_secrets {
        let Some(to) = std::env::var_os("RUNTIME_DIRECTORY") else {
            eprintln!("orchestratord: --stage-secrets needs $RUNTIME_DIRECTORY (the unit's RuntimeDirectory=)");
            std::process::exit(exit::USAGE);
        };
        // systemd sets one directory per RuntimeDirectory= entry, colon separated.
        let to = std::path::PathBuf::from(to.to_string_lossy().split(':').next().unwrap_or(""));
        match orchestratord::secrets::stage(std::path::Path::new("/etc/llama-orch"), &to) {
            Ok(n) => {
                tracing::info!(files = n, to = %to.display(), "Staged the key files.");
                return;
            }
            Err(e) => {
                eprintln!("orchestratord: --stage-secrets: {e}");
                std::process::exit(exit::UNAVAILABLE);
            }
        }
    }
    let check_only = args.check_config;
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            llorch_os::service::config_rejected("orchestratord", &e);
            std::process::exit(exit::USAGE);
        }
    };
    if check_only {
        println!("configuration ok");
        return;
    }
    match &config.api_keys {
        Some(keys) => tracing::info!(keys = keys.len(), "Client API keys loaded."),
        None => tracing::warn!(
            listen = %config.listen,
            "No API keys configured: serving without authentication, on loopback only."
        ),
    }
    let (listener, origin) = match llorch_os::tcp_listener("api", config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("orchestratord: {e}");
            std::process::exit(exit::UNAVAILABLE);
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    // An inherited socket may listen elsewhere than --listen says: the same rules apply to it.
    if let Some(a) = listener.local_addr().ok().filter(|a| !a.ip().is_loopback()) {
        guard_off_loopback(&config, a);
    }
    if config.allow_plaintext {
        tracing::warn!("--allow-plaintext: nodes may register http:// addresses off this host; prompts sent to them cross the network in the clear.");
    }
    tracing::info!(listen = %addr, origin = ?origin, tls = config.tls.is_some(), queue = config.queue_capacity, policy = config.policy.as_str(), "Serving the API.");
    let mut config = config;
    let beats = match llorch_os::udp_socket("beats", config.beats_listen) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("orchestratord: --beats-listen: {e}");
            std::process::exit(exit::UNAVAILABLE);
        }
    };
    if let Some((socket, origin)) = &beats {
        let at = socket.local_addr().ok();
        config.beat_port = at.map(|a| a.port());
        tracing::info!(beats = ?at, origin = ?origin, "Reading node liveness beats (UDP).");
    }
    let local = local_socket(&config);
    let shutdown = CancellationToken::new();
    if let Err(e) = llorch_os::service::cancel_on_stop_signal(shutdown.clone()) {
        eprintln!("orchestratord: cannot install signal handlers: {e}");
        std::process::exit(exit::SOFTWARE);
    }
    let dbus = config.dbus;
    let state = orchestratord::State::new(config);
    tokio::spawn(reload_on_hangup(state.clone()));
    if let Some((socket, _)) = beats {
        tokio::spawn(orchestratord::beats::serve(
            state.clone(),
            socket,
            shutdown.clone(),
        ));
    }
    if let Some((listener, origin)) = local {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            orchestratord::serve_local(state, listener, shutdown).await;
            // A socket file bound here is this process's to remove.
            if let llorch_os::ListenerOrigin::Bound(path) = origin {
                let _ = std::fs::remove_file(path);
            }
        });
    }
    if let Err(e) = orchestratord::dbus::start(state.clone(), dbus).await {
        eprintln!("orchestratord: {e} (choose another bus with --dbus, or --dbus off)");
        std::process::exit(exit::UNAVAILABLE);
    }
    if let Err(e) = orchestratord::serve_state(state, listener, shutdown).await {
        eprintln!("orchestratord: {e}");
        std::process::exit(exit::SOFTWARE);
    }
    tracing::info!("Stopped.");
}

/// SIGHUP (`systemctl reload`): read the key files again without touching running streams.
async fn reload_on_hangup(state: std::sync::Arc<orchestratord::State>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let _ = orchestratord::control::reload_keys(&state, "SIGHUP");
    }
}

/// Off loopback, an inherited socket needs what `--listen` off loopback needs: keys, node
/// tokens and TLS (or `--allow-plaintext`). Every missing one is named, then exit 64.
fn guard_off_loopback(config: &orchestratord::Config, a: std::net::SocketAddr) {
    // Every missing guard at once, as for --listen.
    let missing: Vec<&str> = [
            (config.api_keys.is_none(), "- no API keys are configured (give --api-keys or the api-keys credential)"),
            (config.node_tokens.is_none(), "- no node tokens are configured (give --node-tokens or the node-tokens credential)"),
            (config.tls.is_none() && !config.allow_plaintext, "- it has no TLS (give --tls-cert and --tls-key, or the tls-cert and tls-key credentials, or --allow-plaintext)"),
        ]
        .into_iter()
        .filter_map(|(missing, why)| missing.then_some(why))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "orchestratord: the inherited socket {a} is not loopback, and:\n{}",
            missing.join("\n")
        );
        std::process::exit(exit::USAGE);
    }
    if config.tls.is_none() {
        tracing::warn!(listen = %a, "Serving plain HTTP off loopback (--allow-plaintext): API keys, node tokens and prompts cross the network in the clear.");
    }
}

/// The local socket (`--local-socket`, or the inherited one named `local`), when there is one.
fn local_socket(
    config: &orchestratord::Config,
) -> Option<(tokio::net::UnixListener, llorch_os::ListenerOrigin)> {
    let local = match llorch_os::optional_unix_listener("local", config.local_socket.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("orchestratord: --local-socket: {e}");
            std::process::exit(exit::UNAVAILABLE);
        }
    };
    if let Some((_, origin)) = &local {
        tracing::info!(origin = ?origin, "Serving the API on the local socket (plain HTTP, for this machine's node agent).");
    }
    local
}
