//! The decode loop: one thread owns the llama context and drives every active slot with one
//! `llama_decode` per step (continuous batching). A request joins between two steps; prompts
//! are evaluated in chunks inside the same batches as other slots' next tokens, so a long
//! prompt never stalls streams already running.
//!
//! The loop receives jobs whose slot was already reserved in the [`SlotTable`], and it is the
//! only place that releases a slot, exactly once per job, whatever way the job ends.

use std::num::NonZeroU32;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llorch_wire::engine::{EndEvent, EngineEvent, FinishReason, TokenEvent, TokenLogprob};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::sync::mpsc::Sender;

use crate::metrics::{Metrics, Throughput};
use crate::model::{backend, Model};
use crate::sampler::{self, Sampler, Sampling};
use crate::slots::{common_prefix, SlotTable};
use crate::text::{Output, TextStream};

/// Tokens evaluated per `llama_decode` call at most (prompt chunks plus one per generating slot).
pub const BATCH_TOKENS: usize = 512;

/// One admitted request, with its slot already reserved.
pub struct Job {
    pub slot: usize,
    pub prompt: Vec<i32>,
    pub sampling: Sampling,
    /// The request's grammar in GBNF (structured output), already checked to parse.
    pub grammar: Option<String>,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Bounded by the number of events the job can produce (see `http.rs`), so `try_send`
    /// never finds it full; a closed channel means the client went away.
    pub events: Sender<EngineEvent>,
    /// When the engine received the request; time to first token counts from here.
    pub received: Instant,
    pub task_id: Option<String>,
    /// The `X-Correlation-Id` of the request that carried this job, for logs.
    pub correlation_id: Option<String>,
}

pub enum Command {
    Run(Box<Job>),
    /// Ends every active job with a `CANCELED` error (shutdown after the grace period).
    CancelAll(String),
}

struct Active {
    job: Box<Job>,
    sampler: Sampler,
    /// Log-probabilities of tokens whose text has not been sent yet.
    logprobs: Vec<TokenLogprob>,
    text: TextStream,
    /// Prompt tokens not yet evaluated.
    pending: std::collections::VecDeque<i32>,
    /// The token sampled last step, to be evaluated next step.
    next: Option<i32>,
    cached: u32,
    generated: u32,
    events_sent: u32,
    first_token_at: Option<Instant>,
    /// Index in this step's batch whose logits belong to this job.
    logits_at: Option<i32>,
}

pub struct DecodeLoop {
    model: Arc<Model>,
    slots: Arc<Mutex<SlotTable>>,
    ctx_per_slot: u32,
    /// Tokens in each slot's KV cache (sequence id = slot index).
    kv: Vec<Vec<i32>>,
    active: Vec<Option<Active>>,
    metrics: Arc<Metrics>,
    throughput: Throughput,
}

/// Creates the llama context and runs the loop until `commands` is closed and no job is left.
pub fn run(
    model: Arc<Model>,
    slots: Arc<Mutex<SlotTable>>,
    ctx_per_slot: u32,
    threads: u32,
    commands: Receiver<Command>,
    metrics: Arc<Metrics>,
    started: &mut dyn FnMut(),
) -> Result<(), String> {
    let n_slots = slots.lock().expect("slot table lock").len();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(ctx_per_slot * n_slots as u32))
        .with_n_seq_max(n_slots as u32)
        .with_n_batch(BATCH_TOKENS as u32)
        .with_n_ubatch(BATCH_TOKENS as u32)
        .with_n_threads(threads as i32)
        .with_n_threads_batch(threads as i32)
        .with_kv_unified(false);
    let model_ref = Arc::clone(&model);
    let mut ctx = model_ref
        .llama
        .new_context(backend(), params)
        .map_err(|e| format!("cannot create the llama context: {e}"))?;
    let mut this = DecodeLoop {
        model,
        slots,
        ctx_per_slot,
        kv: vec![Vec::new(); n_slots],
        active: (0..n_slots).map(|_| None).collect(),
        metrics,
        throughput: Throughput::default(),
    };
    started();
    this.run(&mut ctx, commands);
    Ok(())
}

