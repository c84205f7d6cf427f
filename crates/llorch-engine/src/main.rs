//! `llorch-engine`: parses configuration, sets up logging and signals, and runs the library.

use clap::Parser;
use llorch_engine::config::Args;
use llorch_engine::exit;
use tokio_util::sync::CancellationToken;

fn main() {
    llorch_os::service::init_logging("info,llama-cpp-2=warn");
    let args = Args::parse();
    let check_only = args.check_config;
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llorch-engine: {e}");
            std::process::exit(exit::USAGE);
        }
    };
    if check_only {
        match llorch_engine::check_model(&config) {
            Ok(info) => {
                println!(
                    "configuration ok; model {} ({}, {} tensors)",
                    config.model_path.display(),
                    info.architecture().unwrap_or("unknown architecture"),
                    info.tensor_count
                );
                return;
            }
            Err(e) => {
                eprintln!("llorch-engine: {e}");
                std::process::exit(e.exit_code());
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    let code = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        llorch_os::service::cancel_on_stop_signal(shutdown.clone())
            .expect("install SIGTERM and SIGINT handlers");
        match llorch_engine::run(config, shutdown).await {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!(error = %e, "Engine failed: {e}");
                eprintln!("llorch-engine: {e}");
                e.exit_code()
            }
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}
