//! `llorch demo`: the foundation end to end, without systemd or a control plane. Stages the
//! model into the cache with the provisioner library, writes the engine plan, starts
//! `llorch-engine` as a child process, waits for its handoff file, streams an answer to a
//! prompt, and stops the engine with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use engine_provisioner::plan::PoolSettings;
use engine_provisioner::{Cache, NoProgress, Source};
use llorch_wire::engine::{ChatMessage, GenerateRequest};

pub struct DemoOptions {
    pub model: PathBuf,
    pub sha256: Option<String>,
    pub cache: PathBuf,
    pub prompt: String,
    pub max_tokens: u32,
}

/// Stops the engine child when the demo ends, however it ends.
struct EngineChild(Child);

impl Drop for EngineChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // Our own child, not reaped yet.
            llorch_os::process::terminate_child(self.0.id());
            let _ = self.0.wait();
        }
    }
}

/// `llorch-engine` next to this executable, else from `PATH`.
fn engine_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("llorch-engine")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("llorch-engine"))
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let runtime = tempfile::Builder::new().prefix("llorch-demo-").tempdir()?;
    let source = Source::parse(&opts.model.display().to_string())?;
    let model_id = opts
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    eprintln!(
        "llorch: staging {} into {}",
        opts.model.display(),
        opts.cache.display()
    );
    let staged = Cache::new(&opts.cache).stage(
        &model_id,
        &source,
        opts.sha256.as_deref(),
        &mut NoProgress,
    )?;
    let socket = runtime.path().join("demo.sock");
    let handoff_dir = runtime.path().join("handoff");
    let plan = engine_provisioner::plan::build(
        &PoolSettings {
            pool_id: "demo".into(),
            model_id,
            slots: 1,
            ctx_per_slot: 2048,
            threads: None,
            gpu_layers: 0,
            socket: socket.display().to_string(),
            handoff_dir: handoff_dir.display().to_string(),
            idle_exit_secs: None,
            prefix_cache_mib: None,
            gpu_free_bytes: Vec::new(),
            gpu_only: false,
            embeddings: false,
        },
        &staged,
    )?;
    let plan_path = runtime.path().join("demo.plan.json");
    engine_provisioner::plan::write(&plan_path, &plan)?;

    let log_path = runtime.path().join("engine.log");
    let child = Command::new(engine_binary())
        .arg("--plan")
        .arg(&plan_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("cannot start llorch-engine (build it with `cargo build --workspace`)")?;
    let mut engine = EngineChild(child);
    let handoff = handoff_dir.join("demo.json");
    wait_for_handoff(&mut engine, &handoff, &log_path)?;
    eprintln!(
        "llorch: engine ready (pid {}, sha256 {}...)\n\n> {}\n",
        engine.0.id(),
        &staged.sha256[..12],
        opts.prompt
    );
    let req = GenerateRequest {
        max_tokens: Some(opts.max_tokens),
        temperature: Some(0.0),
        ..GenerateRequest::chat(vec![ChatMessage::new("user", opts.prompt.clone())])
    };
    let end = crate::generate::stream_to(&socket, &req, &mut std::io::stdout()).await?;
    let tps = if end.decode_ms > 0.0 {
        (end.completion_tokens.saturating_sub(1)) as f64 / (end.decode_ms / 1000.0)
    } else {
        0.0
    };
    eprintln!(
        "\n\nllorch: {} prompt tokens, {} generated, first token after {:.0} ms, {:.0} tokens/s",
        end.prompt_tokens, end.completion_tokens, end.ttft_ms, tps
    );
    drop(engine);
    Ok(())
}

fn wait_for_handoff(engine: &mut EngineChild, handoff: &Path, log: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    while !handoff.exists() {
        if let Some(status) = engine.0.try_wait()? {
            anyhow::bail!(
                "llorch-engine exited with {status} before it was ready:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if start.elapsed() > Duration::from_secs(300) {
            anyhow::bail!(
                "llorch-engine was not ready after 300 s; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
