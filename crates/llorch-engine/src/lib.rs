//! `llorch-engine`: one process serves one GGUF model on one device set.
//!
//! Code map:
//! - [`config`]: flags and the engine plan, validated before anything loads.
//! - [`model`]: loading with llama-cpp-2, chat template rendering, tokenization.
//! - [`http`]: the Unix-socket API: routing, the accept loop and idle exit, admission of a
//!   request (validate, render, tokenize, reserve a slot) and the SSE body, one file each.
//! - [`slots`]: the slot table and prefix-cache-aware slot choice.
//! - [`decode`]: the continuous-batching decode loop that owns the llama context.
//! - [`text`]: UTF-8-safe streaming and stop strings.
//! - [`handoff`]: the handoff file written when ready and removed on a clean stop.
//!
//! The engine never listens on a network socket and never queues: it serves its slots or says
//! it is busy.

pub mod chat;
pub mod config;
pub mod decode;
pub mod embed;
pub mod handoff;
pub mod http;
pub mod metrics;
pub mod model;
pub mod prefix;
pub mod sampler;
pub mod slots;
pub mod text;

use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llorch_os::ListenerOrigin;
use llorch_wire::handoff::{Handoff, HANDOFF_VERSION};
use tokio_util::sync::CancellationToken;

use crate::config::EngineConfig;
use crate::http::{Ready, Server, Shared};
use crate::model::Model;
use crate::slots::SlotTable;

/// Exit codes (the workspace's, `llorch_wire::exit`): 64 configuration invalid; 65 the model
/// file is not a usable GGUF file (not GGUF, truncated, malformed); 66 it does not exist or
/// cannot be read; 69 the socket cannot be bound or taken; 70 llama.cpp failed to load the
/// model or create its context; 73 the handoff file cannot be written.
pub use llorch_wire::exit;

/// Start time asked of the service manager each second while the model loads.
const LOAD_EXTENSION: Duration = Duration::from_secs(10);

