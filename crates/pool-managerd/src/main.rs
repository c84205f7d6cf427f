//! `pool-managerd`: parses the configuration, sets up logging and signals, and runs the library.

use std::path::PathBuf;

use clap::Parser;
use pool_managerd::exit;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "pool-managerd",
    version,
    about = "The llama-orch node agent: runs this machine's pools and forwards work to their engines."
)]
struct Args {
    /// Node configuration file (TOML); see examples/node.toml.
    #[arg(long, env = "LLORCH_NODE_CONFIG")]
    config: PathBuf,
    /// Validate the configuration and exit: 0 when it is usable, 64 otherwise.
    #[arg(long)]
    check_config: bool,
    /// Where to offer `org.llamaorch.PoolManager1` (docs/DBUS.md): `auto` (the system bus
    /// when the name can be owned there, else none, said once), `system`, `session` (each
    /// fatal when it cannot be had) or `off`.
    #[arg(long, env = "LLORCH_DBUS", default_value = "auto")]
    dbus: llorch_bus::Mode,
}

fn main() {
    llorch_os::service::init_logging("info");
    let args = Args::parse();
    let mut config = match pool_managerd::config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            llorch_os::service::config_rejected("pool-managerd", &e);
            std::process::exit(exit::USAGE);
        }
    };
    config.dbus = args.dbus;
    if args.check_config {
        // What only a check at hand can see: a local model file that is not there (a running
        // node reports it as the pool's error and keeps its other pools).
        let missing = pool_managerd::config::missing_local_sources(&config);
        if !missing.is_empty() {
            for m in &missing {
                eprintln!("pool-managerd: {}: {m}", args.config.display());
            }
            std::process::exit(exit::USAGE);
        }
        println!(
            "configuration ok: node {}, {} pool(s), listening on {}",
            config.node().id,
            config.pools().len(),
            config.node().listen
        );
        return;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("pool-managerd: cannot start the async runtime: {e}");
            std::process::exit(exit::SOFTWARE);
        }
    };
    let code = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        if let Err(e) = llorch_os::service::cancel_on_stop_signal(shutdown.clone()) {
            tracing::error!(error = %e, "Cannot install signal handlers; stop pool-managerd with SIGKILL.");
        }
        match pool_managerd::run(config, args.config.clone(), shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "pool-managerd stopped: {e}");
                e.exit_code()
            }
        }
    });
    std::process::exit(code);
}
