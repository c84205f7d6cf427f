//! Admission of `POST /generate`: from the request to a [`Job`] in the decode loop's queue,
//! with its slot reserved. Each step refuses with the status and the field at fault: the
//! engine's phase, the body (size, JSON, ranges), the requested slot, the chat template and
//! tools, the grammar (parsed here once), the prompt's length in tokens, and a free slot.
//! It does not run the job (`decode/`) nor choose the slot (`slots.rs`).

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use llorch_wire::engine::{
    defaults, EmbedInput, EndEvent, EngineEvent, FinishReason, GenerateRequest,
};
use llorch_wire::tools::{self, ToolChoice};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::sync::mpsc;

use super::{
    ArrivalGuard, Ready, Refusal, ResponseBody, Shared, SseBody, DRAINING, READY, RETRY_AFTER_SECS,
};
use crate::decode::{Command, Job};
use crate::model::Model;
use crate::sampler::Sampling;
use crate::slots::{SlotLease, SlotTable};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Admits one generation request and answers with its SSE stream.
pub(super) async fn generate(
    shared: &Shared,
    req: Request<Incoming>,
    received: Instant,
    arrival: Option<ArrivalGuard>,
) -> Result<Response<ResponseBody>, Refusal> {
    // Counted from arrival until the answer's body is dropped, so the engine never unloads
    // under a request, even one waiting for the load.
    let activity = shared.activity.begin();
    drop(arrival);
    shared.wait_loaded().await;
    let ready = serving(shared)?;
    let correlation_id = req
        .headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(128).collect::<String>());
    let body = read_body(req).await?;
    let request = parse(&body).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    request
        .validate()
        .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let n_slots = llorch_os::sync::lock(&ready.slots).len();
    check_slot(&request, n_slots)?;
    if let Some(inputs) = &request.embed {
        let (tokens, vectors) = embedded(ready, inputs, request.embed_truncate).await?;
        return Ok(end_only(tokens, vectors, received, activity));
    }
    let (text, field) = prompt_text(&request, &ready.model)?;
    let grammar = grammar_of(&request, &ready.model)?;
    if request.count_only {
        return Ok(end_only(
            ready.model.tokenize(&text).len(),
            Vec::new(),
            received,
            activity,
        ));
    }
    let prompt = tokenize(ready, &text, field)?;
    let lease = reserve(ready, &prompt, &request, n_slots)?;
    let slot = lease.slot();
    let max_tokens = request.max_tokens.unwrap_or(defaults::MAX_TOKENS);
    // Every event of a job fits: at most one token event per generated token (bounded by the
    // slot context), one flush of held-back text and one final event. So the decode loop's
    // `try_send` never finds the channel full, and a slow client cannot stall other slots.
    let n = request.n.unwrap_or(1);
    let capacity = (max_tokens.min(ready.ctx_per_slot) as usize + 1) * n as usize + 1;
    let (tx, rx) = mpsc::channel(capacity);
    let sampling = sampling_of(&request, ready.ctx_per_slot);
    let job = Job {
        lease,
        prompt,
        sampling,
        grammar,
        max_tokens,
        stop: request.stop,
        ignore_eos: request.ignore_eos,
        n,
        events: tx,
        received,
        task_id: request.task_id,
        correlation_id,
    };
    submit(ready, job)?;
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("x-llorch-slot", slot)
        .body(Either::Right(SseBody::new(rx, activity)))
        .expect("static response");
    Ok(resp)
}

/// The answer of a `count_only` or `embed` request: one `end` event whose `prompt_tokens` is
/// the count, with the vectors of an `embed` request.
fn end_only(
    prompt_tokens: usize,
    embeddings: Vec<Vec<f32>>,
    received: Instant,
    activity: super::idle::ActivityGuard,
) -> Response<ResponseBody> {
    let (tx, rx) = mpsc::channel(1);
    let end = EngineEvent::End(EndEvent {
        finish_reason: FinishReason::Stop,
        prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
        cached_tokens: 0,
        completion_tokens: 0,
        ttft_ms: received.elapsed().as_secs_f64() * 1000.0,
        decode_ms: 0.0,
        slot: 0,
        choices: Vec::new(),
        stop_sequence: None,
        embeddings,
    });
    let _ = tx.try_send(end);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Either::Right(SseBody::new(rx, activity)))
        .expect("static response")
}

