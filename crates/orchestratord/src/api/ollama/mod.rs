//! Ollama's API on the same listener: `/api/chat` and `/api/generate` (NDJSON streams by
//! default, one object with `stream: false`), `/api/tags`, `/api/ps`, `/api/show` and
//! `/api/version`, `/api/embed` and `/api/embeddings`, with Ollama's field names and `{"error": "..."}`. Chat and generate become
//! the same engine request as `/v1`, and go through the same admission (`interactive`),
//! placement, metrics (`api="ollama"`), journal record and cancellation on disconnect. With API
//! keys configured every route needs one, as on `/v1` (the Ollama client sends it as
//! `headers={"Authorization": "Bearer …"}`).
//!
//! - this file: the routes' handlers and the NDJSON stream;
//! - [`request`]: the bodies, `options`, `format`, the engine request they become;
//! - [`embed`](mod@embed): `/api/embed` and `/api/embeddings`;
//! - [`response`]: the answer objects, the listings, the error envelope.

mod embed;
mod request;
mod response;

use std::time::Instant;

use axum::body::Body;
use axum::extract::State as Ext;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use llorch_wire::engine::GenerateRequest;
use llorch_wire::tools::ToolChoice;
use llorch_wire::{ErrorBody, ErrorCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::interactive::{admit, read_to_end, CancelOnDrop};
use super::{
    authenticate, client_json, parse, read_body, sse, ApiError, AppState, CorrelationId,
    HttpRefusal, Meter,
};
use crate::outcome::Api;
use crate::tasks::{Follower, TaskEvent};
pub use embed::{embed, embeddings};
use request::{Answerable, ChatRequest, Common, GenerateBody};
pub use response::error_envelope;
use response::Shape;

type Result<T> = std::result::Result<T, ApiError>;

fn oll<T>(r: std::result::Result<T, impl Into<HttpRefusal>>) -> Result<T> {
    r.map_err(ApiError::ollama)
}

fn bad(e: ErrorBody) -> ApiError {
    ApiError::ollama((StatusCode::BAD_REQUEST, e))
}

/// `GET /api/version`: llama-orch's own version (docs/API.md).
pub async fn version() -> Json<Value> {
    Json(json!({"version": env!("CARGO_PKG_VERSION")}))
}

/// `GET /api/tags`.
pub async fn tags(Ext(state): Ext<AppState>, headers: HeaderMap) -> Result<Json<Value>> {
    oll(authenticate(&state, &headers))?;
    Ok(Json(response::tags(state.models())))
}

/// `GET /api/ps`.
pub async fn ps(Ext(state): Ext<AppState>, headers: HeaderMap) -> Result<Json<Value>> {
    oll(authenticate(&state, &headers))?;
    Ok(Json(response::ps(&state.pool_views())))
}

/// `POST /api/show`: 404 for a model no pool serves.
pub async fn show(
    Ext(state): Ext<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>> {
    oll(authenticate(&state, &headers))?;
    let bytes = oll(read_body(&state, body).await)?;
    let v: Value = oll(parse(&bytes))?;
    let Some(model) = v
        .get("model")
        .or_else(|| v.get("name"))
        .and_then(Value::as_str)
    else {
        return Err(bad(ErrorBody::invalid("model", "model is required")));
    };
    known(&state, model)?;
    Ok(Json(response::show(&state.pool_views(), model)))
}

/// A model some registered pool serves, or Ollama's 404.
fn known(state: &AppState, model: &str) -> Result<()> {
    if state.models().iter().any(|m| m == model) {
        return Ok(());
    }
    Err(ApiError::ollama(not_found(model)))
}

/// Ollama's words for a model no pool serves, which its clients look for.
fn not_found(model: &str) -> HttpRefusal {
    (
        StatusCode::NOT_FOUND,
        ErrorBody::new(
            ErrorCode::ModelNotFound,
            format!("model '{model}' not found"),
        ),
    )
}

/// `POST /api/chat`.
pub async fn chat(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer::<ChatRequest>(state, cid, headers, body).await
}

/// `POST /api/generate`.
pub async fn generate(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer::<GenerateBody>(state, cid, headers, body).await
}

/// Chat and generate: authenticates and decodes the body, answers a load request at once,
/// and otherwise runs the engine request.
async fn answer<T: Answerable>(
    state: AppState,
    cid: CorrelationId,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let received = Instant::now();
    Meter::run(Api::Ollama, &state, async |meter| {
        let (client, value) = oll(client_json(&state, &headers, body).await)?;
        let (common, req) = request::decode::<T>(&value).map_err(bad)?;
        meter.model(req.model());
        let shape = Shape {
            kind: T::KIND,
            model: req.model().to_string(),
            received,
            tools: ToolChoice::None,
        };
        if req.is_load() {
            // No task: the model is checked here (a task's admission checks it otherwise).
            known(&state, &shape.model)?;
            return Ok(Json(response::load_line(&shape)).into_response());
        }
        let engine = req
            .into_engine(&common, state.config.default_max_tokens)
            .map_err(bad)?;
        run(&state, cid, client, engine, &common, shape, meter).await
    })
    .await
}

/// A refusal in Ollama's envelope; the admission's refusal of an unknown model in Ollama's
/// words.
fn refusal(model: &str, e: HttpRefusal) -> ApiError {
    if e.1.code == ErrorCode::ModelNotFound {
        ApiError::ollama(not_found(model))
    } else {
        ApiError::ollama(e)
    }
}

/// Validates and admits the engine request; answers whole or as an NDJSON stream.
async fn run(
    state: &AppState,
    cid: CorrelationId,
    client: String,
    engine: GenerateRequest,
    common: &Common,
    mut shape: Shape,
    meter: &Meter,
) -> Result<Response> {
    engine.validate().map_err(bad)?;
    shape.tools = engine.effective_tool_choice();
    let admitted = admit(state, cid, client, shape.model.clone(), engine, meter)
        .map_err(|e| refusal(&shape.model, e))?;
    let (mut follower, guard) = (admitted.follower, admitted.guard);
    if !common.streams() {
        let (text, end) = oll(read_to_end(&mut follower).await)?;
        drop(guard);
        let (calls, text) = crate::api::openai::read_calls(&shape.tools, end.finish_reason, text);
        return Ok(Json(response::done_line(&shape, &text, &calls, &end)).into_response());
    }
    // Wait for the start, so a refusal is still an HTTP error; NDJSON has no comment lines
    // for keep-alives, so a long wait (a queue, a model loading) commits to the stream and
    // sends nothing until the first text, as Ollama does while it loads a model.
    let keep_alive = state.config.sse_keepalive;
    let first = oll(super::interactive::first_events(&mut follower, keep_alive).await)?;
    let (tx, resp) = sse::channel_of("application/x-ndjson");
    tokio::spawn(pump(tx, follower, guard, shape, first));
    Ok(resp)
}

fn line(out: &mut Vec<u8>, v: &Value) {
    serde_json::to_writer(&mut *out, v).expect("values serialize");
    out.push(b'\n');
}

/// Sends a task's answer as NDJSON lines on `tx` until its final event, or until the client
/// goes away (the channel closes; `_guard` then cancels the task).
async fn pump(
    tx: mpsc::Sender<Bytes>,
    mut follower: Follower,
    _guard: CancelOnDrop,
    shape: Shape,
    first: Option<Vec<TaskEvent>>,
) {
    let buffered = shape.tools != ToolChoice::None;
    let mut held = String::new();
    let mut pending = first;
    loop {
        let events = match pending.take() {
            Some(e) => e,
            None => {
                let batch = tokio::select! {
                    b = follower.next_batch() => b,
                    _ = tx.closed() => return,
                };
                match batch {
                    Some(e) => e,
                    None => return,
                }
            }
        };
        let mut out = Vec::new();
        let mut text = String::new();
        let mut done = false;
        for e in events {
            match e {
                TaskEvent::Token(t) if buffered => held.push_str(&t.t),
                TaskEvent::Token(t) => text.push_str(&t.t),
                TaskEvent::End(end) => {
                    if !text.is_empty() {
                        line(
                            &mut out,
                            &response::text_line(&shape, &std::mem::take(&mut text)),
                        );
                    }
                    let (calls, rest) = crate::api::openai::read_calls(
                        &shape.tools,
                        end.finish_reason,
                        std::mem::take(&mut held),
                    );
                    line(&mut out, &response::done_line(&shape, &rest, &calls, &end));
                    done = true;
                }
                TaskEvent::Error(body) => {
                    line(&mut out, &response::error_json(&body));
                    done = true;
                }
                _ => {}
            }
        }
        if !text.is_empty() {
            line(&mut out, &response::text_line(&shape, &text));
        }
        if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
            return;
        }
        if done {
            return;
        }
    }
}
