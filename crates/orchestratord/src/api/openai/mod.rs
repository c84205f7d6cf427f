//! The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
//! `/v1/embeddings`, streaming
//! (`chat.completion.chunk` / `text_completion` events ending in `data: [DONE]`) and not, with
//! OpenAI's error envelope. Requests go through the same queue as native tasks, at
//! `interactive` priority. A client that disconnects cancels its task, which frees the slot.
//!
//! Structured output (`response_format` `json_object` and `json_schema`), tools, `logprobs` and
//! `n` are passed to the engine, which enforces schemas and forced calls with a grammar, renders
//! tools with the model's template and reports log-probabilities; a finished answer's tool calls
//! are read here. Parameters the engine cannot honour (`logit_bias`, `echo`, `suffix`,
//! `best_of`, the deprecated `functions`) get a 400 that names the parameter; unknown
//! parameters too.//!
//! - this file: the routes' handlers, from the request to the task and back;
//! - [`request`]: the request bodies, their validation, the engine request they become;
//! - [`run`](mod@run): admitting the task and reading its events (cancelled when the client goes away);
//! - [`response`]: encoding whole answers and OpenAI's error envelope;
//! - [`stream`]: encoding chunks of a streamed answer;
//! - [`embeddings`](mod@embeddings): `/v1/embeddings`.

mod embeddings;
mod request;
mod response;
mod run;
mod stream;

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State as Ext;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use llorch_wire::ErrorBody;
use serde_json::{json, Value};

use super::{authenticate, ApiError, AppState, CorrelationId, HttpRefusal, Meter};
use crate::outcome::Api;
pub use embeddings::embeddings;
pub(crate) use request::response_format;
use request::{decode, ChatRequest, CompletionRequest, CHAT_FIELDS, COMPLETION_FIELDS};
pub use response::error_envelope;
pub(crate) use response::read_calls;
use run::run;

type Result<T> = std::result::Result<T, ApiError>;

fn oai<T>(r: std::result::Result<T, impl Into<HttpRefusal>>) -> Result<T> {
    r.map_err(ApiError::openai)
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::openai((StatusCode::BAD_REQUEST, ErrorBody::invalid(param, message)))
}

fn bad_body(e: ErrorBody) -> ApiError {
    ApiError::openai((StatusCode::BAD_REQUEST, e))
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `GET /v1/models`.
pub async fn models(Ext(state): Ext<AppState>, headers: HeaderMap) -> Result<Json<Value>> {
    oai(authenticate(&state, &headers))?;
    let created = unix_now();
    let models = state.models();
    let data: Vec<Value> = models
        .into_iter()
        .map(
            |id| json!({"id": id, "object": "model", "created": created, "owned_by": "llama-orch"}),
        )
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}
/// `POST /v1/chat/completions`.
pub async fn chat(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Meter::run(Api::OpenAiChat, &state.clone(), async |m| {
        chat_request(state, cid, headers, body, m).await
    })
    .await
}

async fn chat_request(
    state: AppState,
    cid: CorrelationId,
    headers: HeaderMap,
    body: Body,
    meter: &Meter,
) -> Result<Response> {
    let (client, common, req) = decode::<ChatRequest>(&state, &headers, body, CHAT_FIELDS).await?;
    meter.model(&req.model);
    let (model, engine) = req.into_engine(&common, state.config.default_max_tokens)?;
    run(state, cid, client, model, engine, &common, meter).await
}

/// `POST /v1/completions`.
pub async fn completions(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Meter::run(Api::OpenAiCompletions, &state.clone(), async |m| {
        completion_request(state, cid, headers, body, m).await
    })
    .await
}

async fn completion_request(
    state: AppState,
    cid: CorrelationId,
    headers: HeaderMap,
    body: Body,
    meter: &Meter,
) -> Result<Response> {
    let (client, common, req) =
        decode::<CompletionRequest>(&state, &headers, body, COMPLETION_FIELDS).await?;
    meter.model(&req.model);
    let (model, engine) = req.into_engine(&common, state.config.default_max_tokens)?;
    run(state, cid, client, model, engine, &common, meter).await
}
