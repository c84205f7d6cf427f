//! The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, streaming
//! (`chat.completion.chunk` / `text_completion` events ending in `data: [DONE]`) and not, with
//! OpenAI's error envelope. Requests go through the same queue as native tasks, at
//! `interactive` priority. A client that disconnects cancels its task, which frees the slot.
//!
//! Parameters the engine cannot honour (`n` > 1, tools, logprobs, penalties, logit_bias,
//! non-text response formats) get a 400 that names the parameter; unknown parameters too.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State as Ext;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use llorch_wire::engine::{ChatMessage, GenerateRequest};
use llorch_wire::task::{Priority, TaskEnd};
use llorch_wire::{ErrorBody, ErrorCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{authenticate, parse, read_body, sse, status_for, ApiError, AppState, CorrelationId};
use crate::state::{Refusal, State, Submission};
use crate::tasks::{Follower, Task, TaskEvent};

type Result<T> = std::result::Result<T, ApiError>;

fn oai<T>(r: std::result::Result<T, Refusal>) -> Result<T> {
    r.map_err(ApiError::openai)
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::openai((StatusCode::BAD_REQUEST, ErrorBody::invalid(param, message)))
}

/// OpenAI's `{"error": {message, type, param, code}}`.
pub fn error_envelope(status: StatusCode, body: &ErrorBody) -> Vec<u8> {
    serde_json::to_vec(&json!({ "error": error_object(status, body) })).expect("serializes")
}

fn error_object(status: StatusCode, body: &ErrorBody) -> Value {
    let kind = match status.as_u16() {
        400 | 404 | 409 | 413 => "invalid_request_error",
        401 | 403 => "authentication_error",
        429 => "rate_limit_error",
        _ => "server_error",
    };
    let code = match body.code {
        ErrorCode::Unauthorized => "invalid_api_key".to_string(),
        c => c.as_str().to_ascii_lowercase(),
    };
    json!({
        "message": body.message,
        "type": kind,
        "param": body.field,
        "code": code,
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `GET /v1/models`.
pub async fn models(Ext(state): Ext<AppState>, headers: HeaderMap) -> Result<Json<Value>> {
    oai(authenticate(&state, &headers))?;
    let created = unix_now();
    let models = state.core().registry.models();
    let data: Vec<Value> = models
        .into_iter()
        .map(
            |id| json!({"id": id, "object": "model", "created": created, "owned_by": "llama-orch"}),
        )
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

/// Sampling and control fields shared by both endpoints, with the ones we refuse. Decoded from
/// the same body as the endpoint's own fields (a second pass rather than `#[serde(flatten)]`,
/// which would lose the field path in type errors).
#[derive(Debug, Default, Deserialize)]
struct Common {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    functions: Option<Vec<Value>>,
    #[serde(default)]
    function_call: Option<Value>,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    service_tier: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Stop,
    #[serde(default)]
    logprobs: Option<u32>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    best_of: Option<u32>,
}

const COMMON_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "functions",
    "function_call",
    "logprobs",
    "top_logprobs",
    "response_format",
    "store",
    "metadata",
    "service_tier",
];
const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo", "suffix", "best_of"];

/// Refuses parameters this server does not know, naming the first one. (serde cannot deny
/// unknown fields of a struct with a flattened part, so this is checked on the raw object.)
fn known_fields(bytes: &[u8], extra: &[&str]) -> Result<()> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(bytes) else {
        // Not an object: the typed parse names the problem.
        return Ok(());
    };
    for key in map.keys() {
        if !COMMON_FIELDS.contains(&key.as_str()) && !extra.contains(&key.as_str()) {
            return Err(bad(
                key,
                format!("unrecognized request argument supplied: {key}"),
            ));
        }
    }
    Ok(())
}

impl Common {
    fn check(&self) -> Result<()> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(bad(
                "n",
                "n must be 1: this server returns one choice per request",
            ));
        }
        if self.presence_penalty.is_some_and(|p| p != 0.0) {
            return Err(bad(
                "presence_penalty",
                "presence_penalty is not supported; leave it out or set 0",
            ));
        }
        if self.frequency_penalty.is_some_and(|p| p != 0.0) {
            return Err(bad(
                "frequency_penalty",
                "frequency_penalty is not supported; leave it out or set 0",
            ));
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(bad("logit_bias", "logit_bias is not supported"));
        }
        if self.user.as_ref().is_some_and(|u| u.len() > 256) {
            return Err(bad("user", "user must be at most 256 characters"));
        }
        Ok(())
    }

    /// The engine request for `base` (a prompt or messages) with these sampling fields.
    fn engine_request(&self, base: GenerateRequest, max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            max_tokens: Some(max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            // OpenAI seeds are 64-bit; the engine's are 32-bit: the low half keeps determinism.
            seed: self.seed.map(|s| s as u32),
            stop: self.stop(),
            ..base
        }
    }

    fn stop(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }

    fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }
}

fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" => "system".to_string(),
            "system" | "user" | "assistant" => m.role,
            other => {
                return Err(bad(
                    &format!("messages[{i}].role"),
                    format!(
                        "role {other:?} is not supported; use system, developer, user or assistant"
                    ),
                ))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(bad(
                                &format!("messages[{i}].content[{j}].type"),
                                format!(
                                "content part type {kind:?} is not supported; only text parts are"
                            ),
                            ))
                        }
                    }
                }
                text
            }
        };
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// Authenticates and decodes a request: the client's name, the shared fields (checked) and the
/// endpoint's own.
async fn decode<T: serde::de::DeserializeOwned>(
    state: &State,
    headers: &HeaderMap,
    body: Body,
    fields: &[&str],
) -> Result<(String, Common, T)> {
    let client = oai(authenticate(state, headers))?;
    let bytes = oai(read_body(state, body).await)?;
    known_fields(&bytes, fields)?;
    let common: Common = oai(parse(&bytes))?;
    let own: T = oai(parse(&bytes))?;
    common.check()?;
    Ok((client, common, own))
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let (client, common, req) = decode::<ChatRequest>(&state, &headers, body, CHAT_FIELDS).await?;
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) || req.functions.is_some() {
        return Err(bad(
            "tools",
            "tools and functions are not supported by this server",
        ));
    }
    if req
        .tool_choice
        .as_ref()
        .is_some_and(|c| c != &Value::String("none".into()) && c != &Value::String("auto".into()))
        || req.function_call.is_some()
    {
        return Err(bad(
            "tool_choice",
            "tool_choice is not supported by this server",
        ));
    }
    let _ = (
        req.parallel_tool_calls,
        req.store,
        &req.metadata,
        &req.service_tier,
    );
    if req.logprobs == Some(true) || req.top_logprobs.is_some() {
        return Err(bad("logprobs", "logprobs are not supported by this server"));
    }
    if let Some(rf) = &req.response_format {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(bad(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    let max_tokens = req.max_completion_tokens.or(common.max_tokens);
    let engine = common.engine_request(
        GenerateRequest::chat(chat_messages(req.messages)?),
        max_tokens.unwrap_or(state.config.default_max_tokens),
    );
    let kind = Kind::Chat;
    run(state, cid, client, req.model, engine, &common, kind).await
}

/// `POST /v1/completions`.
pub async fn completions(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let (client, common, req) =
        decode::<CompletionRequest>(&state, &headers, body, COMPLETION_FIELDS).await?;
    if req.logprobs.is_some_and(|l| l > 0) {
        return Err(bad("logprobs", "logprobs are not supported by this server"));
    }
    if req.echo == Some(true) {
        return Err(bad("echo", "echo is not supported by this server"));
    }
    if req.suffix.is_some() {
        return Err(bad("suffix", "suffix is not supported by this server"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(bad("best_of", "best_of must be 1"));
    }
    let prompt = match req.prompt {
        Stop::One(p) => p,
        Stop::Many(mut v) if v.len() == 1 => v.remove(0),
        Stop::Many(_) => {
            return Err(bad(
                "prompt",
                "prompt must be one string (batches are not supported)",
            ))
        }
    };
    let engine = common.engine_request(
        GenerateRequest::prompt(prompt),
        common.max_tokens.unwrap_or(state.config.default_max_tokens),
    );
    run(
        state,
        cid,
        client,
        req.model,
        engine,
        &common,
        Kind::Completion,
    )
    .await
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

/// Cancels the task when the request (or its stream) is dropped before the task ended: the
/// client went away.
struct CancelOnDrop {
    state: Arc<State>,
    task: Arc<Task>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.state.cancel(&self.task, "the client went away") {
            tracing::debug!(task = %self.task.id, "Client went away; task cancelled.");
        }
    }
}

async fn run(
    state: AppState,
    cid: CorrelationId,
    client: String,
    model: String,
    engine: GenerateRequest,
    common: &Common,
    kind: Kind,
) -> Result<Response> {
    oai(engine.validate().map_err(|e| (StatusCode::BAD_REQUEST, e)))?;
    let (task, _) = oai(state.submit(Submission {
        task_id: None,
        model: model.clone(),
        request: engine,
        priority: Priority::Interactive,
        deadline_ms: None,
        session_id: None,
        hints: None,
        client,
        correlation_id: cid.0,
        ctx: None,
    }))?;
    let guard = CancelOnDrop {
        state: state.clone(),
        task: task.clone(),
    };
    let mut follower = Follower::new(task.clone());
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}", &task.id[5..]),
        Kind::Completion => format!("cmpl-{}", &task.id[5..]),
    };
    let created = unix_now();
    if common.stream != Some(true) {
        let mut text = String::new();
        while let Some(events) = follower.next_batch().await {
            for e in events {
                match e {
                    TaskEvent::Token(t) => text.push_str(&t.t),
                    TaskEvent::End(end) => {
                        drop(guard);
                        return Ok(
                            Json(whole(kind, &id, created, &model, text, &end)).into_response()
                        );
                    }
                    TaskEvent::Error(body) => {
                        return Err(ApiError::openai((status_for(body.code), body)));
                    }
                    _ => {}
                }
            }
        }
        return Err(ApiError::openai((
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorBody::new(ErrorCode::Internal, "the task ended without a result"),
        )));
    }
    // Streaming: wait for the task to start, so a refusal is still an HTTP error.
    let first = follower.next_batch().await.unwrap_or_default();
    if let Some(TaskEvent::Error(body)) = first.iter().find(|e| e.is_final()) {
        return Err(ApiError::openai((status_for(body.code), body.clone())));
    }
    let (tx, resp) = sse::channel();
    let include_usage = common.include_usage();
    tokio::spawn(async move {
        let _guard = guard;
        let chunks = Chunks {
            kind,
            id,
            created,
            model,
            include_usage,
        };
        if kind_is_chat(kind)
            && tx
                .send(chunks.frame(json!({"role": "assistant", "content": ""}), None))
                .await
                .is_err()
        {
            return;
        }
        let mut pending = Some(first);
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
            let mut done = false;
            for e in events {
                match e {
                    TaskEvent::Token(t) => out.extend_from_slice(&chunks.text(&t.t)),
                    TaskEvent::End(end) => {
                        out.extend_from_slice(&chunks.finish(&end));
                        done = true;
                    }
                    TaskEvent::Error(body) => {
                        let status = status_for(body.code);
                        let err = json!({"error": error_object(status, &body)});
                        out.extend_from_slice(
                            format!("data: {err}\n\ndata: [DONE]\n\n").as_bytes(),
                        );
                        done = true;
                    }
                    _ => {}
                }
            }
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return;
            }
            if done {
                return;
            }
        }
    });
    Ok(resp)
}

