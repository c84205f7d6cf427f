//! Encoding Anthropic answers: the error envelope, the content blocks of a finished answer
//! (its text, or the `tool_use` blocks read from it), `stop_reason` and `usage`, and the whole
//! `message` object.

use axum::http::StatusCode;
use llorch_wire::engine::FinishReason;
use llorch_wire::task::TaskEnd;
use llorch_wire::tools::{ToolCall, ToolChoice};
use llorch_wire::ErrorBody;
use serde_json::{json, Value};

/// What shapes one request's answer, whole or streamed.
pub(super) struct Shape {
    /// `msg_…`
    pub(super) id: String,
    pub(super) model: String,
    /// With tools in play the whole answer is read before it is known to be calls or text.
    pub(super) tools: ToolChoice,
    pub(super) max_tokens: u32,
}

/// Anthropic's `{"type": "error", "error": {"type", "message"}}`. The message names the field
/// at fault when there is one.
pub fn error_envelope(status: StatusCode, body: &ErrorBody) -> Vec<u8> {
    serde_json::to_vec(&error_json(status, body)).expect("serializes")
}

pub(super) fn error_json(status: StatusCode, body: &ErrorBody) -> Value {
    let kind = match status.as_u16() {
        400 | 409 | 415 | 421 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        502..=504 => "overloaded_error",
        _ => "api_error",
    };
    let message = crate::api::error::message_naming_field(body);
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// A tool call's id as Anthropic spells them (`toolu_…`).
fn tool_use_id(call: &ToolCall) -> String {
    match call.id.strip_prefix("call_") {
        Some(rest) => format!("toolu_{rest}"),
        None => call.id.clone(),
    }
}

/// A `tool_use` block: the call's arguments as the `input` object.
pub(super) fn tool_use_block(call: &ToolCall) -> Value {
    json!({"type": "tool_use", "id": tool_use_id(call), "name": call.function.name,
        "input": call.arguments_object()})
}

/// Why the answer ended, as Anthropic says it: a call is `tool_use`; a stop string is
/// `stop_sequence` (named in `stop_sequence`); a cut answer is `max_tokens` when it used them
/// all and `model_context_window_exceeded` when the slot's context filled first.
pub(super) fn stop_reason(shape: &Shape, calls: &[ToolCall], end: &TaskEnd) -> &'static str {
    match end.finish_reason {
        _ if !calls.is_empty() => "tool_use",
        FinishReason::Stop if end.stop_sequence.is_some() => "stop_sequence",
        FinishReason::Stop => "end_turn",
        FinishReason::Length if end.tokens_out < shape.max_tokens => {
            "model_context_window_exceeded"
        }
        FinishReason::Length => "max_tokens",
    }
}

/// Anthropic counts cache reads apart from `input_tokens` (their sum is the prompt).
pub(super) fn usage(end: &TaskEnd) -> Value {
    json!({
        "input_tokens": end.tokens_in.saturating_sub(end.cached_tokens),
        "output_tokens": end.tokens_out,
        "cache_read_input_tokens": end.cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}

/// The content blocks of a finished answer: its text (when there is any, or when there is
/// nothing else), then its calls.
pub(super) fn content(text: String, calls: &[ToolCall]) -> Vec<Value> {
    let mut blocks = Vec::with_capacity(calls.len() + 1);
    if !text.is_empty() || calls.is_empty() {
        blocks.push(json!({"type": "text", "text": text}));
    }
    blocks.extend(calls.iter().map(tool_use_block));
    blocks
}

/// The whole `message` of a finished task.
pub(super) fn message(shape: &Shape, text: String, end: &TaskEnd) -> Value {
    let (calls, text) = crate::api::openai::read_calls(&shape.tools, end.finish_reason, text);
    json!({
        "id": shape.id,
        "type": "message",
        "role": "assistant",
        "model": shape.model,
        "content": content(text, &calls),
        "stop_reason": stop_reason(shape, &calls, end),
        "stop_sequence": end.stop_sequence,
        "usage": usage(end),
    })
}
