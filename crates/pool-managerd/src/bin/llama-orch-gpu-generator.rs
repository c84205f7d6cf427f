//! `llama-orch-gpu-generator`: a systemd generator (systemd.generator(7); installed in
//! `/usr/lib/systemd/system-generators/`). At boot and on every `systemctl daemon-reload` it
//! reads `/etc/llama-orch/node.toml` and, for each GPU pool, writes the drop-in that lets that
//! pool's engine unit open its GPUs and nothing else (`pool_managerd::gpu::engine_dropin`) into
//! the first directory systemd gives it, and on a node with GPU pools the one that lets
//! pool-managerd read them through NVML (`pool_managerd::gpu::node_agent_dropin`). CPU pools
//! get nothing. It never fails the boot: a
//! missing or unreadable node.toml is no GPU pool, said on stderr (the journal).
//!
//! `LLORCH_NODE_CONFIG` names another node.toml (for a run by hand).

use std::path::{Path, PathBuf};

fn main() {
    let Some(out) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: llama-orch-gpu-generator NORMAL_DIR [EARLY_DIR LATE_DIR]");
        std::process::exit(llorch_wire::exit::USAGE);
    };
    let config = std::env::var_os("LLORCH_NODE_CONFIG")
        .map_or_else(|| PathBuf::from("/etc/llama-orch/node.toml"), PathBuf::from);
    let text = match std::fs::read_to_string(&config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            eprintln!(
                "llama-orch-gpu-generator: {}: {e}; no GPU drop-ins",
                config.display()
            );
            return;
        }
    };
    let checked = match pool_managerd::config::parse(&config, &text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("llama-orch-gpu-generator: {e}; no GPU drop-ins");
            return;
        }
    };
    let minors =
        pool_managerd::gpu::driver_minors(std::path::Path::new(pool_managerd::gpu::PROC_GPUS));
    let agent = pool_managerd::gpu::node_agent_dropin(checked.pools())
        .map(|text| ("pool-managerd.service.d".to_string(), text));
    let engines = checked.pools().iter().filter_map(|pool| {
        pool_managerd::gpu::engine_dropin(pool, &minors)
            .map(|text| (format!("llorch-engine@{}.service.d", pool.id), text))
    });
    for (dir, text) in agent.into_iter().chain(engines) {
        let dir = out.join(dir);
        if let Err(e) = write(&dir, &text) {
            eprintln!(
                "llama-orch-gpu-generator: cannot write {}: {e}",
                dir.display()
            );
        }
    }
}

fn write(dir: &Path, text: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(pool_managerd::gpu::DROPIN_NAME), text)
}
