//! Encoding Ollama answers: `{"error": "..."}`, the objects of `/api/chat` and
//! `/api/generate` (each streamed line, and the last one with `done`, `done_reason`, counts and
//! durations in nanoseconds), and the model listings (`/api/tags`, `/api/ps`, `/api/show`).

use std::time::Instant;

use axum::http::StatusCode;
use llorch_wire::node::PoolState;
use llorch_wire::task::{PoolView, TaskEnd};
use llorch_wire::tools::ToolCall;
use llorch_wire::ErrorBody;
use serde_json::{json, Value};

/// Which endpoint an answer is for: chat lines carry a `message`, generate lines a `response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Chat,
    Generate,
}

/// What shapes one request's answer.
pub(super) struct Shape {
    pub(super) kind: Kind,
    pub(super) model: String,
    pub(super) received: Instant,
    /// With tools in play the whole answer is read before it is known to be calls or text.
    pub(super) tools: llorch_wire::tools::ToolChoice,
}

/// Ollama's `{"error": "..."}`; the message names the field at fault when there is one.
pub fn error_envelope(_status: StatusCode, body: &ErrorBody) -> Vec<u8> {
    serde_json::to_vec(&error_json(body)).expect("serializes")
}

pub(super) fn error_json(body: &ErrorBody) -> Value {
    json!({"error": crate::api::error::message_naming_field(body)})
}

pub(super) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}

/// One line of text (not the last).
pub(super) fn text_line(shape: &Shape, text: &str) -> Value {
    let mut line = json!({"model": shape.model, "created_at": now_rfc3339(), "done": false});
    match shape.kind {
        Kind::Chat => line["message"] = json!({"role": "assistant", "content": text}),
        Kind::Generate => line["response"] = json!(text),
    }
    line
}

/// A call as Ollama writes one: `{"function": {"name", "arguments": {...}}}`.
fn call_json(call: &ToolCall) -> Value {
    json!({"function": {"name": call.function.name, "arguments": call.arguments_object()}})
}

/// The last line, or the whole answer when not streamed: `text` is the answer's text when
/// whole, the empty rest when streamed; `calls` its tool calls.
pub(super) fn done_line(shape: &Shape, text: &str, calls: &[ToolCall], end: &TaskEnd) -> Value {
    let mut line = text_line(shape, text);
    if shape.kind == Kind::Chat && !calls.is_empty() {
        line["message"]["tool_calls"] = calls.iter().map(call_json).collect();
    }
    let ns = |ms: u64| ms.saturating_mul(1_000_000);
    let obj = line.as_object_mut().expect("an object");
    obj.insert("done".into(), json!(true));
    obj.insert("done_reason".into(), json!(end.finish_reason.as_str()));
    obj.insert(
        "total_duration".into(),
        json!(shape.received.elapsed().as_nanos() as u64),
    );
    obj.insert("load_duration".into(), json!(0));
    obj.insert("prompt_eval_count".into(), json!(end.tokens_in));
    obj.insert(
        "prompt_eval_duration".into(),
        json!(ns(end.ttft_ms.saturating_sub(end.queue_ms))),
    );
    obj.insert("eval_count".into(), json!(end.tokens_out));
    obj.insert("eval_duration".into(), json!(ns(end.decode_time_ms)));
    line
}

/// The answer to a request with nothing to answer (no messages, an empty prompt): Ollama
/// loads the model and says so.
pub(super) fn load_line(shape: &Shape) -> Value {
    let mut line = text_line(shape, "");
    line["done"] = json!(true);
    line["done_reason"] = json!("load");
    line
}

fn details() -> Value {
    json!({"format": "gguf", "family": "", "families": null, "parameter_size": "", "quantization_level": ""})
}

/// `/api/tags`: every model a registered pool serves.
pub(super) fn tags(models: Vec<String>) -> Value {
    let now = now_rfc3339();
    let models: Vec<Value> = models
        .into_iter()
        .map(|m| json!({"name": m, "model": m, "modified_at": now, "size": 0, "digest": "", "details": details()}))
        .collect();
    json!({"models": models})
}

/// `/api/ps`: models with a pool that holds them loaded now, with their slot context.
pub(super) fn ps(pools: &[PoolView]) -> Value {
    let mut seen = std::collections::BTreeMap::new();
    for p in pools.iter().filter(|p| p.state == PoolState::Ready) {
        seen.entry(p.model_id.clone()).or_insert(p.ctx_per_slot);
    }
    let models: Vec<Value> = seen
        .into_iter()
        .map(|(m, ctx)| {
            json!({"name": m, "model": m, "size": 0, "size_vram": 0, "digest": "",
            "details": details(), "context_length": ctx})
        })
        .collect();
    json!({"models": models})
}

/// `/api/show` of a served model.
pub(super) fn show(pools: &[PoolView], model: &str) -> Value {
    let ctx = pools
        .iter()
        .filter(|p| p.model_id == model)
        .map(|p| p.ctx_per_slot)
        .max()
        .unwrap_or(0);
    json!({
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": details(),
        "model_info": {"llama-orch.context_length_per_slot": ctx},
        "capabilities": ["completion", "tools"],
        "modified_at": now_rfc3339(),
    })
}
