//! The engine's HTTP/1.1 API on its Unix socket: `GET /health`, `GET /slots`,
//! `POST /generate` (an SSE stream). Requests are admitted here: parsed, validated, rendered,
//! tokenized, given a slot, and handed to the decode loop. The engine never queues: when every
//! slot is busy it answers 503 with `Retry-After` and the caller (pool-managerd, orchestratord)
//! decides what to do. A generation request that arrives while the model loads (the first
//! request of a socket-activated engine) waits for the load.
//!
//! By job:
//! - this file: [`Shared`] (the engine's phase and, once loaded, what handlers need), routing
//!   in [`handle`], and the plain JSON answers (`/health`, `/slots`, `/metrics`, errors);
//! - `server.rs`: the accept loop, connections, graceful shutdown and the idle exit;
//! - `idle.rs`: [`Activity`], the count of generation requests in progress: the idle clock of
//!   on-demand pools;
//! - `admit.rs`: `POST /generate` up to a job for the decode loop (body, validation, chat
//!   rendering, grammar, tokenizing, slot reservation);
//! - `stream.rs`: [`SseBody`], the job's events written as SSE.
//!
//! It does not run generation (that is `decode/`) nor choose slots (`slots.rs`).

mod admit;
mod idle;
mod server;
mod stream;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use llorch_wire::engine::{Health, HealthState};
use llorch_wire::{ErrorBody, ErrorCode};
use tokio::sync::Notify;

use crate::decode::Command;
use crate::model::{Model, Progress};
use crate::slots::SlotTable;

pub use admit::MAX_BODY_BYTES;
pub use idle::{Activity, ActivityGuard, ArrivalGuard};
pub use server::Server;
pub use stream::SseBody;

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
    /// Embeddings, when the pool serves them.
    pub embedder: Option<Arc<crate::embed::Embedder>>,
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
            .map(|r| llorch_os::sync::lock(&r.slots).busy())
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
                &llorch_os::sync::lock(&r.slots).status(),
            ),
            None => unready(&shared),
        },
        (&Method::GET, "/metrics") => {
            let slots = shared.ready().map(|r| {
                let t = llorch_os::sync::lock(&r.slots);
                (t.busy(), t.len())
            });
            Response::builder()
                .header("content-type", llorch_metrics::CONTENT_TYPE)
                .body(Either::Left(Full::new(Bytes::from(
                    shared.metrics.encode(slots),
                ))))
                .expect("static response")
        }
        (&Method::POST, "/generate") => {
            match admit::generate(&shared, req, received, arrival).await {
                Ok(resp) => resp,
                Err((status, body)) => error(status, body),
            }
        }
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

/// Why a request was refused: its status and error body.
type Refusal = (StatusCode, ErrorBody);

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
