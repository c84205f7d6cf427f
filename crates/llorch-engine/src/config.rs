//! Engine configuration: from an engine plan file (written by `engine-provisioner`), from
//! flags, or both (flags win). Everything is validated before the model is loaded.

use std::path::{Path, PathBuf};

use clap::Parser;
use llorch_wire::plan::{defaults, EnginePlan};

/// Upper bound on slots: llama.cpp's sequence ids are cheap, but each slot reserves its context.
pub const MAX_SLOTS: u32 = 64;
/// Below this a slot cannot hold a chat prompt worth serving.
pub const MIN_CTX_PER_SLOT: u32 = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub pool_id: String,
    pub model_id: String,
    pub model_path: PathBuf,
    /// sha256 of the model as verified by the provisioner; reported in the handoff file.
    pub model_sha256: String,
    pub slots: u32,
    pub ctx_per_slot: u32,
    pub threads: u32,
    pub gpu_layers: u32,
    pub socket: PathBuf,
    pub handoff_dir: PathBuf,
    /// How long in-flight requests may run after SIGTERM before they are cancelled.
    pub grace_secs: u64,
    /// Exit cleanly after this long without a generation request (on-demand pools).
    pub idle_exit: Option<std::time::Duration>,
    /// The host prefix cache's bound in bytes (0: off).
    pub prefix_cache_bytes: usize,
    /// Serve `embed` requests, from a context of `ctx_per_slot` tokens of their own.
    pub embeddings: bool,
}

/// Command line of `llorch-engine`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "llorch-engine",
    version,
    about = "Serve one GGUF model over a Unix socket with continuous batching."
)]
pub struct Args {
    /// Engine plan written by `engine-provisioner plan` (JSON). Flags override its values.
    #[arg(long, env = "LLORCH_ENGINE_PLAN")]
    pub plan: Option<PathBuf>,
    /// GGUF model file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Model id reported in the handoff file (default: the file name without `.gguf`).
    #[arg(long)]
    pub model_id: Option<String>,
    /// Parallel sequences served by continuous batching.
    #[arg(long)]
    pub slots: Option<u32>,
    /// Context per slot, in tokens.
    #[arg(long)]
    pub ctx: Option<u32>,
    /// CPU threads (default: one per available core).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Layers to offload to the GPU (CUDA builds only).
    #[arg(long)]
    pub gpu_layers: Option<u32>,
    /// Pool id; names the handoff file.
    #[arg(long)]
    pub pool: Option<String>,
    /// Unix socket to serve on when not socket activated.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Directory for the handoff file.
    #[arg(long)]
    pub handoff_dir: Option<PathBuf>,
    /// Seconds in-flight requests may run after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10)]
    pub grace: u64,
    /// Exit cleanly (code 0, handoff file removed) after this many seconds without a generation
    /// request; 0 means never. Default: the plan's `idle_exit_secs`.
    #[arg(long)]
    pub idle_exit_secs: Option<u64>,
    /// Host memory for prompt states kept after their slot moved on (the prefix cache), in
    /// MiB; 0 turns it off. Default: the plan's `prefix_cache_mib`, else
    /// `llorch_wire::plan::defaults::prefix_cache_mib` of the memory available now.
    #[arg(long)]
    pub prefix_cache_mib: Option<u64>,
    /// Serve embeddings too (`embed` requests), from a context of `--ctx` tokens beside the
    /// slots. Default: the plan's `embeddings`.
    #[arg(long)]
    pub embeddings: bool,
    /// Check the configuration and the model file's header, then exit.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read engine plan {path}: {source}")]
    ReadPlan {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("engine plan {path} is invalid: {message}")]
    ParsePlan { path: PathBuf, message: String },
    #[error("{field} is required (give --{flag} or a --plan that sets it)")]
    Missing {
        field: &'static str,
        flag: &'static str,
    },
    #[error("{field} is {value}; {rule}")]
    Invalid {
        field: &'static str,
        value: String,
        rule: String,
    },
}