impl DecodeLoop {
    fn run(&mut self, ctx: &mut LlamaContext<'_>, commands: Receiver<Command>) {
        let mut batch = LlamaBatch::new(BATCH_TOKENS, self.active.len() as i32);
        let n_vocab = self.model.llama.n_vocab();
        // Fed from this loop, so a stuck decode (not just a stuck process) stops the feeding
        // and the service manager restarts the engine. Idle, the loop still turns every second.
        let mut watchdog = llorch_os::service::Watchdog::from_env();
        loop {
            watchdog.feed();
            // Take new work: wait when idle, otherwise only what has arrived.
            let idle = self.active.iter().all(Option::is_none);
            let first = if idle {
                self.throughput.flush(&self.metrics);
                match commands.recv_timeout(watchdog.wait(Duration::from_secs(1))) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                None
            };
            let mut incoming: Vec<Command> = first.into_iter().collect();
            loop {
                match commands.try_recv() {
                    Ok(c) => incoming.push(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if self.active.iter().all(Option::is_none) && incoming.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            for cmd in incoming {
                match cmd {
                    Command::Run(job) => self.start(ctx, job, n_vocab),
                    Command::CancelAll(why) => {
                        for slot in 0..self.active.len() {
                            if self.active[slot].is_some() {
                                let err = ErrorBody::new(ErrorCode::Canceled, why.clone());
                                self.finish(slot, Err(err));
                            }
                        }
                    }
                }
            }
            // A client that went away frees its slot before the next step.
            for slot in 0..self.active.len() {
                if self.active[slot]
                    .as_ref()
                    .is_some_and(|a| a.job.events.is_closed())
                {
                    tracing::debug!(slot, "Client went away; cancelling.");
                    self.finish(
                        slot,
                        Err(ErrorBody::new(ErrorCode::Canceled, "client gone")),
                    );
                }
            }
            let step = Instant::now();
            let sequences = self.fill_batch(&mut batch);
            if sequences == 0 {
                continue;
            }
            self.metrics.decode_steps.inc();
            self.metrics.batch_size.observe(sequences as f64);
            if let Err(e) = ctx.decode(&mut batch) {
                tracing::error!(error = %e, "llama_decode failed; failing the active requests.");
                for slot in 0..self.active.len() {
                    if self.active[slot].is_some() {
                        let err = ErrorBody::new(
                            ErrorCode::EngineFailed,
                            format!("the engine could not evaluate the batch: {e}"),
                        );
                        // The slot's cache is in an unknown state: forget it.
                        self.kv[slot].clear();
                        let _ = ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
                        self.finish(slot, Err(err));
                    }
                }
                continue;
            }
            let generated = self.sample(ctx);
            self.metrics.generated_tokens.inc_by(generated);
            self.throughput
                .step(&self.metrics, generated, step.elapsed());
            let held: usize = self.kv.iter().map(Vec::len).sum();
            let capacity = self.ctx_per_slot as usize * self.kv.len();
            self.metrics
                .kv_used
                .set(held as f64 / capacity.max(1) as f64);
        }
    }

    fn start(&mut self, ctx: &mut LlamaContext<'_>, job: Box<Job>, n_vocab: i32) {
        let slot = job.slot;
        debug_assert!(self.active[slot].is_none(), "slot {slot} reserved twice");
        // The HTTP handler parsed the grammar already, so this does not fail on the request.
        let grammar = match job
            .grammar
            .as_deref()
            .map(|g| sampler::grammar(&self.model.llama, g))
        {
            None => None,
            Some(Ok(g)) => Some(g),
            Some(Err(e)) => {
                self.slots
                    .lock()
                    .expect("slot table lock")
                    .release(slot, self.kv[slot].clone());
                let err = ErrorBody::new(
                    ErrorCode::EngineFailed,
                    format!("cannot build the grammar sampler: {e}"),
                );
                let _ = job.events.try_send(EngineEvent::Error(err));
                return;
            }
        };
        // Reuse the longest prefix already in this slot's cache. At least one prompt token is
        // evaluated again, because sampling needs its logits.
        let mut keep = common_prefix(&self.kv[slot], &job.prompt);
        if keep == job.prompt.len() {
            keep -= 1;
        }
        if !matches!(
            ctx.clear_kv_cache_seq(Some(slot as u32), Some(keep as u32), None),
            Ok(true)
        ) {
            // The cache could not be cut at `keep` (some model kinds cannot): start over.
            let _ = ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
            keep = 0;
        }
        self.kv[slot].truncate(keep);
        let active = Active {
            sampler: job.sampling.sampler(n_vocab, grammar),
            logprobs: Vec::new(),
            text: TextStream::new(job.stop.clone()),
            pending: job.prompt[keep..].iter().copied().collect(),
            next: None,
            cached: keep as u32,
            generated: 0,
            events_sent: 0,
            first_token_at: None,
            logits_at: None,
            job,
        };
        self.active[slot] = Some(active);
    }

    /// Puts one token per generating slot and prompt chunks into the batch. Returns the number
    /// of sequences in it (0: nothing to evaluate).
    fn fill_batch(&mut self, batch: &mut LlamaBatch) -> usize {
        batch.clear();
        let mut used = 0usize;
        let mut sequences = 0usize;
        let mut prompt = 0u64;
        for (slot, a) in self.active.iter_mut().enumerate() {
            let Some(a) = a else { continue };
            a.logits_at = None;
            if let Some(tok) = a.next.take() {
                let pos = self.kv[slot].len() as i32;
                batch
                    .add(LlamaToken(tok), pos, &[slot as i32], true)
                    .expect("batch sized for one token per slot");
                self.kv[slot].push(tok);
                a.logits_at = Some(used as i32);
                used += 1;
                sequences += 1;
            }
        }
        for (slot, a) in self.active.iter_mut().enumerate() {
            let Some(a) = a else { continue };
            // A slot that already put its next token in has its sequence counted.
            let counted = a.logits_at.is_some();
            let before = used;
            while used < BATCH_TOKENS {
                let Some(tok) = a.pending.pop_front() else {
                    break;
                };
                let last = a.pending.is_empty();
                let pos = self.kv[slot].len() as i32;
                batch
                    .add(LlamaToken(tok), pos, &[slot as i32], last)
                    .expect("batch holds BATCH_TOKENS tokens");
                self.kv[slot].push(tok);
                if last {
                    a.logits_at = Some(used as i32);
                }
                used += 1;
            }
            prompt += (used - before) as u64;
            if used > before && !counted {
                sequences += 1;
            }
        }
        self.metrics.prompt_tokens.inc_by(prompt);
        sequences
    }

    /// Samples a token for every sequence whose logits this step computed; returns how many
    /// tokens were generated.
    fn sample(&mut self, ctx: &LlamaContext<'_>) -> u64 {
        let mut generated = 0;
        let model = Arc::clone(&self.model);
        let vocab = model.llama.vocab();
        let mut piece = Vec::with_capacity(32);
        for slot in 0..self.active.len() {
            let Some(a) = self.active[slot].as_mut() else {
                continue;
            };
            let Some(idx) = a.logits_at else { continue };
            let sampled = a.sampler.sample(ctx, idx, &vocab);
            let token = sampled.token;
            let now = Instant::now();
            a.first_token_at.get_or_insert(now);
            if vocab.is_eog(token) && !a.job.ignore_eos {
                self.finish(slot, Ok(FinishReason::Stop));
                continue;
            }
            a.generated += 1;
            generated += 1;
            a.logprobs.extend(sampled.logprob);
            piece.clear();
            vocab.token_to_piece_into(token, &mut piece, false, None);
            let (text, stopped) = match a.text.push(&piece) {
                Output::Text(t) => (t, false),
                Output::Stopped(t) => (t, true),
            };
            if !text.is_empty() {
                let i = a.events_sent;
                a.events_sent += 1;
                let lp = std::mem::take(&mut a.logprobs);
                let _ = a
                    .job
                    .events
                    .try_send(EngineEvent::Token(TokenEvent { t: text, i, lp }));
            }
            if stopped {
                self.finish(slot, Ok(FinishReason::Stop));
            } else if a.generated >= a.job.max_tokens
                || self.kv[slot].len() + 1 >= self.ctx_per_slot as usize
            {
                self.finish(slot, Ok(FinishReason::Length));
            } else {
                a.next = Some(token.0);
            }
        }
        generated
    }

    /// Ends the job in `slot`: sends its last event and releases the slot (exactly once: the
    /// job is taken out of `active` here).
    fn finish(&mut self, slot: usize, outcome: Result<FinishReason, ErrorBody>) {
        let Some(mut a) = self.active[slot].take() else {
            return;
        };
        let now = Instant::now();
        let event = match outcome {
            Ok(reason) => {
                let rest = a.text.finish();
                if !rest.is_empty() {
                    let i = a.events_sent;
                    a.events_sent += 1;
                    let lp = std::mem::take(&mut a.logprobs);
                    let _ =
                        a.job
                            .events
                            .try_send(EngineEvent::Token(TokenEvent { t: rest, i, lp }));
                }
                let first = a.first_token_at.unwrap_or(now);
                EngineEvent::End(EndEvent {
                    finish_reason: reason,
                    prompt_tokens: a.job.prompt.len() as u32,
                    cached_tokens: a.cached,
                    completion_tokens: a.generated,
                    ttft_ms: ms(first - a.job.received),
                    decode_ms: ms(now - first),
                    slot: slot as u32,
                })
            }
            Err(body) => EngineEvent::Error(body),
        };
        tracing::info!(
            slot,
            task_id = a.job.task_id.as_deref().unwrap_or(""),
            correlation_id = a.job.correlation_id.as_deref().unwrap_or(""),
            prompt_tokens = a.job.prompt.len(),
            generated = a.generated,
            event = event.name(),
            "Request finished."
        );
        // Release before the final event goes out: a client that saw `end` and sends its next
        // request at once must find the slot free.
        self.slots
            .lock()
            .expect("slot table lock")
            .release(slot, self.kv[slot].clone());
        let _ = a.job.events.try_send(event);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
