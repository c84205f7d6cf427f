//! Embeddings (a pool with `embeddings = true`): a llama context of its own beside the
//! slots' (`ctx` tokens, one sequence, embeddings on), on its own thread, so embedding never
//! waits for a decode step nor holds one up. Each input is read in one batch and pooled as the
//! GGUF says (`{arch}.pooling_type`: mean, CLS, last); a model without a pooling type (a chat
//! model) is mean-pooled. Vectors are L2-normalised, as OpenAI's and llama-server's are.
//! A reranker (rank pooling) is refused at load.

use std::num::NonZeroU32;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use crate::model::{backend, Model};

/// One request's inputs, already tokenized and checked against the context.
struct Job {
    inputs: Vec<Vec<i32>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

/// The embedding thread's door.
pub struct Embedder {
    jobs: SyncSender<Job>,
    /// Tokens one input may have (the context).
    pub ctx: u32,
}

/// Why an embedding could not be made.
#[derive(Debug)]
pub enum EmbedError {
    /// More requests wait than there are slots: try again.
    Busy,
    /// llama.cpp failed, or the thread is gone.
    Failed(String),
}

/// The pooling for this model: its own when the GGUF names one, else mean.
fn pooling(model: &Model) -> Result<LlamaPoolingType, String> {
    let arch = model
        .llama
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    let own = model
        .llama
        .meta_val_str(&format!("{arch}.pooling_type"))
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map(LlamaPoolingType::from);
    match own {
        Some(LlamaPoolingType::Rank) => Err(
            "the model is a reranker (rank pooling): it scores pairs and makes no embeddings; set embeddings = false for this pool".into(),
        ),
        Some(p @ (LlamaPoolingType::Mean | LlamaPoolingType::Cls | LlamaPoolingType::Last)) => Ok(p),
        _ => Ok(LlamaPoolingType::Mean),
    }
}

impl Embedder {
    /// Creates the embedding context on its own thread; returns once it exists (or failed).
    pub async fn start(
        model: &Arc<Model>,
        ctx: u32,
        threads: u32,
        queue: usize,
    ) -> Result<Self, String> {
        let pooling = pooling(model)?;
        let (jobs, receiver) = sync_channel(queue.max(1));
        let (started, result) = oneshot::channel::<Result<(), String>>();
        let model = Arc::clone(model);
        std::thread::Builder::new()
            .name("embed".into())
            .spawn(move || {
                let params = LlamaContextParams::default()
                    .with_embeddings(true)
                    .with_pooling_type(pooling)
                    .with_n_ctx(NonZeroU32::new(ctx))
                    .with_n_batch(ctx)
                    .with_n_ubatch(ctx)
                    .with_n_seq_max(1)
                    .with_n_threads(threads as i32)
                    .with_n_threads_batch(threads as i32);
                let context = match model.llama.new_context(backend(), params) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ =
                            started.send(Err(format!("cannot create the embedding context: {e}")));
                        return;
                    }
                };
                let _ = started.send(Ok(()));
                serve(context, ctx as usize, receiver);
            })
            .map_err(|e| format!("cannot start the embedding thread: {e}"))?;
        result
            .await
            .map_err(|_| "the embedding thread did not start".to_string())??;
        tracing::info!(tokens = ctx, pooling = ?pooling, "Embeddings served.");
        Ok(Self { jobs, ctx })
    }

    /// The vectors of `inputs` (token ids), in order.
    pub async fn embed(&self, inputs: Vec<Vec<i32>>) -> Result<Vec<Vec<f32>>, EmbedError> {
        let (reply, answer) = oneshot::channel();
        match self.jobs.try_send(Job { inputs, reply }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(EmbedError::Busy),
            Err(TrySendError::Disconnected(_)) => {
                return Err(EmbedError::Failed("the embedding thread is gone".into()))
            }
        }
        answer
            .await
            .map_err(|_| EmbedError::Failed("the embedding thread is gone".into()))?
            .map_err(EmbedError::Failed)
    }
}

/// The embedding loop: one job at a time, one input per batch. A job whose caller went away
/// stops between inputs.
fn serve(mut ctx: llama_cpp_2::context::LlamaContext<'_>, n_ctx: usize, jobs: Receiver<Job>) {
    let mut batch = LlamaBatch::new(n_ctx, 1);
    for job in jobs {
        let mut out = Vec::with_capacity(job.inputs.len());
        let mut failed = None;
        for tokens in &job.inputs {
            if job.reply.is_closed() {
                break;
            }
            batch.clear();
            ctx.clear_kv_cache();
            // Every token is an output: the pooling reads them all.
            let added = tokens
                .iter()
                .enumerate()
                .try_for_each(|(i, t)| batch.add(LlamaToken(*t), i as i32, &[0], true));
            if let Err(e) = added {
                failed = Some(format!("cannot batch the input: {e}"));
                break;
            }
            if let Err(e) = ctx.decode(&mut batch) {
                failed = Some(format!("llama.cpp could not embed the input: {e}"));
                break;
            }
            match ctx.embeddings_seq_ith(0) {
                Ok(v) => out.push(normalized(v)),
                Err(e) => {
                    failed = Some(format!("llama.cpp made no embedding: {e}"));
                    break;
                }
            }
        }
        let _ = job.reply.send(match failed {
            Some(e) => Err(e),
            None => Ok(out),
        });
    }
}

/// `v` scaled to length 1 (a zero vector stays zero).
fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_come_out_with_length_one() {
        let v = normalized(&[3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(normalized(&[0.0, 0.0]), [0.0, 0.0]);
    }
}
