//! `llorch`: parses the command line and calls the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use llorch::demo::DemoOptions;
use llorch_wire::engine::GenerateRequest;

#[derive(Parser)]
#[command(name = "llorch", version, about = "The llama-orch command line.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stage a model, start an engine, stream an answer to a prompt, stop the engine.
    Demo {
        /// GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// Expected sha256 of the model.
        #[arg(long)]
        sha256: Option<String>,
        /// Model cache directory.
        #[arg(long, env = "LLORCH_MODEL_CACHE", default_value_os_t = default_cache())]
        cache: PathBuf,
        #[arg(long, default_value = "In three sentences, why is the sky blue?")]
        prompt: String,
        #[arg(long, default_value_t = 160)]
        max_tokens: u32,
    },
    /// Stream an answer from an engine's Unix socket.
    Generate {
        /// The engine socket.
        #[arg(long)]
        engine: PathBuf,
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        /// Sampling temperature; 0 is greedy.
        #[arg(long)]
        temperature: Option<f32>,
        /// The prompt, sent as one user message.
        prompt: String,
    },
}

fn default_cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("llama-orch").join("models")
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LLORCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Cmd::Demo {
            model,
            sha256,
            cache,
            prompt,
            max_tokens,
        } => {
            llorch::demo::run(DemoOptions {
                model,
                sha256,
                cache,
                prompt,
                max_tokens,
            })
            .await
        }
        Cmd::Generate {
            engine,
            max_tokens,
            temperature,
            prompt,
        } => {
            let req = GenerateRequest {
                max_tokens: Some(max_tokens),
                temperature,
                ..GenerateRequest::chat(vec![llorch_wire::engine::ChatMessage {
                    role: "user".into(),
                    content: prompt,
                }])
            };
            llorch::generate::stream_to(&engine, &req, &mut std::io::stdout())
                .await
                .map(|_| println!())
        }
    };
    if let Err(e) = result {
        eprintln!("llorch: {e:#}");
        std::process::exit(1);
    }
}
