//! The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`, streaming
//! (`chat.completion.chunk` / `text_completion` events ending in `data: [DONE]`) and not, with
//! OpenAI's error envelope. Requests go through the same queue as native tasks, at
//! `interactive` priority. A client that disconnects cancels its task, which frees the slot.
//!
//! Structured output (`response_format` `json_object` and `json_schema`), tools, `logprobs` and
//! `n` are passed to the engine, which enforces schemas and forced calls with a grammar, renders
//! tools with the model's template and reports log-probabilities; a finished answer's tool calls
//! are read here. Parameters the engine cannot honour (`logit_bias`, `echo`, `suffix`,
//! `best_of`, the deprecated `functions`) get a 400 that names the parameter; unknown
//! parameters too.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State as Ext;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use llorch_wire::engine::FinishReason;
use llorch_wire::engine::{limits, ChatMessage, GenerateRequest, TokenEvent, TokenLogprob};
use llorch_wire::task::{Priority, TaskEnd};
use llorch_wire::tools::{Tool, ToolCall, ToolChoice};
use llorch_wire::{ErrorBody, ErrorCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    authenticate, parse, read_body, sse, status_for, ApiError, AppState, CorrelationId, Meter,
};
use crate::metrics::Api;
use crate::state::{Refusal, State, Submission};
use crate::tasks::{Follower, Task, TaskEvent};

type Result<T> = std::result::Result<T, ApiError>;

fn oai<T>(r: std::result::Result<T, Refusal>) -> Result<T> {
    r.map_err(ApiError::openai)
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::openai((StatusCode::BAD_REQUEST, ErrorBody::invalid(param, message)))
}