fn kind_is_chat(kind: Kind) -> bool {
    matches!(kind, Kind::Chat)
}

fn usage(end: &TaskEnd) -> Value {
    json!({
        "prompt_tokens": end.tokens_in,
        "completion_tokens": end.tokens_out,
        "total_tokens": end.tokens_in + end.tokens_out,
    })
}

fn whole(kind: Kind, id: &str, created: u64, model: &str, text: String, end: &TaskEnd) -> Value {
    let finish = end.finish_reason.as_str();
    match kind {
        Kind::Chat => json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish,
            }],
            "usage": usage(end),
            "system_fingerprint": null,
        }),
        Kind::Completion => json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            "usage": usage(end),
            "system_fingerprint": null,
        }),
    }
}

struct Chunks {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl Chunks {
    fn envelope(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut v = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn frame(&self, delta: Value, finish: Option<&str>) -> Bytes {
        let choice = match self.kind {
            Kind::Chat => {
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => json!({
                "index": 0,
                "text": delta.get("content").cloned().unwrap_or(Value::String(String::new())),
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        self.envelope(json!([choice]), None)
    }

    fn text(&self, t: &str) -> Bytes {
        self.frame(json!({"content": t}), None)
    }

    fn finish(&self, end: &TaskEnd) -> Vec<u8> {
        let mut out = self
            .frame(json!({}), Some(end.finish_reason.as_str()))
            .to_vec();
        if self.include_usage {
            out.extend_from_slice(&self.envelope(json!([]), Some(usage(end))));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_name_the_parameter() {
        let body = br#"{"model":"m","messages":[],"temperature":"hot"}"#;
        let err = parse::<Common>(body).unwrap_err();
        assert_eq!(err.1.field.as_deref(), Some("temperature"), "{:?}", err.1);
    }
}