/// Why the engine stopped with an error; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] llorch_gguf::GgufError),
    #[error(transparent)]
    Listen(#[from] llorch_os::ListenError),
    #[error("{0}")]
    Load(String),
    #[error("cannot write the handoff file in {dir}: {source}")]
    Handoff {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl EngineError {
    pub fn exit_code(&self) -> i32 {
        match self {
            EngineError::Model(llorch_gguf::GgufError::NotFound { .. })
            | EngineError::Model(llorch_gguf::GgufError::Io { .. }) => exit::NOINPUT,
            EngineError::Model(_) => exit::DATAERR,
            EngineError::Listen(_) => exit::UNAVAILABLE,
            EngineError::Load(_) => exit::SOFTWARE,
            EngineError::Handoff { .. } => exit::CANTCREAT,
        }
    }
}

/// Checks the model file's GGUF header (exists, is GGUF, is whole) without loading it.
pub fn check_model(config: &EngineConfig) -> Result<llorch_gguf::GgufInfo, EngineError> {
    let info = llorch_gguf::inspect(&config.model_path)?;
    if let Some(train) = info.context_length() {
        if u64::from(config.ctx_per_slot) > train {
            tracing::warn!(
                ctx = config.ctx_per_slot,
                trained = train,
                "The context per slot is larger than the model was trained with; answers past {train} tokens may degrade."
            );
        }
    }
    // What llama.cpp will allocate, from the header; its own numbers follow in the log at
    // load (LLORCH_LOG=info shows them), and scripts/gpu-smoke.sh compares both with NVML.
    let request = llorch_gguf::memory::Request {
        slots: config.slots,
        ctx_per_slot: config.ctx_per_slot,
        gpu_layers: config.gpu_layers,
        ubatch: decode::BATCH_TOKENS as u32,
    };
    match llorch_gguf::memory::estimate(&info, request) {
        Ok(e) => tracing::info!(
            gpu_bytes = e.gpu_bytes(),
            gpu_weights_bytes = e.gpu_weights,
            gpu_kv_bytes = e.gpu_kv,
            cpu_weights_bytes = e.cpu_weights,
            cpu_kv_bytes = e.cpu_kv,
            compute_bytes = e.compute,
            layers_on_gpu = e.offloaded_layers,
            "Memory estimate: GPU {} (weights {}, KV {}, compute {}; CUDA's own not counted), CPU weights {}, CPU KV {}.",
            llorch_gguf::memory::mib(e.gpu_bytes()),
            llorch_gguf::memory::mib(e.gpu_weights),
            llorch_gguf::memory::mib(e.gpu_kv),
            llorch_gguf::memory::mib(e.compute),
            llorch_gguf::memory::mib(e.cpu_weights),
            llorch_gguf::memory::mib(e.cpu_kv),
        ),
        Err(e) => tracing::info!("No memory estimate: {e}."),
    }
    Ok(info)
}

/// Runs the engine until `shutdown` is cancelled (SIGTERM in the binary), then drains: new
/// requests are refused, in-flight ones get `grace_secs` to finish before they are cancelled,
/// the handoff file is removed, and the function returns.
///
/// With `idle_exit` (on-demand pools) it also returns, after removing its handoff file, once
/// no generation request has been in progress for that long: it stops accepting first, serves
/// what the connections it already accepted still send, and leaves new connections waiting on
/// the socket, where the socket's owner (systemd, or pool-managerd) starts the next engine.
///
/// The phases, in order: take the socket and serve it ([`Server::start`]), load the model
/// (`load_model`), start the decode thread (`DecodeThread::start`), announce readiness
/// (`announce_ready`), then wait and stop (`unload` when idle, `drain` on `shutdown`).
pub async fn run(config: EngineConfig, shutdown: CancellationToken) -> Result<(), EngineError> {
    check_model(&config)?;
    let (listener, origin) = llorch_os::unix_listener("engine", &config.socket)?;
    match &origin {
        ListenerOrigin::Inherited => tracing::info!("Serving on the inherited socket."),
        ListenerOrigin::Bound(p) => tracing::info!(socket = %p.display(), "Serving on the socket."),
    }
    let shared = Arc::new(Shared::new(config.model_path.display().to_string()));
    // Serve /health (503 while loading) from the start, so a caller can watch the load.
    let server = Server::start(listener, Arc::clone(&shared), config.idle_exit);
    let model = load_model(&config, &shared).await?;
    let decode = DecodeThread::start(&config, &model, &shared).await?;
    let embedder = match config.embeddings {
        true => Some(Arc::new(
            embed::Embedder::start(
                &model,
                config.ctx_per_slot,
                config.threads,
                config.slots as usize,
            )
            .await
            .map_err(EngineError::Load)?,
        )),
        false => None,
    };
    let handoff_path = announce_ready(&config, &shared, &model, &decode, embedder)?;
    let stopped = Stopped {
        server,
        shared,
        decode,
        handoff_path,
        origin,
    };
    let unload_idle = tokio::select! {
        () = shutdown.cancelled() => false,
        () = stopped.server.idle() => true,
    };
    if unload_idle {
        unload(&config, stopped).await;
    } else {
        drain(&config, stopped).await;
    }
    Ok(())
}

/// Loads the model on a blocking thread. Meanwhile the service manager gets a status line with
/// the progress and more start time each second, so the unit's start timeout need not be
/// guessed per model.
async fn load_model(config: &EngineConfig, shared: &Shared) -> Result<Arc<Model>, EngineError> {
    let started = std::time::Instant::now();
    llorch_os::service::status(&format!("loading model {}", config.model_id));
    llorch_os::service::extend_timeout(LOAD_EXTENSION);
    let loading = {
        let progress = Arc::clone(&shared.progress);
        let model_id = config.model_id.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            loop {
                tick.tick().await;
                llorch_os::service::status(&format!(
                    "loading model {model_id} ({:.0}%)",
                    progress.get() * 100.0
                ));
                llorch_os::service::extend_timeout(LOAD_EXTENSION);
            }
        })
    };
    let model = {
        let path = config.model_path.clone();
        let gpu_layers = config.gpu_layers;
        let progress = Arc::clone(&shared.progress);
        let loaded = tokio::task::spawn_blocking(move || Model::load(&path, gpu_layers, progress))
            .await
            .expect("model loading does not panic")
            .map_err(|e| EngineError::Load(e.to_string()));
        loading.abort();
        loaded?
    };
    let model = Arc::new(model);
    tracing::info!(
        model = %config.model_id,
        seconds = started.elapsed().as_secs_f64(),
        chat_template = model.has_chat_template(),
        "Model loaded."
    );
    Ok(model)
}

