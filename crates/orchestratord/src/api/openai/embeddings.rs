//! `POST /v1/embeddings`: OpenAI's request (`input` as a string, strings, token ids or lists
//! of them; `encoding_format` `float` or `base64`; `dimensions` only as the model's own) and
//! its `list` of `embedding` objects with `usage`. The vectors come from the pool's engine
//! (a pool with `embeddings = true`), through the same admission and placement as every
//! request.

use axum::body::Body;
use axum::extract::State as Ext;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad, bad_body, oai, Result};
use crate::api::interactive::{embed, embed_inputs};
use crate::api::{client_json, AppState, CorrelationId, Meter};
use crate::outcome::Api;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u32>,
    /// Accepted: the key names the client.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// A vector as OpenAI's `base64`: its float32 values, little-endian, base64-encoded.
fn base64_of(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    Meter::run(Api::OpenAiEmbeddings, &state.clone(), async |m| {
        embeddings_request(state, cid, headers, body, m).await
    })
    .await
}

async fn embeddings_request(
    state: AppState,
    cid: CorrelationId,
    headers: HeaderMap,
    body: Body,
    meter: &Meter,
) -> Result<Response> {
    let (client, value) = oai(client_json(&state, &headers, body).await)?;
    let req: EmbeddingsRequest = llorch_wire::json::from_value(&value).map_err(bad_body)?;
    meter.model(&req.model);
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(bad(
                "encoding_format",
                format!("encoding_format is {other:?}; it must be float or base64"),
            ))
        }
    };
    if req.dimensions == Some(0) {
        return Err(bad("dimensions", "dimensions must be at least 1"));
    }
    let inputs = embed_inputs(&req.input).map_err(bad_body)?;
    let end = oai(embed(
        &state,
        cid,
        client,
        req.model.clone(),
        (inputs, false),
        meter,
    )
    .await)?;
    let width = end.embeddings.first().map_or(0, Vec::len);
    if let Some(d) = req.dimensions.filter(|d| *d as usize != width) {
        return Err(bad(
            "dimensions",
            format!("dimensions is {d}; this model's embeddings have {width} dimensions, and shortening them is not supported (leave dimensions out)"),
        ));
    }
    let data: Vec<Value> = end
        .embeddings
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                json!(base64_of(v))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": end.tokens_in, "total_tokens": end.tokens_in},
    }))
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_float32() {
        let b = base64_of(&[1.0, -0.5]);
        let bytes = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
        assert_eq!(bytes, [0, 0, 128, 63, 0, 0, 0, 191]);
    }
}
