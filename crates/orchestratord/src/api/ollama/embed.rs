//! `POST /api/embed` (`input` a string or strings; `truncate`, default true, cuts an input to
//! the pool's context) and the older `POST /api/embeddings` (`prompt`, one vector). The
//! vectors come from the pool's engine (a pool with `embeddings = true`), through the same
//! admission and placement as every request, metered as `api="ollama"`.

use std::time::Instant;

use axum::body::Body;
use axum::extract::State as Ext;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use llorch_wire::ErrorBody;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad, oll, refusal};
use crate::api::interactive::{embed as run, embed_inputs};
use crate::api::{client_json, AppState, CorrelationId, Meter};
use crate::outcome::Api;

/// The body of `/api/embed`, and of `/api/embeddings` (`prompt` in place of `input`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedBody {
    model: String,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    dimensions: Option<u32>,
    /// Accepted: Ollama's loader options have no counterpart for an embedding (docs/API.md).
    #[serde(default)]
    #[allow(dead_code)]
    options: Option<Value>,
    /// Accepted: a pool keeps its node's keep-alive (docs/API.md).
    #[serde(default)]
    #[allow(dead_code)]
    keep_alive: Option<Value>,
}

/// `POST /api/embed`.
pub async fn embed(
    state: Ext<AppState>,
    cid: Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    embedding(state, cid, headers, body, false).await
}

/// `POST /api/embeddings`: Ollama's older endpoint.
pub async fn embeddings(
    state: Ext<AppState>,
    cid: Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    embedding(state, cid, headers, body, true).await
}

async fn embedding(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
    legacy: bool,
) -> Response {
    Meter::run(Api::Ollama, &state, async |meter| {
        let started = Instant::now();
        let (client, value) = oll(client_json(&state, &headers, body).await)?;
        let req: EmbedBody = llorch_wire::json::from_value(&value).map_err(bad)?;
        meter.model(&req.model);
        let (field, given) = match legacy {
            false => ("input", req.input.clone()),
            true => ("prompt", req.prompt.clone().map(Value::String)),
        };
        let other = if legacy { req.input.is_some() } else { req.prompt.is_some() };
        let Some(input) = given.filter(|_| !other) else {
            return Err(bad(ErrorBody::invalid(
                field,
                format!("{field} is required (this endpoint takes {field}, not the other)"),
            )));
        };
        let inputs = embed_inputs(&input).map_err(bad)?;
        let model = req.model.clone();
        let inputs = (inputs, req.truncate != Some(false));
        let end = run(&state, cid, client, model.clone(), inputs, meter)
            .await
            .map_err(|e| refusal(&model, e))?;
        let width = end.embeddings.first().map_or(0, Vec::len);
        if let Some(d) = req.dimensions.filter(|d| *d as usize != width) {
            return Err(bad(ErrorBody::invalid(
                "dimensions",
                format!("dimensions is {d}; this model's embeddings have {width} dimensions, and shortening them is not supported"),
            )));
        }
        if legacy {
            let first = end.embeddings.into_iter().next().unwrap_or_default();
            return Ok(Json(json!({"embedding": first})).into_response());
        }
        Ok(Json(json!({
            "model": model,
            "embeddings": end.embeddings,
            "total_duration": started.elapsed().as_nanos() as u64,
            "load_duration": 0,
            "prompt_eval_count": end.tokens_in,
        }))
        .into_response())
    })
    .await
}
