//! The engine's HTTP/1.1 API on its Unix socket: `GET /health`, `GET /slots`,
//! `POST /generate` (an SSE stream). Requests are admitted here: parsed, validated, rendered,
//! tokenized, given a slot, and handed to the decode loop. The engine never queues: when every
//! slot is busy it answers 503 with `Retry-After` and the caller (pool-managerd, orchestratord)
//! decides what to do. A generation request that arrives while the model loads (the first
//! request of a socket-activated engine) waits for the load.
//!
//! [`Activity`] counts generation requests in progress: the idle clock of on-demand pools.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use llorch_wire::engine::{defaults, EngineEvent, GenerateRequest, Health, HealthState};
use llorch_wire::tools::{self, ToolChoice};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::sync::{mpsc, Notify};

use crate::decode::{Command, Job};
use crate::model::{Model, Progress};
use crate::sampler::Sampling;
use crate::slots::SlotTable;

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// `Retry-After` when every slot is busy or the model is still loading.
const RETRY_AFTER_SECS: u64 = 1;

pub type ResponseBody = Either<Full<Bytes>, SseBody>;

const LOADING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

/// What the request handlers share. The model part is set once loading finished.
pub struct Shared {
    phase: AtomicU8,
    pub progress: Arc<Progress>,
    pub model_path: String,
    ready: OnceLock<Ready>,
    /// Woken when the phase leaves `LOADING`.
    loaded: Notify,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub activity: Arc<Activity>,
}

pub struct Ready {
    pub model: Arc<Model>,
    pub slots: Arc<Mutex<SlotTable>>,
    pub commands: SyncSender<Command>,
    pub ctx_per_slot: u32,
}

impl Shared {
    pub fn new(model_path: String) -> Self {
        Self {
            phase: AtomicU8::new(LOADING),
            progress: Arc::new(Progress::default()),
            model_path,
            ready: OnceLock::new(),
            loaded: Notify::new(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            activity: Arc::new(Activity::default()),
        }
    }

    pub fn set_ready(&self, ready: Ready) {
        if self.ready.set(ready).is_ok() {
            self.phase.store(READY, Ordering::SeqCst);
            // The idle clock starts when the engine can serve, not when it started loading.
            self.activity.touch();
            self.loaded.notify_waiters();
        }
    }

    /// Returns once the model is loaded (or the engine stops).
    pub async fn wait_loaded(&self) {
        loop {
            let woken = self.loaded.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.phase.load(Ordering::SeqCst) != LOADING {
                return;
            }
            woken.await;
        }
    }

    pub fn ready(&self) -> Option<&Ready> {
        self.ready.get()
    }

    /// Stops admitting new requests (SIGTERM).
    pub fn drain(&self) {
        self.phase.store(DRAINING, Ordering::SeqCst);
        self.loaded.notify_waiters();
    }

    pub fn busy_slots(&self) -> usize {
        self.ready()
            .map(|r| r.slots.lock().expect("slot table lock").busy())
            .unwrap_or(0)
    }
}

/// Answers one request. `arrival` is the connection's [`ArrivalGuard`] on its first request:
/// it is let go once a generation request counts itself, or at once for anything else.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    arrival: Option<ArrivalGuard>,
) -> Result<Response<ResponseBody>, Infallible> {
    let received = Instant::now();
    let arrival = if (req.method(), req.uri().path()) == (&Method::POST, "/generate") {
        arrival
    } else {
        drop(arrival);
        None
    };
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => health(&shared),
        (&Method::GET, "/slots") => match shared.ready() {
            Some(r) => json(
                StatusCode::OK,
                &r.slots.lock().expect("slot table lock").status(),
            ),
            None => unready(&shared),
        },
        (&Method::GET, "/metrics") => {
            let slots = shared.ready().map(|r| {
                let t = r.slots.lock().expect("slot table lock");
                (t.busy(), t.len())
            });
            Response::builder()
                .header("content-type", llorch_metrics::CONTENT_TYPE)
                .body(Either::Left(Full::new(Bytes::from(
                    shared.metrics.encode(slots),
                ))))
                .expect("static response")
        }
        (&Method::POST, "/generate") => match generate(&shared, req, received, arrival).await {
            Ok(resp) => resp,
            Err((status, body)) => error(status, body),
        },
        (_, "/health" | "/slots" | "/generate" | "/metrics") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorBody::invalid("method", format!("{} is not allowed here", req.method())),
        ),
        (_, path) => error(
            StatusCode::NOT_FOUND,
            ErrorBody::invalid(
                "path",
                format!("no such endpoint {path}; the engine serves /health, /slots, /metrics and /generate"),
            ),
        ),
    };
    Ok(resp)
}

