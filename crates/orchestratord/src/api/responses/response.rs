//! Encoding Responses answers: the `response` object (whole, and as the streamed events carry
//! it), its output items (a `message` with `output_text`, `function_call` items read from the
//! answer), `status` and `incomplete_details`, and `usage`.

use llorch_wire::engine::{ChatMessage, FinishReason};
use llorch_wire::task::TaskEnd;
use llorch_wire::tools::{ToolCall, ToolChoice};
use serde_json::{json, Map, Value};

/// What shapes one request's answer, whole or streamed.
pub(super) struct Shape {
    /// `resp_…`
    pub(super) id: String,
    pub(super) created_at: u64,
    pub(super) model: String,
    /// With tools in play the whole answer is read before it is known to be calls or text.
    pub(super) tools: ToolChoice,
    /// The request's parameters as the response object echoes them.
    pub(super) echo: Map<String, Value>,
}

impl Shape {
    /// The id of the answer's message item.
    pub(super) fn message_id(&self) -> String {
        format!("msg_{}", &self.id[5..])
    }

    /// The response object in `status`, with what is known so far.
    pub(super) fn response(
        &self,
        status: &str,
        output: Vec<Value>,
        end: Option<&TaskEnd>,
    ) -> Value {
        let mut r = self.echo.clone();
        let incomplete = status == "incomplete";
        let fields = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": end.map(|_| crate::api::openai::unix_now()),
            "error": null,
            "incomplete_details": if incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "model": self.model,
            "output": output,
            "reasoning": {"effort": null, "summary": null},
            "service_tier": "default",
        });
        if let Value::Object(f) = fields {
            r.extend(f);
        }
        // Usage is known at the end (OpenAI's schema has no null for it).
        if let Some(end) = end {
            r.insert("usage".into(), usage(end));
        }
        Value::Object(r)
    }
}

/// Responses' usage: the prompt (with the part read from the prefix cache), the answer.
pub(super) fn usage(end: &TaskEnd) -> Value {
    json!({
        "input_tokens": end.tokens_in,
        "input_tokens_details": {"cached_tokens": end.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": end.tokens_out,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": end.tokens_in + end.tokens_out,
    })
}

/// `completed`, or `incomplete` when the answer was cut (by `max_output_tokens` or the slot's
/// context).
pub(super) fn status(end: &TaskEnd) -> &'static str {
    match end.finish_reason {
        FinishReason::Length => "incomplete",
        FinishReason::Stop => "completed",
    }
}

/// A `message` output item holding `text`.
pub(super) fn message_item(id: &str, status: &str, text: &str) -> Value {
    json!({
        "id": id, "type": "message", "status": status, "role": "assistant",
        "content": if status == "in_progress" { json!([]) } else { json!([text_part(text)]) },
    })
}

pub(super) fn text_part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// A `function_call` output item.
pub(super) fn call_item(shape: &Shape, i: usize, call: &ToolCall, status: &str) -> Value {
    json!({
        "id": format!("fc_{}_{i}", &shape.id[5..]),
        "type": "function_call",
        "status": status,
        "call_id": call.id,
        "name": call.function.name,
        "arguments": if status == "in_progress" { "" } else { call.function.arguments.as_str() },
    })
}

/// A finished answer: its output items, and the assistant message it adds to the
/// conversation.
pub(super) struct Answer {
    pub(super) text: String,
    pub(super) calls: Vec<ToolCall>,
    pub(super) status: &'static str,
}

impl Answer {
    pub(super) fn read(shape: &Shape, text: String, end: &TaskEnd) -> Self {
        let (calls, text) = crate::api::openai::read_calls(&shape.tools, end.finish_reason, text);
        Self {
            text,
            calls,
            status: status(end),
        }
    }

    /// The message item (when there is text, or nothing else), then the calls.
    pub(super) fn items(&self, shape: &Shape) -> Vec<Value> {
        let mut items = Vec::with_capacity(self.calls.len() + 1);
        if !self.text.is_empty() || self.calls.is_empty() {
            items.push(message_item(&shape.message_id(), self.status, &self.text));
        }
        items.extend(
            self.calls
                .iter()
                .enumerate()
                .map(|(i, c)| call_item(shape, i, c, "completed")),
        );
        items
    }

    /// The assistant's turn, as the next turn's history holds it.
    pub(super) fn message(&self) -> ChatMessage {
        ChatMessage {
            role: "assistant".into(),
            content: self.text.clone(),
            tool_calls: self.calls.clone(),
            tool_call_id: None,
        }
    }
}
