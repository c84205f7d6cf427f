//! `llorch`: parses the command line and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use llorch::demo::DemoOptions;
use llorch::remote::{self, GenerateOptions};
use llorch::up::UpOptions;
use llorch_wire::engine::GenerateRequest;

/// The bundled default model, as `scripts/setup.sh` fetches it.
const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_MODEL_SHA256: &str =
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
const DEFAULT_MODEL_ID: &str = "smollm2-135m";

#[derive(Parser)]
#[command(name = "llorch", version, about = "The llama-orch command line.")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args)]
struct Remote {
    /// orchestratord's URL (`https://` across a network).
    #[arg(
        long,
        env = "LLORCH_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// PEM file of the CA that signed orchestratord's certificate; default: the system's store.
    #[arg(long, env = "LLORCH_CA", global = true)]
    ca: Option<PathBuf>,
}

impl Remote {
    /// The HTTP client for `--url`, with `--ca` and `$LLORCH_API_KEY` (else the operator's
    /// token: `$LLORCH_ADMIN_TOKEN`, or the one `llorch up` wrote for a loopback URL).
    fn client(&self) -> anyhow::Result<llorch_client::HttpClient> {
        let credential = api_key().or_else(|| llorch::up::admin_token_for(&self.url));
        remote::client(&self.url, self.ca.as_deref(), credential)
    }
}

#[derive(clap::Args)]
struct Bus {
    /// The bus to find orchestratord on: auto (the system bus), system, session, or off (HTTP
    /// only).
    #[arg(long, env = "LLORCH_DBUS", default_value = "auto", global = true)]
    dbus: llorch_bus::Mode,
}

/// `llorch up`'s settings.
#[derive(clap::Args)]
struct UpArgs {
    /// GGUF model file (default: the bundled model fetched by scripts/setup.sh).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Expected sha256 of --model.
    #[arg(long)]
    sha256: Option<String>,
    /// Model id clients use (default: smollm2-135m for the default model, else the file
    /// name without .gguf).
    #[arg(long)]
    model_id: Option<String>,
    /// Public API address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    #[arg(long, default_value_t = 4)]
    slots: u32,
    /// Context per slot, in tokens.
    #[arg(long, default_value_t = 2048)]
    ctx: u32,
    /// Model cache directory.
    #[arg(long, env = "LLORCH_MODEL_CACHE", default_value_os_t = default_cache())]
    cache: PathBuf,
    /// Runtime directory for sockets, handoff files and logs (default: a fresh temporary
    /// directory, removed on exit).
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// API key file for orchestratord (`NAME KEY` lines).
    #[arg(long)]
    api_keys: Option<PathBuf>,
    /// Queue capacity of orchestratord.
    #[arg(long)]
    queue_capacity: Option<usize>,
    /// Admission policy when the queue is full: reject or drop-lru.
    #[arg(long)]
    admission_policy: Option<String>,
    /// Offer the daemons on D-Bus (docs/DBUS.md): off, auto, system or session.
    #[arg(long, default_value = "off")]
    dbus: llorch_bus::Mode,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the home profile without systemd: orchestratord, pool-managerd and one engine on
    /// the default model (or --model), until Ctrl-C.
    Up(UpArgs),
    /// Stream an answer to one prompt (from orchestratord, or from an engine with --engine).
    Generate {
        #[command(flatten)]
        remote: Remote,
        /// Talk to this engine socket directly instead of orchestratord.
        #[arg(long)]
        engine: Option<PathBuf>,
        /// Model id (default: the first model the server lists).
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        /// Sampling temperature; 0 is greedy.
        #[arg(long)]
        temperature: Option<f32>,
        /// The prompt, sent as one user message.
        prompt: String,
    },
    /// Chat on the terminal; each line is a turn, the session keeps its KV cache warm.
    Chat {
        #[command(flatten)]
        remote: Remote,
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 512)]
        max_tokens: u32,
        /// Sampling temperature; 0 is greedy.
        #[arg(long)]
        temperature: Option<f32>,
        /// A system message that opens the conversation.
        #[arg(long)]
        system: Option<String>,
    },
    /// Nodes, pools (state, model, slots busy/total) and the queue.
    Status {
        #[command(flatten)]
        remote: Remote,
        /// Read orchestratord's D-Bus properties instead of its HTTP API (no API key needed).
        #[arg(long)]
        bus: bool,
        #[command(flatten)]
        dbus: Bus,
    },
    /// Drain, resume, load, unload, pin or unpin a pool: over D-Bus when orchestratord is on
    /// the bus, else HTTP.
    Pools {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        dbus: Bus,
        #[command(subcommand)]
        action: PoolAction,
    },
    /// Drain or resume a whole node (needs an admin key).
    Nodes {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        action: NodeAction,
    },
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
}