impl Args {
    /// Merges the plan (if any) with the flags and validates the result.
    pub fn into_config(self) -> Result<EngineConfig, ConfigError> {
        let plan = match &self.plan {
            Some(path) => Some(read_plan(path)?),
            None => None,
        };
        let p = plan.as_ref();
        let model_path = self
            .model
            .or_else(|| p.map(|p| PathBuf::from(&p.model.path)))
            .ok_or(ConfigError::Missing {
                field: "model",
                flag: "model",
            })?;
        let model_id = self
            .model_id
            .or_else(|| p.map(|p| p.model.id.clone()))
            .unwrap_or_else(|| {
                model_path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "model".into())
            });
        let pool_id = self
            .pool
            .or_else(|| p.map(|p| p.pool_id.clone()))
            .unwrap_or_else(|| "default".into());
        let threads = self
            .threads
            .or_else(|| p.and_then(|p| p.threads))
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get() as u32)
                    .unwrap_or(1)
            });
        let config = EngineConfig {
            model_sha256: p.map(|p| p.model.sha256.clone()).unwrap_or_default(),
            slots: self
                .slots
                .or_else(|| p.map(|p| p.slots))
                .unwrap_or(defaults::SLOTS),
            ctx_per_slot: self
                .ctx
                .or_else(|| p.map(|p| p.ctx_per_slot))
                .unwrap_or(defaults::CTX_PER_SLOT),
            threads,
            gpu_layers: self
                .gpu_layers
                .or_else(|| p.map(|p| p.gpu_layers))
                .unwrap_or(0),
            socket: self
                .socket
                .or_else(|| p.map(|p| PathBuf::from(&p.socket)))
                .ok_or(ConfigError::Missing {
                    field: "socket",
                    flag: "socket",
                })?,
            handoff_dir: self
                .handoff_dir
                .or_else(|| p.map(|p| PathBuf::from(&p.handoff_dir)))
                .ok_or(ConfigError::Missing {
                    field: "handoff_dir",
                    flag: "handoff-dir",
                })?,
            grace_secs: self.grace,
            idle_exit: self
                .idle_exit_secs
                .or_else(|| p.and_then(|p| p.idle_exit_secs))
                .filter(|s| *s > 0)
                .map(std::time::Duration::from_secs),
            prefix_cache_bytes: self
                .prefix_cache_mib
                .or_else(|| p.and_then(|p| p.prefix_cache_mib))
                .unwrap_or_else(|| {
                    llorch_wire::plan::defaults::prefix_cache_mib(llorch_os::mem::available_bytes())
                })
                .saturating_mul(1 << 20)
                .try_into()
                .unwrap_or(usize::MAX),
            embeddings: self.embeddings || p.is_some_and(|p| p.embeddings),
            model_path,
            model_id,
            pool_id,
        };
        config.validate()?;
        Ok(config)
    }
}

fn read_plan(path: &Path) -> Result<EnginePlan, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadPlan {
        path: path.to_owned(),
        source,
    })?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let plan: EnginePlan =
        serde_path_to_error::deserialize(de).map_err(|e| ConfigError::ParsePlan {
            path: path.to_owned(),
            message: format!("at {}: {}", e.path(), e.inner()),
        })?;
    if plan.version != llorch_wire::plan::PLAN_VERSION {
        return Err(ConfigError::ParsePlan {
            path: path.to_owned(),
            message: format!(
                "version is {}; this engine reads version {}",
                plan.version,
                llorch_wire::plan::PLAN_VERSION
            ),
        });
    }
    Ok(plan)
}