fn bad_body(e: ErrorBody) -> ApiError {
    ApiError::openai((StatusCode::BAD_REQUEST, e))
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

/// OpenAI's `system_fingerprint` names the backend configuration that produced an answer; ours
/// is the server's version (OpenAI's schema wants a string, and clients log it).
const SYSTEM_FINGERPRINT: &str = concat!("fp_llorch_", env!("CARGO_PKG_VERSION"));

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
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    refusal: Option<String>,
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
    // The sampler extensions clients of llama.cpp's server, Ollama and vLLM send.
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    typical_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    /// vLLM's and Hugging Face's name of `repeat_penalty`.
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    repeat_last_n: Option<i32>,
    #[serde(default)]
    ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<ToolChoice>,
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
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repetition_penalty",
    "repeat_last_n",
    "ignore_eos",
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
fn known_fields(body: &Value, extra: &[&str]) -> Result<()> {
    let Value::Object(map) = body else {
        return Err(bad("body", "the request body must be a JSON object"));
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
        if let (Some(a), Some(b)) = (self.repeat_penalty, self.repetition_penalty) {
            if a != b {
                return Err(bad(
                    "repetition_penalty",
                    format!("repetition_penalty ({b}) is another name of repeat_penalty ({a}); give one of them"),
                ));
            }
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
            top_k: self.top_k,
            min_p: self.min_p,
            typical_p: self.typical_p,
            repeat_penalty: self.repeat_penalty.or(self.repetition_penalty),
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            // OpenAI seeds are 64-bit; the engine's are 32-bit: the low half keeps determinism.
            seed: self.seed.map(|s| s as u32),
            stop: self.stop(),
            n: self.n,
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

/// Chat's `logprobs` (a flag) and `top_logprobs` (alternatives) as the engine's `logprobs`.
fn chat_logprobs(logprobs: Option<bool>, top: Option<u32>) -> Result<Option<u32>> {
    if let Some(n) = top {
        if logprobs != Some(true) {
            return Err(bad(
                "logprobs",
                "logprobs must be true when top_logprobs is given",
            ));
        }
        if n > limits::MAX_TOP_LOGPROBS {
            return Err(bad(
                "top_logprobs",
                format!(
                    "top_logprobs is {n}; it must be between 0 and {}",
                    limits::MAX_TOP_LOGPROBS
                ),
            ));
        }
    }
    Ok((logprobs == Some(true)).then(|| top.unwrap_or(0)))
}

/// `response_format` as the engine's JSON Schema and strictness: `text` is none, `json_object`
/// is any object, `json_schema` is the given schema, checked here so the error names OpenAI's
/// parameter and the place in the schema.
fn response_format(rf: &Value) -> Result<(Option<Value>, bool)> {
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok((None, false)),
        Some("json_object") => Ok((Some(json!({"type": "object"})), false)),
        Some("json_schema") => {
            let Some(js) = rf.get("json_schema").filter(|v| v.is_object()) else {
                return Err(bad(
                    "response_format.json_schema",
                    "response_format of type json_schema needs a json_schema object with a name and a schema",
                ));
            };
            let name_ok = js.get("name").and_then(Value::as_str).is_some_and(|n| {
                !n.is_empty()
                    && n.len() <= 64
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
            if !name_ok {
                return Err(bad(
                    "response_format.json_schema.name",
                    "response_format.json_schema.name is required: 1 to 64 letters, digits, underscores or dashes",
                ));
            }
            let strict = match js.get("strict") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(bad(
                        "response_format.json_schema.strict",
                        "response_format.json_schema.strict must be true or false",
                    ))
                }
            };
            let schema = match js.get("schema") {
                None => json!({"type": "object"}),
                Some(s) => s.clone(),
            };
            llorch_wire::schema::check(&schema, strict).map_err(|e| {
                bad(
                    "response_format.json_schema.schema",
                    format!("response_format.json_schema.schema cannot be enforced {e}"),
                )
            })?;
            Ok((Some(schema), strict))
        }
        _ => Err(bad(
            "response_format.type",
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>> {
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "developer" => "system".to_string(),
            "system" | "user" | "assistant" | "tool" => m.role,
            other => {
                return Err(bad(
                    &format!("messages[{i}].role"),
                    format!(
                        "role {other:?} is not supported; use system, developer, user, assistant or tool"
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
        out.push(ChatMessage {
            role,
            content,
            tool_calls: m.tool_calls.unwrap_or_default(),
            tool_call_id: m.tool_call_id,
        });
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
    // Parsed once; the shared fields and the endpoint's own are decoded from the same value.
    let value: Value = oai(parse(&bytes))?;
    known_fields(&value, fields)?;
    let common: Common = llorch_wire::json::from_value(&value).map_err(bad_body)?;
    let own: T = llorch_wire::json::from_value(&value).map_err(bad_body)?;
    common.check()?;
    Ok((client, common, own))
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let meter = Meter::new(Api::OpenAiChat);
    let result = chat_request(state.clone(), cid, headers, body, &meter).await;
    meter.count(&state, result)
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
    if req.functions.is_some() || req.function_call.is_some() {
        let param = if req.functions.is_some() {
            "functions"
        } else {
            "function_call"
        };
        return Err(bad(
            param,
            format!("{param} is OpenAI's deprecated form of tools; send tools and tool_choice"),
        ));
    }
    let _ = (req.store, &req.metadata, &req.service_tier);
    let logprobs = chat_logprobs(req.logprobs, req.top_logprobs)?;
    let (json_schema, json_schema_strict) = match &req.response_format {
        Some(rf) => response_format(rf)?,
        None => (None, false),
    };
    let max_tokens = req.max_completion_tokens.or(common.max_tokens);
    let engine = GenerateRequest {
        logprobs,
        json_schema,
        json_schema_strict,
        tools: req.tools.unwrap_or_default(),
        tool_choice: req.tool_choice,
        // OpenAI's default is true; a forced call is one call unless the client asks for more.
        parallel_tool_calls: req.parallel_tool_calls == Some(true),
        ..common.engine_request(
            GenerateRequest::chat(chat_messages(req.messages)?),
            max_tokens.unwrap_or(state.config.default_max_tokens),
        )
    };
    run(state, cid, client, req.model, engine, &common, meter).await
}

/// `POST /v1/completions`.
pub async fn completions(
    Ext(state): Ext<AppState>,
    Extension(cid): Extension<CorrelationId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let meter = Meter::new(Api::OpenAiCompletions);
    let result = completion_request(state.clone(), cid, headers, body, &meter).await;
    meter.count(&state, result)
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
    if let Some(n) = req.logprobs.filter(|n| *n > limits::MAX_TOP_LOGPROBS) {
        return Err(bad(
            "logprobs",
            format!(
                "logprobs is {n}; at most {} alternatives per token are returned",
                limits::MAX_TOP_LOGPROBS
            ),
        ));
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
    let engine = GenerateRequest {
        logprobs: req.logprobs,
        ..common.engine_request(
            GenerateRequest::prompt(prompt),
            common.max_tokens.unwrap_or(state.config.default_max_tokens),
        )
    };
    run(state, cid, client, req.model, engine, &common, meter).await
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
        if self
            .state
            .cancel(&self.task, crate::metrics::CancelReason::Disconnect)
        {
            tracing::debug!(task_id = %self.task.id, "Client went away; task cancelled.");
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
    meter: &Meter,
) -> Result<Response> {
    let kind = match meter.api {
        Api::OpenAiCompletions => Kind::Completion,
        _ => Kind::Chat,
    };
    oai(engine.validate().map_err(|e| (StatusCode::BAD_REQUEST, e)))?;
    let with_logprobs = engine.logprobs.is_some();
    // With tools in play the whole answer is read before it is known to be calls or text.
    let tools = engine.effective_tool_choice();
    let n = engine.n.unwrap_or(1);
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
        api: meter.api,
    }))?;
    meter.admitted();
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
        let mut answers: Vec<Answer> = (0..n).map(|_| Answer::default()).collect();
        while let Some(events) = follower.next_batch().await {
            for e in events {
                match e {
                    TaskEvent::Token(t) => answers[choice_of(&t, n)].add(t),
                    TaskEvent::End(end) => {
                        drop(guard);
                        let choices: Vec<Value> = answers
                            .into_iter()
                            .enumerate()
                            .map(|(i, a)| {
                                let reason = choice_reason(&end, i);
                                let (calls, text) = read_calls(&tools, reason, a.text);
                                let lp = with_logprobs.then_some(a.lp.as_slice());
                                whole_choice(kind, i, text, &calls, lp, reason)
                            })
                            .collect();
                        let answer = whole(kind, &id, created, &model, choices, &end);
                        return Ok(Json(answer).into_response());
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
    // Streaming: wait for the task to start, so a refusal is still an HTTP error. A start that
    // takes longer than the keep-alive interval (`--sse-keepalive-secs`: a long queue, a model
    // loading on demand) commits to the stream instead, and keep-alive comments flow until the
    // first text; a failure after that is an error chunk.
    let keep_alive = state.config.sse_keepalive;
    let first = match tokio::time::timeout(keep_alive, follower.next_batch()).await {
        Ok(batch) => {
            let first = batch.unwrap_or_default();
            if let Some(TaskEvent::Error(body)) = first.iter().find(|e| e.is_final()) {
                return Err(ApiError::openai((status_for(body.code), body.clone())));
            }
            Some(first)
        }
        Err(_) => None,
    };
    let (tx, resp) = sse::channel();
    let include_usage = common.include_usage();
    let buffered = tools != ToolChoice::None;
    tokio::spawn(async move {
        let _guard = guard;
        let mut chunks = Chunks::new(kind, &id, created, &model, n, include_usage);
        // The role chunk goes out with the first batch of text, in one write.
        let mut out = Vec::new();
        chunks.role(&mut out);
        let mut pending = first;
        let mut idle = sse::keep_alive_timer(keep_alive);
        let mut held: Vec<Answer> = (0..n).map(|_| Answer::default()).collect();
        loop {
            let events = match pending.take() {
                Some(e) => e,
                None => {
                    let batch = tokio::select! {
                        b = follower.next_batch() => b,
                        _ = idle.tick() => {
                            if tx.send(Bytes::from_static(sse::KEEP_ALIVE_COMMENT)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        _ = tx.closed() => return,
                    };
                    idle.reset();
                    match batch {
                        Some(e) => e,
                        None => return,
                    }
                }
            };
            let mut done = false;
            for e in events {
                match e {
                    TaskEvent::Token(t) if buffered => held[choice_of(&t, n)].add(t),
                    TaskEvent::Token(t) => {
                        let lp = with_logprobs.then_some(t.lp.as_slice());
                        chunks.text(&mut out, choice_of(&t, n), &t.t, lp)
                    }
                    TaskEvent::End(end) => {
                        let mut reasons = Vec::with_capacity(held.len());
                        for (i, a) in std::mem::take(&mut held).into_iter().enumerate() {
                            let reason = choice_reason(&end, i);
                            let (calls, text) = read_calls(&tools, reason, a.text);
                            if !text.is_empty() {
                                let lp = with_logprobs.then_some(a.lp.as_slice());
                                chunks.text(&mut out, i, &text, lp);
                            }
                            for (j, call) in calls.iter().enumerate() {
                                chunks.tool_call(&mut out, i, j, call);
                            }
                            reasons.push(finish_reason(&calls, reason));
                        }
                        chunks.finish(&mut out, &reasons, &end);
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
            if !out.is_empty()
                && tx
                    .send(Bytes::from(std::mem::take(&mut out)))
                    .await
                    .is_err()
            {
                return;
            }
            if done {
                return;
            }
        }
    });
    Ok(resp)
}

fn usage(end: &TaskEnd) -> Value {
    json!({
        "prompt_tokens": end.tokens_in,
        "completion_tokens": end.tokens_out,
        "total_tokens": end.tokens_in + end.tokens_out,
    })
}

/// A choice's `logprobs`: OpenAI's chat shape (`content`, `refusal`), or the legacy shape of
/// completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`). `offset` is where the
/// text of these tokens starts in the whole answer. `null` when not asked for.
fn logprobs_json(kind: Kind, lp: Option<&[TokenLogprob]>, offset: usize) -> Value {
    let Some(lp) = lp else { return Value::Null };
    match kind {
        Kind::Chat => json!({"content": lp, "refusal": null}),
        Kind::Completion => {
            let mut at = offset;
            let mut offsets = Vec::with_capacity(lp.len());
            for t in lp {
                offsets.push(at);
                at += t.token.len();
            }
            let top: Vec<Value> = lp
                .iter()
                .map(|t| {
                    let map: serde_json::Map<String, Value> = t
                        .top_logprobs
                        .iter()
                        .map(|a| (a.token.clone(), json!(a.logprob)))
                        .collect();
                    Value::Object(map)
                })
                .collect();
            json!({
                "tokens": lp.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
                "token_logprobs": lp.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

/// One choice's text and log-probabilities, gathered from its token events.
#[derive(Default)]
struct Answer {
    text: String,
    lp: Vec<TokenLogprob>,
}

impl Answer {
    fn add(&mut self, t: TokenEvent) {
        self.text.push_str(&t.t);
        self.lp.extend(t.lp);
    }
}

/// The choice a token event belongs to (the engine numbers them below `n`).
fn choice_of(t: &TokenEvent, n: u32) -> usize {
    t.c.min(n.saturating_sub(1)) as usize
}

/// How choice `i` ended: its own reason with `n` > 1, the task's otherwise.
fn choice_reason(end: &TaskEnd, i: usize) -> FinishReason {
    end.choices
        .get(i)
        .map_or(end.finish_reason, |c| c.finish_reason)
}

/// The tool calls of a finished answer, and its text outside them. Only an answer that ended
/// by itself is read for calls: one cut by `max_tokens` is text, with `finish_reason: length`.
fn read_calls(tools: &ToolChoice, reason: FinishReason, text: String) -> (Vec<ToolCall>, String) {
    if reason != FinishReason::Stop {
        return (Vec::new(), text);
    }
    match tools {
        ToolChoice::None => (Vec::new(), text),
        ToolChoice::Auto => llorch_wire::tools::parse_tagged(&text),
        ToolChoice::Required | ToolChoice::Function(_) => {
            match llorch_wire::tools::parse_forced(&text) {
                Some(calls) => (calls, String::new()),
                None => (Vec::new(), text),
            }
        }
    }
}

fn finish_reason(calls: &[ToolCall], reason: FinishReason) -> &'static str {
    if calls.is_empty() {
        reason.as_str()
    } else {
        "tool_calls"
    }
}

/// One choice of a whole (not streamed) answer.
fn whole_choice(
    kind: Kind,
    index: usize,
    text: String,
    calls: &[ToolCall],
    lp: Option<&[TokenLogprob]>,
    reason: FinishReason,
) -> Value {
    let finish = finish_reason(calls, reason);
    let logprobs = logprobs_json(kind, lp, 0);
    match kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": text, "refusal": null});
            if !calls.is_empty() {
                message["tool_calls"] = json!(calls);
                if text.is_empty() {
                    message["content"] = Value::Null;
                }
            }
            json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        }
    }
}

fn whole(
    kind: Kind,
    id: &str,
    created: u64,
    model: &str,
    choices: Vec<Value>,
    end: &TaskEnd,
) -> Value {
    let object = match kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    json!({
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(end),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    })
}

/// Encodes stream chunks. Everything but the text is the same in every chunk of a response, so
/// it is encoded once; a token chunk is then three copies and one JSON string escape.
struct Chunks {
    kind: Kind,
    /// `data: {"id":…,"object":…,"created":…,"model":…,"system_fingerprint":…,"choices":[`
    head: String,
    /// `],"usage":null}\n\n` with `include_usage`, else `]}\n\n`.
    tail: &'static str,
    include_usage: bool,
    /// Bytes of text sent so far per choice (completions' `text_offset`).
    sent: Vec<usize>,
}

impl Chunks {
    fn new(kind: Kind, id: &str, created: u64, model: &str, n: u32, include_usage: bool) -> Self {
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let head = format!(
            r#"data: {{"id":{},"object":"{object}","created":{created},"model":{},"system_fingerprint":"{SYSTEM_FINGERPRINT}","choices":["#,
            Value::String(id.into()),
            Value::String(model.into()),
        );
        Self {
            kind,
            head,
            tail: if include_usage {
                "],\"usage\":null}\n\n"
            } else {
                "]}\n\n"
            },
            include_usage,
            sent: vec![0; n as usize],
        }
    }

    /// One chunk whose choice is `choice` (JSON text).
    fn chunk(&self, out: &mut Vec<u8>, choice: &str) {
        out.extend_from_slice(self.head.as_bytes());
        out.extend_from_slice(choice.as_bytes());
        out.extend_from_slice(self.tail.as_bytes());
    }

    /// The first chunk of each choice of a chat stream: the assistant's role.
    fn role(&self, out: &mut Vec<u8>) {
        if matches!(self.kind, Kind::Chat) {
            for index in 0..self.sent.len() {
                self.chunk(
                    out,
                    &format!(r#"{{"index":{index},"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}"#),
                );
            }
        }
    }

    /// A chunk of choice `index`'s text, with the log-probabilities of its tokens when they
    /// were asked for.
    fn text(&mut self, out: &mut Vec<u8>, index: usize, t: &str, lp: Option<&[TokenLogprob]>) {
        out.extend_from_slice(self.head.as_bytes());
        out.extend_from_slice(format!(r#"{{"index":{index},"#).as_bytes());
        out.extend_from_slice(match self.kind {
            Kind::Chat => br#""delta":{"content":"#.as_slice(),
            Kind::Completion => br#""text":"#.as_slice(),
        });
        serde_json::to_writer(&mut *out, t).expect("strings serialize");
        out.extend_from_slice(match self.kind {
            Kind::Chat => br#"},"logprobs":"#.as_slice(),
            Kind::Completion => br#","logprobs":"#.as_slice(),
        });
        let sent = self.sent.get(index).copied().unwrap_or(0);
        match lp {
            None => out.extend_from_slice(b"null"),
            Some(lp) => serde_json::to_writer(&mut *out, &logprobs_json(self.kind, Some(lp), sent))
                .expect("values serialize"),
        }
        out.extend_from_slice(br#","finish_reason":null}"#);
        out.extend_from_slice(self.tail.as_bytes());
        if let Some(s) = self.sent.get_mut(index) {
            *s += t.len();
        }
    }

    /// A tool call as OpenAI streams one: a delta with its index, id, type and name (and empty
    /// arguments), then a delta with the arguments.
    fn tool_call(&self, out: &mut Vec<u8>, choice: usize, index: usize, call: &ToolCall) {
        let head = json!({"index": choice, "delta": {"tool_calls": [{
            "index": index, "id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": ""},
        }]}, "logprobs": null, "finish_reason": null});
        self.chunk(out, &head.to_string());
        let args = json!({"index": choice, "delta": {"tool_calls": [{
            "index": index, "function": {"arguments": call.function.arguments},
        }]}, "logprobs": null, "finish_reason": null});
        self.chunk(out, &args.to_string());
    }

    /// Each choice's last chunk (its `finish_reason`), the usage chunk, `[DONE]`.
    fn finish(&self, out: &mut Vec<u8>, reasons: &[&str], end: &TaskEnd) {
        for (index, reason) in reasons.iter().enumerate() {
            let choice = match self.kind {
                Kind::Chat => format!(
                    r#"{{"index":{index},"delta":{{}},"logprobs":null,"finish_reason":"{reason}"}}"#
                ),
                Kind::Completion => format!(
                    r#"{{"index":{index},"text":"","logprobs":null,"finish_reason":"{reason}"}}"#
                ),
            };
            self.chunk(out, &choice);
        }
        if self.include_usage {
            out.extend_from_slice(self.head.as_bytes());
            out.extend_from_slice(format!("],\"usage\":{}}}\n\n", usage(end)).as_bytes());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_chunks_are_openai_json() {
        let end = TaskEnd {
            task_id: "t".into(),
            tokens_in: 3,
            tokens_out: 2,
            queue_ms: 0,
            ttft_ms: 1,
            decode_time_ms: 1,
            finish_reason: llorch_wire::engine::FinishReason::Length,
            choices: Vec::new(),
        };
        let mut c = Chunks::new(Kind::Chat, "chatcmpl-1", 7, "m\"x", 1, true);
        let mut out = Vec::new();
        c.role(&mut out);
        c.text(&mut out, 0, "a \"quoted\"\nline", None);
        c.finish(&mut out, &["length"], &end);
        let text = String::from_utf8(out).unwrap();
        let data: Vec<&str> = text
            .split("\n\n")
            .filter(|l| !l.is_empty())
            .map(|l| l.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"));
        let v: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(v.len(), 4);
        assert!(v.iter().all(|c| c["object"] == "chat.completion.chunk"
            && c["model"] == "m\"x"
            && c["id"] == "chatcmpl-1"
            && c["created"] == 7));
        assert_eq!(v[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(v[1]["choices"][0]["delta"]["content"], "a \"quoted\"\nline");
        assert!(v[1]["usage"].is_null() && v[1]["choices"][0]["finish_reason"].is_null());
        assert_eq!(v[2]["choices"][0]["finish_reason"], "length");
        assert_eq!(v[3]["choices"].as_array().unwrap().len(), 0);
        assert_eq!(v[3]["usage"]["total_tokens"], 5);

        let mut c = Chunks::new(Kind::Completion, "cmpl-1", 7, "m", 1, false);
        let mut out = Vec::new();
        c.role(&mut out);
        c.text(&mut out, 0, "x", None);
        let v: Value = serde_json::from_str(
            std::str::from_utf8(&out)
                .unwrap()
                .trim()
                .strip_prefix("data: ")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "x");
        assert!(v.get("usage").is_none());
    }

    #[test]
    fn type_errors_name_the_parameter() {
        let body = br#"{"model":"m","messages":[],"temperature":"hot"}"#;
        let err = parse::<Common>(body).unwrap_err();
        assert_eq!(err.1.field.as_deref(), Some("temperature"), "{:?}", err.1);
    }
}