/// The vectors of an `embed` request and the tokens read: each input tokenized (text) or
/// checked against the vocabulary (token ids), and against the embedding context (cut to it
/// with `truncate`, refused otherwise, naming `input[i]`).
async fn embedded(
    ready: &Ready,
    inputs: &[EmbedInput],
    truncate: bool,
) -> Result<(usize, Vec<Vec<f32>>), Refusal> {
    let bad = |field: String, message: String| {
        (StatusCode::BAD_REQUEST, ErrorBody::invalid(field, message))
    };
    let Some(embedder) = &ready.embedder else {
        return Err(bad(
            "model".into(),
            "this pool does not serve embeddings; set embeddings = true on its pool in node.toml (docs/CONFIGURATION.md)".into(),
        ));
    };
    let n_vocab = i64::from(ready.model.llama.n_vocab());
    let limit = embedder.ctx as usize;
    let mut tokens = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let mut t = match input {
            EmbedInput::Text(s) => ready.model.tokenize(s),
            EmbedInput::Tokens(ids) => {
                if let Some(id) = ids.iter().find(|id| i64::from(**id) >= n_vocab) {
                    return Err(bad(
                        format!("input[{i}]"),
                        format!("input[{i}] holds token {id}, which is not in the model's vocabulary (0 to {})", n_vocab - 1),
                    ));
                }
                ids.iter().map(|id| *id as i32).collect()
            }
        };
        if t.len() > limit {
            if !truncate {
                return Err(bad(
                    format!("input[{i}]"),
                    format!("input[{i}] is {} tokens; this pool embeds at most {limit} (its ctx): shorten it, or ask for truncation", t.len()),
                ));
            }
            t.truncate(limit);
        }
        tokens.push(t);
    }
    let total = tokens.iter().map(Vec::len).sum();
    match embedder.embed(tokens).await {
        Ok(vectors) => Ok((total, vectors)),
        Err(crate::embed::EmbedError::Busy) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnavailable,
                "more embedding requests wait than the pool has slots; retry shortly",
            ),
        )),
        Err(crate::embed::EmbedError::Failed(m)) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorBody::new(ErrorCode::EngineFailed, m),
        )),
    }
}

/// The loaded model and slots, or the refusal of an engine that is stopping (or, after
/// [`Shared::wait_loaded`], impossibly still loading).
fn serving(shared: &Shared) -> Result<&Ready, Refusal> {
    match shared.phase.load(Ordering::SeqCst) {
        READY => Ok(shared.ready().expect("ready phase has a model")),
        DRAINING => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnavailable,
                "the engine is stopping and takes no new requests",
            ),
        )),
        _ => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnready,
                format!("the engine is still loading {}", shared.model_path),
            )
            .with_retry_after_ms(RETRY_AFTER_SECS * 1000),
        )),
    }
}

/// Reads the whole body, at most [`MAX_BODY_BYTES`] (413 beyond).
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorBody::invalid(
                        "body",
                        format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                    ),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    ErrorBody::invalid("body", format!("cannot read the request body: {e}")),
                )
            }
        })?
        .to_bytes();
    Ok(body)
}

/// A requested slot must exist.
fn check_slot(request: &GenerateRequest, n_slots: usize) -> Result<(), Refusal> {
    if let Some(s) = request.slot {
        if s as usize >= n_slots {
            return Err((
                StatusCode::BAD_REQUEST,
                ErrorBody::invalid(
                    "slot",
                    format!("slot is {s}; this engine has slots 0 to {}", n_slots - 1),
                ),
            ));
        }
    }
    Ok(())
}

/// The prompt as text: the request's `prompt`, or its `messages` rendered with the model's chat
/// template; with the name of the field it came from, for refusals.
fn prompt_text(
    request: &GenerateRequest,
    model: &Model,
) -> Result<(String, &'static str), Refusal> {
    match (&request.prompt, &request.messages) {
        (Some(p), _) => Ok((p.clone(), "prompt")),
        (None, Some(m)) => {
            let choice = request.effective_tool_choice();
            let text = model
                .render_chat(m, &request.tools, &choice, request.parallel_tool_calls)
                .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
            Ok((text, "messages"))
        }
        (None, None) => unreachable!("validate() requires one of them"),
    }
}

