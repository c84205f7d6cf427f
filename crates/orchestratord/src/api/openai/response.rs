//! Encoding OpenAI answers that are not streamed: the error envelope, a whole
//! `chat.completion` / `text_completion`, and what both kinds of answer share (the choices'
//! text and tool calls read from the task's tokens, log-probabilities in OpenAI's shapes,
//! usage).

use axum::http::StatusCode;
use llorch_wire::engine::{FinishReason, TokenEvent, TokenLogprob};
use llorch_wire::task::TaskEnd;
use llorch_wire::tools::{ToolCall, ToolChoice};
use llorch_wire::{ErrorBody, ErrorCode};
use serde_json::{json, Value};

/// Which endpoint an answer is for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Chat,
    Completion,
}

/// What shapes one request's answer, whole or streamed: the endpoint, the answer's id, time
/// and model, and what the request asked for.
pub(super) struct Shape {
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    /// Choices (`n`).
    pub(super) n: u32,
    pub(super) with_logprobs: bool,
    /// With tools in play the whole answer is read before it is known to be calls or text.
    pub(super) tools: ToolChoice,
}

/// OpenAI's `{"error": {message, type, param, code}}`.
pub fn error_envelope(status: StatusCode, body: &ErrorBody) -> Vec<u8> {
    serde_json::to_vec(&json!({ "error": error_object(status, body) })).expect("serializes")
}

pub(super) fn error_object(status: StatusCode, body: &ErrorBody) -> Value {
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
pub(super) const SYSTEM_FINGERPRINT: &str = concat!("fp_llorch_", env!("CARGO_PKG_VERSION"));

pub(super) fn usage(end: &TaskEnd) -> Value {
    json!({
        "prompt_tokens": end.tokens_in,
        "completion_tokens": end.tokens_out,
        "total_tokens": end.tokens_in + end.tokens_out,
        "prompt_tokens_details": {"cached_tokens": end.cached_tokens},
    })
}

/// A choice's `logprobs`: OpenAI's chat shape (`content`, `refusal`), or the legacy shape of
/// completions (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`). `offset` is where the
/// text of these tokens starts in the whole answer. `null` when not asked for.
pub(super) fn logprobs_json(kind: Kind, lp: Option<&[TokenLogprob]>, offset: usize) -> Value {
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
pub(super) struct Answer {
    pub(super) text: String,
    pub(super) lp: Vec<TokenLogprob>,
}

impl Answer {
    pub(super) fn add(&mut self, t: TokenEvent) {
        self.text.push_str(&t.t);
        self.lp.extend(t.lp);
    }
}

/// The choice a token event belongs to (the engine numbers them below `n`).
pub(super) fn choice_of(t: &TokenEvent, n: u32) -> usize {
    t.c.min(n.saturating_sub(1)) as usize
}

/// How choice `i` ended: its own reason with `n` > 1, the task's otherwise.
pub(super) fn choice_reason(end: &TaskEnd, i: usize) -> FinishReason {
    end.choices
        .get(i)
        .map_or(end.finish_reason, |c| c.finish_reason)
}

/// The tool calls of a finished answer, and its text outside them. Only an answer that ended
/// by itself is read for calls: one cut by `max_tokens` is text, with `finish_reason: length`.
pub(crate) fn read_calls(
    tools: &ToolChoice,
    reason: FinishReason,
    text: String,
) -> (Vec<ToolCall>, String) {
    if reason != FinishReason::Stop {
        return (Vec::new(), text);
    }
    match tools {
        ToolChoice::None => (Vec::new(), text),
        // A template's own tags (`<tool_call>…</tool_call>`), else what a model without tool
        // support writes for a call (a whole call object, or its history's sentence).
        ToolChoice::Auto => match llorch_wire::tools::parse_tagged(&text) {
            (calls, rest) if !calls.is_empty() => (calls, rest),
            (_, text) => match llorch_wire::tools::parse_auto(&text) {
                Some(calls) => (calls, String::new()),
                None => (Vec::new(), text),
            },
        },
        ToolChoice::Required | ToolChoice::Function(_) => {
            match llorch_wire::tools::parse_forced(&text) {
                Some(calls) => (calls, String::new()),
                None => (Vec::new(), text),
            }
        }
    }
}

pub(super) fn finish_reason(calls: &[ToolCall], reason: FinishReason) -> &'static str {
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
/// The whole answer of a finished task: each choice's text or tool calls, and the usage.
pub(super) fn whole_answer(shape: &Shape, answers: Vec<Answer>, end: &TaskEnd) -> Value {
    let choices: Vec<Value> = answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let reason = choice_reason(end, i);
            let (calls, text) = read_calls(&shape.tools, reason, a.text);
            let lp = shape.with_logprobs.then_some(a.lp.as_slice());
            whole_choice(shape.kind, i, text, &calls, lp, reason)
        })
        .collect();
    whole(
        shape.kind,
        &shape.id,
        shape.created,
        &shape.model,
        choices,
        end,
    )
}