fn health(shared: &Shared) -> Response<ResponseBody> {
    let (status, body) = match shared.phase.load(Ordering::SeqCst) {
        READY => (
            StatusCode::OK,
            Health {
                status: HealthState::Ready,
                reason: None,
                progress: None,
            },
        ),
        DRAINING => (
            StatusCode::SERVICE_UNAVAILABLE,
            Health {
                status: HealthState::Draining,
                reason: Some("the engine is stopping".into()),
                progress: None,
            },
        ),
        _ => {
            let p = shared.progress.get();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Health {
                    status: HealthState::Loading,
                    reason: Some(format!(
                        "loading model {} ({:.0}%)",
                        shared.model_path,
                        p * 100.0
                    )),
                    progress: Some(p),
                },
            )
        }
    };
    let mut resp = json(status, &body);
    if status != StatusCode::OK {
        resp.headers_mut()
            .insert("retry-after", RETRY_AFTER_SECS.into());
    }
    resp
}

fn unready(shared: &Shared) -> Response<ResponseBody> {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorBody::new(
            ErrorCode::PoolUnready,
            format!("the engine is still loading {}", shared.model_path),
        )
        .with_retry_after_ms(RETRY_AFTER_SECS * 1000),
    )
}

type Refusal = (StatusCode, ErrorBody);

/// Generation requests in progress, connections whose first request has not arrived yet,
/// and when the last generation request ended.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<ActivityState>,
    changed: Notify,
}

#[derive(Debug, Clone, Copy)]
struct ActivityState {
    generating: usize,
    /// Accepted connections that sent no request yet: one may be a generation request, so
    /// the engine does not go idle under it; they do not restart the idle clock.
    arriving: usize,
    last: Instant,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            state: Mutex::new(ActivityState {
                generating: 0,
                arriving: 0,
                last: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }
}

impl Activity {
    /// Counts one generation request from now until the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.state.lock().expect("activity lock").generating += 1;
        self.changed.notify_waiters();
        ActivityGuard(Arc::clone(self))
    }

    /// Counts one accepted connection until its first request arrives (the guard drops).
    pub fn arriving(self: &Arc<Self>) -> ArrivalGuard {
        self.state.lock().expect("activity lock").arriving += 1;
        self.changed.notify_waiters();
        ArrivalGuard(Arc::clone(self))
    }

    /// Restarts the idle clock.
    pub fn touch(&self) {
        self.state.lock().expect("activity lock").last = Instant::now();
        self.changed.notify_waiters();
    }

    /// Returns once no generation request has been in progress for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let woken = self.changed.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let ActivityState {
                generating,
                arriving,
                last,
            } = *self.state.lock().expect("activity lock");
            if generating > 0 || arriving > 0 {
                woken.await;
                continue;
            }
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline.into()) => {}
                () = woken => {}
            }
        }
    }
}

/// One generation request in progress; its drop ends it and restarts the idle clock.
#[derive(Debug)]
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        {
            let mut s = self.0.state.lock().expect("activity lock");
            s.generating -= 1;
            s.last = Instant::now();
        }
        self.0.changed.notify_waiters();
    }
}

/// One accepted connection whose first request has not reached [`handle`] yet.
#[derive(Debug)]
pub struct ArrivalGuard(Arc<Activity>);

impl Drop for ArrivalGuard {
    fn drop(&mut self) {
        self.0.state.lock().expect("activity lock").arriving -= 1;
        self.0.changed.notify_waiters();
    }
}