/// The decode thread and what the request handlers need to hand it work.
struct DecodeThread {
    slots: Arc<Mutex<SlotTable>>,
    commands: SyncSender<decode::Command>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl DecodeThread {
    /// Starts the decode loop on its own thread and returns once it has created its llama
    /// context (or failed to).
    async fn start(
        config: &EngineConfig,
        model: &Arc<Model>,
        shared: &Shared,
    ) -> Result<Self, EngineError> {
        let slots = Arc::new(Mutex::new(SlotTable::new(
            config.slots as usize,
            config.ctx_per_slot,
        )));
        let (commands, receiver) = std::sync::mpsc::sync_channel(config.slots as usize);
        let (loop_started, loop_result) = tokio::sync::oneshot::channel::<Result<(), String>>();
        let thread = {
            let model = Arc::clone(model);
            let slots = Arc::clone(&slots);
            let settings = decode::Settings {
                ctx_per_slot: config.ctx_per_slot,
                threads: config.threads,
                prefix_cache_bytes: config.prefix_cache_bytes,
            };
            let metrics = Arc::clone(&shared.metrics);
            std::thread::Builder::new()
                .name("decode".into())
                .stack_size(crate::sampler::GRAMMAR_STACK_BYTES)
                .spawn(move || {
                    let mut started = Some(loop_started);
                    let result =
                        decode::run(model, slots, settings, receiver, metrics, &mut || {
                            if let Some(tx) = started.take() {
                                let _ = tx.send(Ok(()));
                            }
                        });
                    if let Some(tx) = started.take() {
                        let _ = tx.send(result.clone());
                    }
                    result
                })
                .expect("spawn the decode thread")
        };
        loop_result
            .await
            .map_err(|_| EngineError::Load("the decode loop did not start".into()))?
            .map_err(EngineError::Load)?;
        Ok(Self {
            slots,
            commands,
            thread,
        })
    }
}

/// Writes the handoff file, lets the request handlers in and tells the service manager the
/// engine is ready. Returns the handoff file's path.
fn announce_ready(
    config: &EngineConfig,
    shared: &Shared,
    model: &Arc<Model>,
    decode: &DecodeThread,
    embedder: Option<Arc<embed::Embedder>>,
) -> Result<PathBuf, EngineError> {
    let handoff_path = handoff::write(
        &config.handoff_dir,
        &Handoff {
            version: HANDOFF_VERSION,
            pool_id: config.pool_id.clone(),
            model_id: config.model_id.clone(),
            model_sha256: config.model_sha256.clone(),
            socket: config.socket.display().to_string(),
            slots: config.slots,
            ctx_per_slot: config.ctx_per_slot,
            device: config.device(),
            engine_version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
        },
    )
    .map_err(|source| EngineError::Handoff {
        dir: config.handoff_dir.clone(),
        source,
    })?;
    // Held requests (a socket-activated engine's first) go ahead once the handoff file is
    // there, so the node sees the pool ready no later than their answer.
    shared.set_ready(Ready {
        model: Arc::clone(model),
        slots: Arc::clone(&decode.slots),
        commands: decode.commands.clone(),
        ctx_per_slot: config.ctx_per_slot,
        embedder,
    });
    tracing::info!(pool = %config.pool_id, handoff = %handoff_path.display(), slots = config.slots, "Engine ready.");
    llorch_os::service::ready_with_status(&format!(
        "serving {} on {}: {} slots of {} tokens",
        config.model_id,
        config.device(),
        config.slots,
        config.ctx_per_slot
    ));
    Ok(handoff_path)
}

/// What a ready engine holds that stopping takes apart.
struct Stopped {
    server: Server,
    shared: Arc<Shared>,
    decode: DecodeThread,
    handoff_path: PathBuf,
    origin: ListenerOrigin,
}

impl Stopped {
    fn remove_handoff(&self) {
        if let Err(e) = handoff::remove(&self.handoff_path) {
            tracing::warn!(error = %e, file = %self.handoff_path.display(), "Cannot remove the handoff file.");
        }
    }

    /// Removes the socket file this process bound, lets go of the request handlers' state and
    /// waits for the decode thread, which ends once nothing can send it work.
    fn release(self) {
        if let ListenerOrigin::Bound(p) = self.origin {
            let _ = std::fs::remove_file(p);
        }
        drop(self.shared);
        drop(self.decode.commands);
        let _ = self.decode.thread.join();
    }
}

/// Unloads after the idle time of an on-demand pool: the server stopped accepting already and
/// finishes the connections it has; new ones wait on the socket for the next engine.
async fn unload(config: &EngineConfig, mut stopped: Stopped) {
    let secs = config.idle_exit.map_or(0, |d| d.as_secs());
    tracing::info!(
        pool = %config.pool_id,
        idle_secs = secs,
        "No generation request for {secs} s; unloading the model."
    );
    // Not ready any more: nobody sends work or scrapes here now; what comes waits on the
    // socket for the next engine.
    stopped.remove_handoff();
    llorch_os::service::status("unloading: finishing the open connections");
    // The server task ends once every accepted connection is done. STOPPING=1 only then:
    // it starts the service manager's stop timeout, which must not cut a request short.
    stopped.server.finished().await;
    llorch_os::service::stopping();
    stopped.release();
    tracing::info!("Unloaded.");
}

/// Drains on `shutdown`: refuses new work, gives in-flight requests the grace period, then
/// cancels them and stops serving.
async fn drain(config: &EngineConfig, mut stopped: Stopped) {
    llorch_os::service::stopping();
    let shared = &stopped.shared;
    tracing::info!(
        busy = shared.busy_slots(),
        grace_secs = config.grace_secs,
        "Stopping."
    );
    shared.drain();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.grace_secs);
    while shared.busy_slots() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if shared.busy_slots() > 0 {
        tracing::warn!(
            busy = shared.busy_slots(),
            "Grace period over; cancelling in-flight requests."
        );
        let _ = stopped.decode.commands.try_send(decode::Command::CancelAll(
            "the engine is stopping; the request was cancelled after the grace period".into(),
        ));
    }
    stopped.server.stop_accepting();
    stopped.server.finished().await;
    stopped.remove_handoff();
    stopped.release();
    tracing::info!("Stopped.");
}
