//! `engine-provisioner`: stage, inspect and plan. Thin: parsing, logging and exit codes here,
//! the work in the library.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use engine_provisioner::plan::PoolSettings;
use engine_provisioner::{exit, Cache, Progress, ProvisionError, Source};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "engine-provisioner",
    version,
    about = "Stage and verify models, and plan engines."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stage a model into the cache and verify it; prints the staged file as JSON.
    Stage(StageArgs),
    /// Read a GGUF file's header and metadata without loading it; prints JSON.
    Inspect { file: PathBuf },
    /// Stage a model and write the engine plan for a pool.
    Plan(PlanArgs),
}

#[derive(Args)]
struct StageArgs {
    /// Model source: a path, a file: URL, or an http(s):// URL.
    #[arg(long)]
    source: String,
    /// Expected sha256 (64 lowercase hex digits); required for downloads.
    #[arg(long)]
    sha256: Option<String>,
    /// Model id (default: the source's file name without .gguf).
    #[arg(long)]
    model_id: Option<String>,
    /// Model cache directory.
    #[arg(long, env = "LLORCH_MODEL_CACHE", default_value_os_t = default_cache())]
    cache: PathBuf,
    /// Allow a plain http:// source on another host (loopback is always allowed).
    #[arg(long)]
    allow_http: bool,
    /// The most bytes a download may have (default: the cache's free space when it starts).
    #[arg(long)]
    max_download_bytes: Option<u64>,
}

#[derive(Args)]
struct PlanArgs {
    #[command(flatten)]
    stage: StageArgs,
    /// Pool id.
    #[arg(long)]
    pool: String,
    #[arg(long, default_value_t = llorch_wire::plan::defaults::SLOTS)]
    slots: u32,
    /// Context per slot, in tokens.
    #[arg(long, default_value_t = llorch_wire::plan::defaults::CTX_PER_SLOT)]
    ctx: u32,
    #[arg(long)]
    threads: Option<u32>,
    #[arg(long, default_value_t = 0)]
    gpu_layers: u32,
    /// The engine's Unix socket.
    #[arg(long)]
    socket: String,
    /// Where the engine writes its handoff file.
    #[arg(long)]
    handoff_dir: String,
    /// Where to write the plan (JSON).
    #[arg(long)]
    out: PathBuf,
    /// The engine exits cleanly after this many seconds without a generation request
    /// (on-demand pools); 0 or absent: it stays loaded.
    #[arg(long)]
    idle_exit_secs: Option<u64>,
    /// Host memory for the engine's prefix cache in MiB (0: off; absent: the engine's
    /// default).
    #[arg(long)]
    prefix_cache_mib: Option<u64>,
    /// Free memory of each of the pool's GPUs in MiB, in the pool's order (`24000,11800`);
    /// with it a GPU pool is checked against the memory estimate before its engine starts.
    #[arg(long, value_delimiter = ',')]
    gpu_free_mib: Vec<u64>,
    /// Refuse (exit 78) when the model does not fit the GPUs, instead of offloading only the
    /// layers that fit.
    #[arg(long)]
    gpu_only: bool,
    /// Serve embeddings too (the pool's `embeddings` setting).
    #[arg(long)]
    embeddings: bool,
}

/// `$CACHE_DIRECTORY/models` under systemd (`CacheDirectory=`), else the user's cache.
fn default_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("CACHE_DIRECTORY") {
        return PathBuf::from(dir).join("models");
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("llama-orch").join("models")
}

/// Shows progress on a terminal, logs it every 10% otherwise.
struct Reporter {
    tty: bool,
    last_decile: Option<u64>,
    shown: bool,
}

impl Progress for Reporter {
    fn update(&mut self, done: u64, total: Option<u64>) {
        let mb = |b: u64| b as f64 / 1e6;
        match total {
            Some(t) if t > 0 => {
                let decile = done * 10 / t;
                if self.tty {
                    if self.last_decile != Some(done * 100 / t) {
                        eprint!(
                            "\r  {:.1} / {:.1} MB ({}%)",
                            mb(done),
                            mb(t),
                            done * 100 / t
                        );
                        self.last_decile = Some(done * 100 / t);
                        self.shown = true;
                    }
                } else if self.last_decile != Some(decile) {
                    tracing::info!(
                        bytes_done = done,
                        bytes_total = t,
                        "Progress {}%.",
                        decile * 10
                    );
                    self.last_decile = Some(decile);
                }
            }
            _ => {
                if self.tty {
                    eprint!("\r  {:.1} MB", mb(done));
                    self.shown = true;
                }
            }
        }
    }