async fn generate(
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
    let ready = match shared.phase.load(Ordering::SeqCst) {
        READY => shared.ready().expect("ready phase has a model"),
        DRAINING => {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new(
                    ErrorCode::PoolUnavailable,
                    "the engine is stopping and takes no new requests",
                ),
            ))
        }
        _ => {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new(
                    ErrorCode::PoolUnready,
                    format!("the engine is still loading {}", shared.model_path),
                )
                .with_retry_after_ms(RETRY_AFTER_SECS * 1000),
            ))
        }
    };
    let correlation_id = req
        .headers()
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.chars().take(128).collect::<String>());
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
    let request = parse(&body).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    request
        .validate()
        .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
    let n_slots = ready.slots.lock().expect("slot table lock").len();
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
    let (text, field) = match (&request.prompt, &request.messages) {
        (Some(p), _) => (p.clone(), "prompt"),
        (None, Some(m)) => {
            let choice = request.effective_tool_choice();
            if choice == ToolChoice::Auto && !ready.model.template_takes_tools() {
                return Err((
                    StatusCode::BAD_REQUEST,
                    ErrorBody::invalid(
                        "tool_choice",
                        "this model's chat template does not take tools, so the model cannot choose between answering and calling one: use tool_choice \"required\" or a named function (the call is then enforced by a grammar), or \"none\"",
                    ),
                ));
            }
            let text = ready
                .model
                .render_chat(m, &request.tools, &choice, request.parallel_tool_calls)
                .map_err(|e| (StatusCode::BAD_REQUEST, e))?;
            (text, "messages")
        }
        (None, None) => unreachable!("validate() requires one of them"),
    };
    let grammar = grammar_of(&request, &ready.model)?;
    let prompt = ready.model.tokenize(&text);
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
    let reservation = ready
        .slots
        .lock()
        .expect("slot table lock")
        .reserve(&prompt, request.slot.map(|s| s as usize));
    let Some(reservation) = reservation else {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(
                ErrorCode::PoolUnavailable,
                format!("all {n_slots} slots of this engine are busy; retry later"),
            )
            .with_retry_after_ms(RETRY_AFTER_SECS * 1000),
        ));
    };
    let max_tokens = request.max_tokens.unwrap_or(defaults::MAX_TOKENS);
    // Every event of a job fits: at most one token event per generated token (bounded by the
    // slot context), one flush of held-back text and one final event. So the decode loop's
    // `try_send` never finds the channel full, and a slow client cannot stall other slots.
    let n = request.n.unwrap_or(1);
    let capacity = (max_tokens.min(ready.ctx_per_slot) as usize + 1) * n as usize + 1;
    let (tx, rx) = mpsc::channel(capacity);
    let sampling = Sampling {
        temperature: request.temperature.unwrap_or(defaults::TEMPERATURE),
        top_p: request.top_p.unwrap_or(defaults::TOP_P),
        top_k: request.top_k.unwrap_or(defaults::TOP_K),
        min_p: request.min_p.unwrap_or(defaults::MIN_P),
        repeat_penalty: request.repeat_penalty.unwrap_or(defaults::REPEAT_PENALTY),
        typical_p: request.typical_p.unwrap_or(defaults::TYPICAL_P),
        repeat_last_n: match request.repeat_last_n.unwrap_or(defaults::REPEAT_LAST_N) {
            -1 => ready.ctx_per_slot as i32,
            n => n.min(ready.ctx_per_slot as i32),
        },
        presence_penalty: request.presence_penalty.unwrap_or(0.0),
        frequency_penalty: request.frequency_penalty.unwrap_or(0.0),
        seed: request.seed.unwrap_or_else(random_seed),
        logprobs: request.logprobs,
    };
    let job = Job {
        slot: reservation.slot,
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
    if ready
        .commands
        .try_send(Command::Run(Box::new(job)))
        .is_err()
    {
        // The decode loop is gone (stopping) or, impossibly, its queue is longer than the
        // slot count. Give the slot back.
        ready
            .slots
            .lock()
            .expect("slot table lock")
            .release(reservation.slot, Vec::new());
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorBody::new(ErrorCode::PoolUnavailable, "the decode loop is not running"),
        ));
    }
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .header("x-llorch-slot", reservation.slot)
        .body(Either::Right(SseBody {
            rx,
            _activity: activity,
        }))
        .expect("static response");
    Ok(resp)
}

/// The request's grammar in GBNF: its `grammar`, or its `json_schema` converted by llama.cpp.
/// Parsed here once, so a grammar that does not parse is the request's 400, not a stream error.
fn grammar_of(request: &GenerateRequest, model: &Model) -> Result<Option<String>, Refusal> {
    let choice = request.effective_tool_choice();
    let forced = choice
        .forced()
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
            (gbnf, field)
        }
        (None, Some(g)) => (g.clone(), "grammar"),
        (None, None) => return Ok(None),
    };
    crate::sampler::grammar(&model.llama, &gbnf).map_err(|e| {
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

/// Parses the body, naming the field at fault for type errors and unknown fields.
fn parse(body: &[u8]) -> Result<GenerateRequest, ErrorBody> {
    llorch_wire::json::parse(body)
}

/// A seed for a request that gave none. Every `RandomState` gets fresh random keys, so the
/// hash of nothing under it is a random number without a new dependency.
fn random_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u32
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<ResponseBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Either::Left(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("bodies serialize"),
        ))))
        .expect("static response")
}

fn error(status: StatusCode, body: ErrorBody) -> Response<ResponseBody> {
    let retry = body.retry_after_ms;
    let mut resp = json(status, &body);
    if let Some(ms) = retry {
        resp.headers_mut()
            .insert("retry-after", ms.div_ceil(1000).max(1).into());
    }
    resp
}

/// The SSE body of one generation. It ends when the decode loop drops the sender after the
/// final event; dropping it (the client went away) closes the channel, which the decode loop
/// notices before its next step and cancels the job.
pub struct SseBody {
    rx: mpsc::Receiver<EngineEvent>,
    _activity: ActivityGuard,
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(ev)) => {
                // Coalesce what is already waiting into one write.
                let mut out = ev.to_sse();
                while let Ok(more) = self.rx.try_recv() {
                    out.push_str(&more.to_sse());
                }
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
