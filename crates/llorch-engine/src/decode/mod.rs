//! The decode loop: one thread owns the llama context and drives every active slot with one
//! `llama_decode` per step (continuous batching). A request joins between two steps; prompts
//! are evaluated in chunks inside the same batches as other slots' next tokens, so a long
//! prompt never stalls streams already running.
//!
//! The loop receives jobs whose slot was already reserved in the [`SlotTable`], each holding
//! the slot's [`SlotLease`]. `DecodeLoop::finish` releases it, exactly once per job, whatever
//! way the job ends; the one other release here is a job refused before it started.

use std::num::NonZeroU32;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::{LlamaStateSeqFlags, SeqState};
use llorch_wire::engine::{ChoiceEnd, EndEvent, EngineEvent, FinishReason};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::sync::mpsc::Sender;

use crate::metrics::{Metrics, Throughput};
use crate::model::{backend, Model};
use crate::prefix::{self, HostCache, Source};
use crate::sampler::{self, Sampling};
use crate::slots::{SlotLease, SlotTable};
use crate::text::{Output, TextStream};
use active::Active;

mod active;

/// Tokens evaluated per `llama_decode` call at most (prompt chunks plus one per generating slot).
pub const BATCH_TOKENS: usize = 512;

/// One admitted request, with its slot already reserved.
pub struct Job {
    /// The job's slot, returned to the slot table with what its KV cache holds when the job
    /// ends (or, if the job never reaches the loop, when it is dropped).
    pub lease: SlotLease,
    pub prompt: Vec<i32>,
    pub sampling: Sampling,
    /// The request's grammar in GBNF (structured output), already checked to parse.
    pub grammar: Option<String>,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Choices to generate, one after another in this slot (1 or more).
    pub n: u32,
    /// Bounded by the number of events the job can produce (see `http/admit.rs`), so `try_send`
    /// never finds it full; a closed channel means the client went away.
    pub events: Sender<EngineEvent>,
    /// When the engine received the request; time to first token counts from here.
    pub received: Instant,
    pub task_id: Option<String>,
    /// The `X-Correlation-Id` of the request that carried this job, for logs.
    pub correlation_id: Option<String>,
}

impl Job {
    pub fn slot(&self) -> usize {
        self.lease.slot()
    }
}

pub enum Command {
    Run(Box<Job>),
    /// Ends every active job with a `CANCELED` error (shutdown after the grace period).
    CancelAll(String),
}

/// The loop's settings, from the engine's configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub ctx_per_slot: u32,
    pub threads: u32,
    /// The host prefix cache's bound in bytes (0: no host cache; slots still copy from each
    /// other).
    pub prefix_cache_bytes: usize,
}

pub struct DecodeLoop {
    model: Arc<Model>,
    ctx_per_slot: u32,
    /// Tokens in each slot's KV cache (sequence id = slot index, each with its own cells).
    kv: Vec<Vec<i32>>,
    /// Whose prompt each slot's cells hold (the cache scope of the request that filled it).
    scopes: Vec<u64>,
    /// Prompt states saved in host memory when their slot moved on (see `prefix.rs`).
    host: HostCache<SeqState>,
    active: Vec<Option<Active>>,
    metrics: Arc<Metrics>,
    throughput: Throughput,
}

