//! The loaded model: llama.cpp's backend and weights, the chat template from the GGUF
//! metadata, and prompt rendering and tokenization (done by request handlers, off the decode
//! loop). Chat prompts are rendered by [`crate::chat`] (minijinja, as transformers renders
//! them); llama.cpp's own template matcher is the fallback for a template minijinja cannot
//! evaluate, without tools.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llorch_wire::engine::ChatMessage;
use llorch_wire::tools::{Tool, ToolChoice};
use llorch_wire::ErrorBody;

use crate::chat::{ChatTemplate, RenderError};

/// llama.cpp's backend may be initialised once per process.
pub fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        LlamaBackend::init().expect("the llama.cpp backend is initialised only here")
    })
}

#[derive(Debug, thiserror::Error)]
#[error("llama.cpp could not load {path}: {reason}")]
pub struct LoadError {
    pub path: String,
    pub reason: String,
}

/// Load progress shared with the health endpoint, as f32 bits.
#[derive(Debug, Default)]
pub struct Progress(AtomicU32);

impl Progress {
    pub fn set(&self, p: f32) {
        self.0.store(p.to_bits(), Ordering::Relaxed);
    }
    pub fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Relaxed))
    }
}

pub struct Model {
    pub llama: LlamaModel,
    template: Option<LlamaChatTemplate>,
    /// The GGUF template compiled by minijinja (`None`: no template, or one that does not
    /// compile, logged at load).
    jinja: Option<ChatTemplate>,
}

impl Model {
    pub fn load(path: &Path, gpu_layers: u32, progress: Arc<Progress>) -> Result<Self, LoadError> {
        // A CUDA build without a usable GPU (no driver, a driver too old for its runtime, or
        // a unit that cannot open /dev/nvidia*) would quietly run every layer on the CPU: a
        // GPU pool refuses to load instead.
        if gpu_layers > 0 {
            let gpus: Vec<_> = llama_cpp_2::list_llama_ggml_backend_devices()
                .into_iter()
                .filter(|d| d.backend != "CPU")
                .collect();
            if !backend().supports_gpu_offload() || gpus.is_empty() {
                return Err(LoadError {
                    path: path.display().to_string(),
                    reason: format!(
                        "gpu_layers is {gpu_layers} but this engine sees no GPU (the log line \
                         above says why CUDA did not start: no driver, a driver older than \
                         CUDA 13, or a unit that cannot open /dev/nvidia*; nvidia-smi and \
                         systemctl cat llorch-engine@POOL show them); use devices = \"cpu\" \
                         to run on the CPU"
                    ),
                });
            }
            for d in &gpus {
                tracing::info!(
                    device = %d.name,
                    name = %d.description,
                    memory_free_bytes = d.memory_free,
                    memory_total_bytes = d.memory_total,
                    "GPU for the model."
                );
            }
        }
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(gpu_layers)
            .with_progress_callback(move |p| {
                progress.set(p);
                true
            });
        let llama =
            LlamaModel::load_from_file(backend(), path, &params).map_err(|e| LoadError {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let template = llama.chat_template(None).ok();
        let jinja = llama
            .meta_val_str("tokenizer.chat_template")
            .ok()
            .and_then(|source| {
                let vocab = llama.vocab();
                let text = |t| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
                ChatTemplate::new(&source, text(vocab.bos()), text(vocab.eos()))
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "The model's chat template does not compile with minijinja; chat uses llama.cpp's built-in templates and cannot take tools.")
                    })
                    .ok()
            });
        Ok(Self {
            llama,
            template,
            jinja,
        })
    }

    /// Whether the model's chat template renders `tools` itself.
    pub fn template_takes_tools(&self) -> bool {
        self.jinja.as_ref().is_some_and(|t| t.takes_tools)
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders chat messages with the model's own template, ending with the assistant's turn,
    /// offering `tools` under `choice`.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
        choice: &ToolChoice,
        parallel: bool,
    ) -> Result<String, ErrorBody> {
        let offered = !tools.is_empty() && *choice != ToolChoice::None;
        if let Some(jinja) = &self.jinja {
            match jinja.render(messages, tools, choice, parallel) {
                Ok(text) => return Ok(text),
                Err(RenderError::Refused(why)) => {
                    return Err(ErrorBody::invalid(
                        "messages",
                        format!("the model's chat template refuses these messages: {why}"),
                    ))
                }
                Err(RenderError::Failed(e)) if offered => {
                    return Err(ErrorBody::invalid(
                        "tools",
                        format!("the model's chat template cannot render this request: {e}"),
                    ))
                }
                Err(RenderError::Failed(e)) => {
                    tracing::warn!(error = %e, "The chat template failed in minijinja; rendering with llama.cpp's built-in template.");
                }
            }
        } else if offered {
            return Err(ErrorBody::invalid(
                "tools",
                "this model has no chat template that minijinja can render, so it cannot take tools",
            ));
        }
        self.render_builtin(messages)
    }

    /// llama.cpp's rendering: its built-in template that matches the model's.
    fn render_builtin(&self, messages: &[ChatMessage]) -> Result<String, ErrorBody> {
        let template = self.template.as_ref().ok_or_else(|| {
            ErrorBody::invalid(
                "messages",
                "this model has no chat template in its GGUF metadata; send a prompt instead",
            )
        })?;
        let chat = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                LlamaChatMessage::new(m.role.clone(), m.content.clone()).map_err(|_| {
                    ErrorBody::invalid(
                        format!("messages[{i}].content"),
                        "message content must not contain NUL characters",
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.llama
            .apply_chat_template(template, &chat, true)
            .map_err(|e| {
                ErrorBody::invalid(
                    "messages",
                    format!("the model's chat template cannot render these messages: {e}"),
                )
            })
    }

    /// Tokenizes prompt text the way llama.cpp's server does: special tokens in the text are
    /// parsed, and BOS is added when the model's metadata asks for it.
    pub fn tokenize(&self, text: &str) -> Vec<i32> {
        self.llama
            .vocab()
            .tokenize(text.as_bytes(), true, true)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }
}