impl EngineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, value: String, rule: &str| ConfigError::Invalid {
            field,
            value,
            rule: rule.to_string(),
        };
        if self.slots == 0 || self.slots > MAX_SLOTS {
            return Err(invalid(
                "slots",
                self.slots.to_string(),
                &format!("it must be between 1 and {MAX_SLOTS}"),
            ));
        }
        if self.ctx_per_slot < MIN_CTX_PER_SLOT {
            return Err(invalid(
                "ctx",
                self.ctx_per_slot.to_string(),
                &format!("each slot needs at least {MIN_CTX_PER_SLOT} tokens of context"),
            ));
        }
        if self.slots.checked_mul(self.ctx_per_slot).is_none() {
            return Err(invalid(
                "ctx",
                self.ctx_per_slot.to_string(),
                "slots times ctx overflows",
            ));
        }
        if self.threads == 0 {
            return Err(invalid("threads", "0".into(), "it must be at least 1"));
        }
        if self.gpu_layers > 0 && !cfg!(feature = "cuda") {
            return Err(invalid(
                "gpu_layers",
                self.gpu_layers.to_string(),
                "this engine was built without the cuda feature; use 0",
            ));
        }
        let valid_id = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && !s.starts_with('.')
        };
        if !valid_id(&self.pool_id) {
            return Err(invalid(
                "pool",
                format!("{:?}", self.pool_id),
                "use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
            ));
        }
        if self.socket.as_os_str().len() > 100 {
            return Err(invalid(
                "socket",
                self.socket.display().to_string(),
                "a Unix socket path must be shorter than 108 bytes",
            ));
        }
        Ok(())
    }

    /// The device string reported in the handoff file.
    pub fn device(&self) -> String {
        if self.gpu_layers > 0 {
            "cuda".into()
        } else {
            "cpu".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec![
            "llorch-engine",
            "--model",
            "/m/x.gguf",
            "--socket",
            "/run/e.sock",
            "--handoff-dir",
            "/run/h",
        ];
        v.extend_from_slice(extra);
        Args::parse_from(v)
    }

    #[test]
    fn defaults_fill_what_flags_leave_out() {
        let c = args(&[]).into_config().unwrap();
        assert_eq!(c.slots, 4);
        assert_eq!(c.ctx_per_slot, 2048);
        assert_eq!(c.model_id, "x");
        assert_eq!(c.pool_id, "default");
        assert!(c.threads >= 1);
    }

    #[test]
    fn invalid_values_name_the_field() {
        for (flags, field) in [
            (&["--slots", "0"][..], "slots"),
            (&["--slots", "65"][..], "slots"),
            (&["--ctx", "8"][..], "ctx"),
            (&["--threads", "0"][..], "threads"),
            (&["--pool", "a/b"][..], "pool"),
        ] {
            let err = args(flags).into_config().unwrap_err().to_string();
            assert!(err.starts_with(field), "{flags:?}: {err}");
        }
    }

    #[test]
    fn plan_values_are_used_and_flags_override_them() {
        let dir = tempfile::tempdir().unwrap();
        let plan = dir.path().join("plan.json");
        std::fs::write(
            &plan,
            r#"{"version":1,"pool_id":"p1","model":{"id":"m","path":"/m.gguf","sha256":"ab",
               "size_bytes":1,"architecture":"llama","context_length":8192,"has_chat_template":true},
               "slots":2,"ctx_per_slot":512,"socket":"/s.sock","handoff_dir":"/h"}"#,
        )
        .unwrap();
        let c = Args::parse_from(["e", "--plan", plan.to_str().unwrap(), "--slots", "3"])
            .into_config()
            .unwrap();
        assert_eq!(
            (c.pool_id.as_str(), c.slots, c.ctx_per_slot),
            ("p1", 3, 512)
        );
        assert_eq!(c.model_sha256, "ab");
        assert_eq!(c.idle_exit, None);
        let c = Args::parse_from([
            "e",
            "--plan",
            plan.to_str().unwrap(),
            "--idle-exit-secs",
            "7",
        ])
        .into_config()
        .unwrap();
        assert_eq!(c.idle_exit, Some(std::time::Duration::from_secs(7)));
        std::fs::write(&plan, r#"{"version":1,"pool_id":"p1","bogus":1}"#).unwrap();
        let err = Args::parse_from(["e", "--plan", plan.to_str().unwrap()])
            .into_config()
            .unwrap_err()
            .to_string();
        assert!(err.contains("plan.json") && err.contains("bogus"), "{err}");
    }
}