/// The request's grammar in GBNF: its `grammar`, or its `json_schema` converted by llama.cpp.
/// Parsed here once, so a grammar that does not parse is the request's 400, not a stream error.
fn grammar_of(request: &GenerateRequest, model: &Model) -> Result<Option<String>, Refusal> {
    let choice = request.effective_tool_choice();
    // `auto` on a template without tool support (its tools described in a system message):
    // the model answers in text or with one call, which the grammar keeps well formed. (Tools
    // with a request's own grammar or JSON Schema are refused before this.)
    let auto = choice == ToolChoice::Auto
        && !request.tools.is_empty()
        && request.prompt.is_none()
        && !model.template_takes_tools()
        && request.json_schema.is_none()
        && request.grammar.is_none();
    let forced = (choice.forced() || auto)
        .then(|| tools::call_schema(&request.tools, &choice, request.parallel_tool_calls));
    let (schema, field) = match (&forced, &request.json_schema) {
        (Some(s), _) => (Some(s), "tools"),
        (None, Some(s)) => (Some(s), "json_schema"),
        (None, None) => (None, "grammar"),
    };
    let (gbnf, field) = match (schema, &request.grammar) {
        (Some(schema), _) => {
            let gbnf = llama_cpp_2::json_schema_to_grammar(&schema.to_string()).map_err(|e| {
                (
                    StatusCode::BAD_REQUEST,
                    ErrorBody::invalid(
                        field,
                        format!("llama.cpp cannot turn {field} into a grammar ({e}); simplify the schema"),
                    ),
                )
            })?;
            (
                if auto {
                    tools::auto_grammar(&gbnf)
                } else {
                    gbnf
                },
                field,
            )
        }
        (None, Some(g)) => (g.clone(), "grammar"),
        (None, None) => return Ok(None),
    };
    crate::sampler::check_grammar(&model.llama, &gbnf).map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            ErrorBody::invalid(
                field,
                format!("{field} does not give a grammar llama.cpp can parse ({e}); the parser's message is in the engine's log"),
            ),
        )
    })?;
    Ok(Some(gbnf))
}

/// Tokenizes the prompt, which must give at least one token and leave room in a slot for the
/// answer.
fn tokenize(ready: &Ready, text: &str, field: &'static str) -> Result<Vec<i32>, Refusal> {
    let prompt = ready.model.tokenize(text);
    if prompt.is_empty() {
        return Err((
            StatusCode::BAD_REQUEST,
            ErrorBody::invalid(field, format!("{field} renders to no tokens")),
        ));
    }
    if prompt.len() >= ready.ctx_per_slot as usize {
        return Err((
            StatusCode::BAD_REQUEST,
            ErrorBody::invalid(
                field,
                format!(
                    "{field} is {} tokens; a slot of this engine holds {} tokens including the answer (shorten the {field} or give the pool a larger ctx)",
                    prompt.len(),
                    ready.ctx_per_slot
                ),
            ),
        ));
    }
    Ok(prompt)
}

/// Reserves a slot for the prompt (the requested one if free); 503 with `Retry-After` when
/// every slot is busy: the engine never queues.
fn reserve(
    ready: &Ready,
    prompt: &[i32],
    request: &GenerateRequest,
    n_slots: usize,
) -> Result<SlotLease, Refusal> {
    let scope = request.cache_scope.unwrap_or(0);
    SlotTable::lease(
        &ready.slots,
        prompt,
        scope,
        request.slot.map(|s| s as usize),
    )
    .ok_or_else(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnavailable,
                format!("all {n_slots} slots of this engine are busy; retry later"),
            )
            .with_retry_after_ms(RETRY_AFTER_SECS * 1000),
        )
    })
}

/// The request's sampling parameters, defaults filled in and `repeat_last_n` bounded by the
/// slot context.
fn sampling_of(request: &GenerateRequest, ctx_per_slot: u32) -> Sampling {
    Sampling {
        temperature: request.temperature.unwrap_or(defaults::TEMPERATURE),
        top_p: request.top_p.unwrap_or(defaults::TOP_P),
        top_k: request.top_k.unwrap_or(defaults::TOP_K),
        min_p: request.min_p.unwrap_or(defaults::MIN_P),
        repeat_penalty: request.repeat_penalty.unwrap_or(defaults::REPEAT_PENALTY),
        typical_p: request.typical_p.unwrap_or(defaults::TYPICAL_P),
        repeat_last_n: match request.repeat_last_n.unwrap_or(defaults::REPEAT_LAST_N) {
            -1 => ctx_per_slot as i32,
            n => n.min(ctx_per_slot as i32),
        },
        presence_penalty: request.presence_penalty.unwrap_or(0.0),
        frequency_penalty: request.frequency_penalty.unwrap_or(0.0),
        seed: request.seed.unwrap_or_else(random_seed),
        logprobs: request.logprobs,
    }
}

/// Hands the job to the decode loop.
fn submit(ready: &Ready, job: Job) -> Result<(), Refusal> {
    if ready
        .commands
        .try_send(Command::Run(Box::new(job)))
        .is_err()
    {
        // The decode loop is gone (stopping) or, impossibly, its queue is longer than the
        // slot count. The job came back in the error and is dropped with it, and its lease
        // gives the slot back.
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(ErrorCode::PoolUnavailable, "the decode loop is not running"),
        ));
    }
    Ok(())
}

/// Parses the body, naming the field at fault for type errors and unknown fields.
fn parse(body: &[u8]) -> Result<GenerateRequest, ErrorBody> {
    llorch_wire::json::parse(body)
}

/// A seed for a request that gave none.
fn random_seed() -> u32 {
    llorch_wire::id::random_u64() as u32
}