    fn finish(&mut self) {
        if self.shown {
            eprintln!();
            self.shown = false;
        }
        self.last_decile = None;
    }
}

fn stage(args: &StageArgs) -> Result<(String, engine_provisioner::Staged), ProvisionError> {
    let source = Source::parse(&args.source)?;
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        let name = args.source.rsplit('/').next().unwrap_or(&args.source);
        name.strip_suffix(".gguf").unwrap_or(name).to_string()
    });
    let mut reporter = Reporter {
        tty: std::io::stderr().is_terminal(),
        last_decile: None,
        shown: false,
    };
    let downloads = engine_provisioner::cache::Downloads {
        allow_http: args.allow_http,
        max_bytes: args.max_download_bytes,
    };
    let staged = Cache::new(&args.cache).with_downloads(downloads).stage(
        &model_id,
        &source,
        args.sha256.as_deref(),
        &mut reporter,
    )?;
    Ok((model_id, staged))
}

fn run(cli: Cli) -> Result<(), ProvisionError> {
    match cli.command {
        Command::Stage(args) => {
            let (model_id, s) = stage(&args)?;
            let out = serde_json::json!({
                "model_id": model_id,
                "path": s.path,
                "sha256": s.sha256,
                "size_bytes": s.size_bytes,
                "fetched": s.fetched,
                "architecture": s.info.architecture(),
                "context_length": s.info.context_length(),
                "file_type": s.info.file_type(),
                "tensor_count": s.info.tensor_count,
                "has_chat_template": s.info.has_chat_template(),
            });
            println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        }
        Command::Inspect { file } => {
            let info = llorch_gguf::inspect(&file)?;
            let out = serde_json::json!({
                "path": file,
                "version": info.version,
                "name": info.name(),
                "architecture": info.architecture(),
                "context_length": info.context_length(),
                "file_type": info.file_type(),
                "tensor_count": info.tensor_count,
                "metadata_keys": info.metadata.len(),
                "has_chat_template": info.has_chat_template(),
                "size_bytes": info.file_size,
            });
            println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        }
        Command::Plan(args) => {
            let (model_id, staged) = stage(&args.stage)?;
            let settings = PoolSettings {
                pool_id: args.pool,
                model_id,
                slots: args.slots,
                ctx_per_slot: args.ctx,
                threads: args.threads,
                gpu_layers: args.gpu_layers,
                socket: args.socket,
                handoff_dir: args.handoff_dir,
                idle_exit_secs: args.idle_exit_secs,
                prefix_cache_mib: args.prefix_cache_mib,
                gpu_free_bytes: args
                    .gpu_free_mib
                    .iter()
                    .map(|m| m.saturating_mul(1 << 20))
                    .collect(),
                gpu_only: args.gpu_only,
                embeddings: args.embeddings,
            };
            let plan = engine_provisioner::plan::build(&settings, &staged)?;
            engine_provisioner::plan::write(&args.out, &plan)?;
            tracing::info!(pool = %plan.pool_id, plan = %args.out.display(), "Engine plan written.");
            println!("{}", args.out.display());
        }
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("LLORCH_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    // `plan` leaves its failure next to the plan it could not write (`<out>.error`), for the
    // node agent to show as the pool's last error: under systemd it cannot read our journal.
    let error_file = match &cli.command {
        Command::Plan(args) => Some(PathBuf::from(format!("{}.error", args.out.display()))),
        _ => None,
    };
    if let Some(f) = &error_file {
        let _ = std::fs::remove_file(f);
    }
    if let Err(e) = run(cli) {
        eprintln!("engine-provisioner: {e}");
        if let Some(f) = &error_file {
            let _ = std::fs::write(f, format!("{e}\n"));
        }
        std::process::exit(e.exit_code());
    }
}