#[derive(Subcommand)]
enum PoolAction {
    /// Stop placing new work on the pool; running tasks finish.
    Drain {
        pool: String,
        /// The node, where several nodes have a pool of this id.
        #[arg(long)]
        node: Option<String>,
    },
    /// Place work on the pool again.
    Resume {
        pool: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Load the pool's model now, unloading idle on-demand pools if its node needs the room.
    Load {
        pool: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Unload an on-demand pool's model now (it loads again on the next request).
    Unload {
        pool: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Never unload this on-demand pool to make room for another.
    Pin {
        pool: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Let this on-demand pool be unloaded to make room again.
    Unpin {
        pool: String,
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(Subcommand)]
enum NodeAction {
    /// Place nothing new on the node; its running tasks finish.
    Drain {
        node: String,
        /// Wait until no task runs on it (at most this many seconds), then say so.
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Place work on the node again.
    Resume { node: String },
}

fn cache_base() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("llama-orch")
}

fn default_cache() -> PathBuf {
    cache_base().join("models")
}

/// Where scripts/setup.sh puts the default model (`$LLORCH_CACHE/default-model/`).
fn default_model() -> PathBuf {
    std::env::var_os("LLORCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(cache_base)
        .join("default-model")
        .join(DEFAULT_MODEL_FILE)
}

fn api_key() -> Option<String> {
    std::env::var("LLORCH_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
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
    let result = run(Cli::parse().command).await;
    if let Err(e) = result {
        // `llorch status | head`: the reader went away; that is not an error worth a word.
        if e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        }) {
            std::process::exit(0);
        }
        eprintln!("llorch: {e:#}");
        std::process::exit(llorch::exit::code(&e));
    }
}

/// Runs one command.
async fn run(command: Cmd) -> anyhow::Result<()> {
    match command {
        Cmd::Up(args) => up(args).await,
        Cmd::Generate {
            engine: Some(engine),
            max_tokens,
            temperature,
            prompt,
            ..
        } => {
            let req = GenerateRequest {
                max_tokens: Some(max_tokens),
                temperature,
                ..GenerateRequest::chat(vec![llorch_wire::engine::ChatMessage::new("user", prompt)])
            };
            llorch::generate::stream_to(&engine, &req, &mut std::io::stdout())
                .await
                .map(|_| println!())
        }
        Cmd::Generate {
            remote: r,
            engine: None,
            model,
            max_tokens,
            temperature,
            prompt,
        } => {
            let options = GenerateOptions {
                model,
                max_tokens,
                temperature,
                prompt,
            };
            remote::generate(&r.client()?, options).await
        }
        Cmd::Chat {
            remote: r,
            model,
            max_tokens,
            temperature,
            system,
        } => remote::chat(&r.client()?, model, max_tokens, temperature, system).await,
        Cmd::Status {
            remote: r,
            bus: true,
            dbus,
        } => match llorch::bus::orchestrator(dbus.dbus).await {
            Some(proxy) => llorch::bus::status(&proxy, &mut std::io::stdout()).await,
            None => Err(anyhow::anyhow!(
                "orchestratord is not on the {} bus (see docs/DBUS.md); drop --bus to ask {} over HTTP",
                dbus.dbus,
                r.url
            )),
        },
        Cmd::Status { remote: r, .. } => remote::status(&r.client()?, &mut std::io::stdout()).await,
        Cmd::Pools {
            remote: r,
            dbus,
            action,
        } => pools(r, dbus, action).await,
        Cmd::Nodes { remote: r, action } => {
            let c = r.client()?;
            match action {
                NodeAction::Drain { node, wait } => {
                    remote::node_drain(&c, &node, wait.map(std::time::Duration::from_secs)).await
                }
                NodeAction::Resume { node } => remote::node_resume(&c, &node).await,
            }
        }
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
    }
}

/// `llorch up`: the default model unless `--model` names one, and the flags orchestratord takes.
async fn up(args: UpArgs) -> anyhow::Result<()> {
    let UpArgs {
        model,
        sha256,
        model_id,
        listen,
        slots,
        ctx,
        cache,
        runtime_dir,
        api_keys,
        queue_capacity,
        admission_policy,
        dbus,
    } = args;
    let (model, sha256, model_id) = match model {
        None => (
            default_model(),
            Some(DEFAULT_MODEL_SHA256.to_string()),
            model_id.unwrap_or_else(|| DEFAULT_MODEL_ID.into()),
        ),
        Some(m) => {
            let id = model_id.unwrap_or_else(|| {
                m.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            });
            (m, sha256, id)
        }
    };
    let mut orchestratord_args = Vec::new();
    if let Some(k) = api_keys {
        orchestratord_args.extend(["--api-keys".to_string(), k.display().to_string()]);
    }
    if let Some(q) = queue_capacity {
        orchestratord_args.extend(["--queue-capacity".to_string(), q.to_string()]);
    }
    if let Some(p) = admission_policy {
        orchestratord_args.extend(["--admission-policy".to_string(), p]);
    }
    llorch::up::run(UpOptions {
        model,
        sha256,
        model_id,
        listen,
        slots,
        ctx,
        cache,
        runtime_dir,
        orchestratord_args,
        dbus,
    })
    .await
}

/// `llorch pools drain|resume|load|unload|pin|unpin`: over D-Bus when orchestratord is there, else HTTP.
async fn pools(r: Remote, dbus: Bus, action: PoolAction) -> anyhow::Result<()> {
    let (verb, pool, node) = match action {
        PoolAction::Drain { pool, node } => ("drain", pool, node),
        PoolAction::Resume { pool, node } => ("resume", pool, node),
        PoolAction::Load { pool, node } => ("load", pool, node),
        PoolAction::Unload { pool, node } => ("unload", pool, node),
        PoolAction::Pin { pool, node } => ("pin", pool, node),
        PoolAction::Unpin { pool, node } => ("unpin", pool, node),
    };
    let done = match llorch::bus::orchestrator(dbus.dbus).await {
        Some(proxy) => llorch::bus::pool_action(&proxy, verb, &pool, node.as_deref()).await?,
        None => false,
    };
    if done {
        return Ok(());
    }
    remote::pool_action(&r.client()?, verb, &pool, node.as_deref()).await
}