/// Creates the llama context and runs the loop until `commands` is closed and no job is left.
pub fn run(
    model: Arc<Model>,
    slots: Arc<Mutex<SlotTable>>,
    settings: Settings,
    commands: Receiver<Command>,
    metrics: Arc<Metrics>,
    started: &mut dyn FnMut(),
) -> Result<(), String> {
    let Settings {
        ctx_per_slot,
        threads,
        prefix_cache_bytes,
    } = settings;
    let n_slots = llorch_os::sync::lock(&slots).len();
    // `ctx_per_slot` cells a slot, each slot its own (not unified: a sequence's answer must not
    // depend on which other sequences' cells sit next to its own; docs/ARCHITECTURE.md).
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
        ctx_per_slot,
        kv: vec![Vec::new(); n_slots],
        scopes: vec![0; n_slots],
        host: HostCache::new(prefix_cache_bytes),
        active: (0..n_slots).map(|_| None).collect(),
        metrics,
        throughput: Throughput::default(),
    };
    this.metrics
        .prefix_limit_bytes
        .set(prefix_cache_bytes as i64);
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
            self.resume_waiting(ctx);
            for slot in 0..self.active.len() {
                if self.active[slot].as_ref().is_some_and(|a| a.restart) {
                    self.next_choice(ctx, slot, n_vocab);
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
        let slot = job.slot();
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
                job.lease.release(self.kv[slot].clone());
                let err = ErrorBody::new(
                    ErrorCode::EngineFailed,
                    format!("cannot build the grammar sampler: {e}"),
                );
                let _ = job.events.try_send(EngineEvent::Error(err));
                return;
            }
        };
        let scope = job.lease.scope();
        let planned = prefix::plan(slot, &self.kv, &self.scopes, &self.host, &job.prompt, scope);
        let computing = self.active.iter().enumerate().filter_map(|(j, a)| {
            let a = a.as_ref()?;
            let busy = a.waiting.is_none() && !a.pending.is_empty() && a.job.lease.scope() == scope;
            busy.then_some((j, a.job.prompt.as_slice()))
        });
        let waiting = prefix::wait_for(planned.tokens, &job.prompt, computing);
        // Waiting: nothing of the prompt is placed yet (`resume_waiting` does it).
        let keep = match waiting {
            Some(donor) => {
                tracing::debug!(
                    slot,
                    donor,
                    "Waiting for another slot to compute the shared prefix."
                );
                self.metrics.prefix_waits.inc();
                None
            }
            None => Some(self.reuse(ctx, slot, &job.prompt, scope, planned)),
        };
        let active = Active {
            sampler: job.sampling.sampler(n_vocab, grammar),
            logprobs: Vec::new(),
            text: TextStream::new(job.stop.clone()),
            stop_hit: None,
            pending: keep.map_or_else(Default::default, |k| {
                job.prompt[k..].iter().copied().collect()
            }),
            waiting,
            next: None,
            cached: keep.unwrap_or(0) as u32,
            generated: 0,
            choice: 0,
            ended: Vec::new(),
            restart: false,
            events_sent: 0,
            first_token_at: None,
            logits_at: None,
            job,
        };
        self.active[slot] = Some(active);
    }

    /// Fills `slot`'s KV cache with the longest prefix of `prompt` found in any slot or in the
    /// host cache (`plan`, which `prefix::plan` chose for this state of the caches), saving what the slot held to the host cache first
    /// when it would be lost, and returns how many prompt tokens the slot now holds. At least
    /// one prompt token is left to evaluate, because sampling needs its logits. Whatever
    /// fails here falls back to computing the whole prompt.
    fn reuse(
        &mut self,
        ctx: &mut LlamaContext<'_>,
        slot: usize,
        prompt: &[i32],
        scope: u64,
        mut plan: prefix::Plan,
    ) -> usize {
        let seq = slot as i32;
        let limit = prompt.len().saturating_sub(1);
        let own_kept = match plan.source {
            Source::Own => plan.tokens.min(limit),
            _ => 0,
        };
        if self.host.limit() > 0
            && prefix::worth_saving(slot, own_kept, &self.kv, &self.scopes, &self.host)
        {
            self.save(ctx, slot);
            // Saving may have evicted or merged entries: choose again.
            plan = prefix::plan(slot, &self.kv, &self.scopes, &self.host, prompt, scope);
        }
        let mut keep = plan.tokens.min(limit);
        let cut = |ctx: &mut LlamaContext<'_>, keep: usize| {
            matches!(
                ctx.clear_kv_cache_seq(Some(slot as u32), Some(keep as u32), None),
                Ok(true)
            )
        };
        let done = match plan.source {
            // Some model kinds cannot cut a sequence at `keep`; they start over.
            Source::Own => cut(ctx, keep),
            // Each slot has its own cells (a unified cache would share them, but makes greedy
            // answers depend on what other sequences sit next to them): the other slot's state
            // is copied in, then cut to the shared prefix.
            Source::Slot(from) => {
                match ctx.state_seq_get(from as i32, LlamaStateSeqFlags::empty()) {
                    Ok(state) => ctx.state_seq_set(&state, seq).is_ok() && cut(ctx, keep),
                    Err(_) => false,
                }
            }
            Source::Host(i) => {
                let (state, bytes) = self.host.take_use(i);
                let restored = ctx.state_seq_set(state, seq);
                if let Err(e) = &restored {
                    tracing::warn!(slot, error = %e, "Cannot restore a cached prompt state; computing the prompt.");
                } else {
                    self.metrics.prefix_restored_bytes.inc_by(bytes as u64);
                }
                restored.is_ok() && cut(ctx, keep)
            }
        };
        if !done {
            let _ = ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
            keep = 0;
        }
        self.kv[slot].clear();
        self.kv[slot].extend_from_slice(&prompt[..keep]);
        self.scopes[slot] = scope;
        if keep > 0 {
            self.metrics
                .prefix_hit_tokens
                .with_label_values(&[plan.source.label()])
                .inc_by(keep as u64);
        }
        keep
    }

    /// Starts the prefill of each waiting job whose donor's cells now hold the prefix they share,
    /// or whose donor stopped computing it (ended, cancelled, replaced): the job then takes the
    /// best source there is (normally the donor's cells) and computes the rest.
    fn resume_waiting(&mut self, ctx: &mut LlamaContext<'_>) {
        for slot in 0..self.active.len() {
            let Some((donor, prompt, scope)) = self.active[slot]
                .as_ref()
                .and_then(|a| Some((a.waiting?, &a.job.prompt, a.job.lease.scope())))
            else {
                continue;
            };
            let still_computing = self.active[donor].as_ref().is_some_and(|d| {
                let shared = prefix::common_prefix(&d.job.prompt, prompt)
                    .min(prompt.len().saturating_sub(1));
                d.waiting.is_none()
                    && !d.pending.is_empty()
                    && prefix::common_prefix(&self.kv[donor], prompt) < shared
            });
            if still_computing {
                continue;
            }
            let prompt = prompt.clone();
            let plan = prefix::plan(slot, &self.kv, &self.scopes, &self.host, &prompt, scope);
            let keep = self.reuse(ctx, slot, &prompt, scope, plan);
            if let Some(a) = self.active[slot].as_mut() {
                a.pending = prompt[keep..].iter().copied().collect();
                a.cached = keep as u32;
                a.waiting = None;
            }
        }
    }

    /// Saves `slot`'s KV cells to the host cache (evicting the least recently used entries to
    /// stay within its bound).
    fn save(&mut self, ctx: &LlamaContext<'_>, slot: usize) {
        match ctx.state_seq_get(slot as i32, LlamaStateSeqFlags::empty()) {
            Ok(state) => {
                let bytes = state.byte_len();
                let r = self
                    .host
                    .insert(self.kv[slot].clone(), self.scopes[slot], state, bytes);
                if r.stored {
                    self.metrics.prefix_saved_bytes.inc_by(bytes as u64);
                }
                self.metrics.prefix_evictions.inc_by(u64::from(r.evicted));
                self.metrics.prefix_bytes.set(self.host.bytes() as i64);
                self.metrics.prefix_entries.set(self.host.len() as i64);
            }
            Err(e) => {
                tracing::warn!(slot, error = %e, "Cannot save a slot's prompt state to the host cache.");
            }
        }
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
                self.end_choice(slot, FinishReason::Stop);
                continue;
            }
            a.generated += 1;
            generated += 1;
            a.logprobs.extend(sampled.logprob);
            piece.clear();
            vocab.token_to_piece_into(token, &mut piece, false, None);
            let (text, stopped) = match a.text.push(&piece) {
                Output::Text(t) => (t, false),
                Output::Stopped(t, stop) => {
                    a.stop_hit = Some(stop);
                    (t, true)
                }
            };
            a.send_text(text);
            if stopped {
                self.end_choice(slot, FinishReason::Stop);
            } else if a.generated >= a.job.max_tokens
                || self.kv[slot].len() + 1 >= self.ctx_per_slot as usize
            {
                self.end_choice(slot, FinishReason::Length);
            } else {
                a.next = Some(token.0);
            }
        }
        generated
    }

    /// Ends the current choice of the job in `slot`: the job's end when it was the last one,
    /// otherwise its held-back text goes out and the next choice starts before the next step.
    fn end_choice(&mut self, slot: usize, reason: FinishReason) {
        let Some(a) = self.active[slot].as_mut() else {
            return;
        };
        if a.choice + 1 >= a.job.n {
            return self.finish(slot, Ok(reason));
        }
        a.flush_text();
        a.ended.push(ChoiceEnd {
            finish_reason: reason,
            completion_tokens: a.generated,
        });
        a.restart = true;
    }

    /// Starts the next choice of the job in `slot` from the prompt in its KV cache: the cache
    /// is cut back to the prompt less its last token, which is evaluated again for its logits.
    fn next_choice(&mut self, ctx: &mut LlamaContext<'_>, slot: usize, n_vocab: i32) {
        let Some(a) = self.active[slot].as_mut() else {
            return;
        };
        let keep = a.job.prompt.len() - 1;
        if !matches!(
            ctx.clear_kv_cache_seq(Some(slot as u32), Some(keep as u32), None),
            Ok(true)
        ) {
            let _ = ctx.clear_kv_cache_seq(Some(slot as u32), None, None);
            self.kv[slot].clear();
            a.pending = a.job.prompt.iter().copied().collect();
        } else {
            self.kv[slot].truncate(keep);
            a.pending = a.job.prompt[keep..].iter().copied().collect();
        }
        a.choice += 1;
        let sampling = Sampling {
            seed: a.job.sampling.seed.wrapping_add(a.choice),
            ..a.job.sampling.clone()
        };
        // The grammar parsed for the first choice; it parses again.
        let grammar = a
            .job
            .grammar
            .as_deref()
            .and_then(|g| sampler::grammar(&self.model.llama, g).ok());
        a.sampler = sampling.sampler(n_vocab, grammar);
        a.text = TextStream::new(a.job.stop.clone());
        a.stop_hit = None;
        a.logprobs.clear();
        a.generated = 0;
        a.next = None;
        a.restart = false;
    }

    /// Ends the job in `slot`: sends its last event and releases the slot (exactly once: the
    /// job is taken out of `active` here).
    fn finish(&mut self, slot: usize, outcome: Result<FinishReason, ErrorBody>) {
        let Some(mut a) = self.active[slot].take() else {
            return;
        };
        let now = Instant::now();
        let generated = a.total_generated();
        let event = match outcome {
            Ok(reason) => {
                a.flush_text();
                let first = a.first_token_at.unwrap_or(now);
                if a.job.n > 1 {
                    a.ended.push(ChoiceEnd {
                        finish_reason: reason,
                        completion_tokens: a.generated,
                    });
                }
                EngineEvent::End(EndEvent {
                    finish_reason: reason,
                    prompt_tokens: a.job.prompt.len() as u32,
                    cached_tokens: a.cached,
                    completion_tokens: generated,
                    ttft_ms: ms(first - a.job.received),
                    decode_ms: ms(now - first),
                    slot: slot as u32,
                    choices: std::mem::take(&mut a.ended),
                    stop_sequence: a.stop_hit.take(),
                    embeddings: Vec::new(),
                })
            }
            Err(body) => EngineEvent::Error(body),
        };
        tracing::info!(
            slot,
            task_id = a.job.task_id.as_deref().unwrap_or(""),
            correlation_id = a.job.correlation_id.as_deref().unwrap_or(""),
            prompt_tokens = a.job.prompt.len(),
            generated,
            event = event.name(),
            "Request finished."
        );
        // Release before the final event goes out: a client that saw `end` and sends its next
        // request at once must find the slot free.
        a.job.lease.release(self.kv[slot].clone());
        let _ = a.job.events.try_send(event);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
