//! Encoding a streamed Anthropic answer: `message_start`, `ping`, then each content block as
//! `content_block_start`, `content_block_delta` (`text_delta`, `input_json_delta`) and
//! `content_block_stop`, then `message_delta` (stop reason, usage) and `message_stop`. A task
//! that fails after the stream started ends it with an `error` event. Keep-alive comments flow
//! while the task waits.

use std::time::Duration;

use bytes::Bytes;
use llorch_wire::task::TaskEnd;
use llorch_wire::tools::ToolChoice;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::response::{content, error_json, stop_reason, usage, Shape};
use crate::api::interactive::CancelOnDrop;
use crate::api::{sse, status_for};
use crate::tasks::{Follower, TaskEvent};

fn event(out: &mut Vec<u8>, name: &str, data: &Value) {
    out.extend_from_slice(format!("event: {name}\ndata: {data}\n\n").as_bytes());
}

/// The blocks of one answer as they are sent.
struct Blocks {
    /// Blocks started so far (the next one's index).
    started: usize,
    /// Whether a text block is open (unbuffered text goes out as it comes).
    open_text: bool,
}

impl Blocks {
    fn start(&mut self, out: &mut Vec<u8>, block: Value) -> usize {
        let index = self.started;
        event(
            out,
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": block}),
        );
        self.started += 1;
        index
    }

    fn delta(out: &mut Vec<u8>, index: usize, delta: Value) {
        event(
            out,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        );
    }

    fn stop(out: &mut Vec<u8>, index: usize) {
        event(
            out,
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        );
    }

    /// Text as it is generated: the first piece opens the text block.
    fn text(&mut self, out: &mut Vec<u8>, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.open_text {
            self.start(out, json!({"type": "text", "text": ""}));
            self.open_text = true;
        }
        Self::delta(
            out,
            self.started - 1,
            json!({"type": "text_delta", "text": text}),
        );
    }

    /// The end: the open text block closes, or the held answer goes out as whole blocks (a
    /// tool call's input as one `input_json_delta`), then the stop reason and usage.
    fn finish(&mut self, out: &mut Vec<u8>, shape: &Shape, held: Option<String>, end: &TaskEnd) {
        if self.open_text {
            Self::stop(out, self.started - 1);
        }
        let mut calls = Vec::new();
        if let Some(text) = held {
            let (c, text) = crate::api::openai::read_calls(&shape.tools, end.finish_reason, text);
            calls = c;
            for block in content(text, &calls) {
                let index = match block["type"].as_str() {
                    Some("tool_use") => {
                        let input = block["input"].to_string();
                        let mut start = block;
                        start["input"] = json!({});
                        let index = self.start(out, start);
                        Self::delta(
                            out,
                            index,
                            json!({"type": "input_json_delta", "partial_json": input}),
                        );
                        index
                    }
                    _ => {
                        let text = block["text"].as_str().unwrap_or_default().to_string();
                        let index = self.start(out, json!({"type": "text", "text": ""}));
                        if !text.is_empty() {
                            Self::delta(out, index, json!({"type": "text_delta", "text": text}));
                        }
                        index
                    }
                };
                Self::stop(out, index);
            }
        } else if self.started == 0 {
            // An empty answer still has its (empty) text block, as a whole answer does.
            let index = self.start(out, json!({"type": "text", "text": ""}));
            Self::stop(out, index);
        }
        event(
            out,
            "message_delta",
            &json!({"type": "message_delta",
                "delta": {"stop_reason": stop_reason(shape, &calls, end), "stop_sequence": end.stop_sequence},
                "usage": usage(end)}),
        );
        event(out, "message_stop", &json!({"type": "message_stop"}));
    }
}

/// Sends a task's answer as events on `tx` until its final event, or until the client goes
/// away (the channel closes; `_guard` then cancels the task). `first` is a batch of events
/// already read, `None` when the stream was committed to before the task started.
pub(super) async fn pump(
    tx: mpsc::Sender<Bytes>,
    mut follower: Follower,
    _guard: CancelOnDrop,
    shape: Shape,
    keep_alive: Duration,
    first: Option<Vec<TaskEvent>>,
) {
    let buffered = shape.tools != ToolChoice::None;
    let mut out = Vec::new();
    event(
        &mut out,
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": shape.id, "type": "message", "role": "assistant", "model": shape.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }}),
    );
    event(&mut out, "ping", &json!({"type": "ping"}));
    let mut blocks = Blocks {
        started: 0,
        open_text: false,
    };
    let mut held = String::new();
    let mut batches = sse::Batches::new(first, keep_alive);
    loop {
        let Some(events) = batches.next(&mut follower, &tx).await else {
            return;
        };
        let mut done = false;
        let mut text = String::new();
        for e in events {
            match e {
                TaskEvent::Token(t) if buffered => held.push_str(&t.t),
                TaskEvent::Token(t) => text.push_str(&t.t),
                TaskEvent::End(end) => {
                    blocks.text(&mut out, &std::mem::take(&mut text));
                    let held = buffered.then(|| std::mem::take(&mut held));
                    blocks.finish(&mut out, &shape, held, &end);
                    done = true;
                }
                TaskEvent::Error(body) => {
                    blocks.text(&mut out, &std::mem::take(&mut text));
                    event(&mut out, "error", &error_json(status_for(body.code), &body));
                    done = true;
                }
                _ => {}
            }
        }
        blocks.text(&mut out, &text);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_wire::engine::FinishReason;
    use llorch_wire::tools::{FunctionCall, ToolCall};

    fn end(reason: FinishReason, out: u32) -> TaskEnd {
        TaskEnd {
            task_id: "t".into(),
            tokens_in: 10,
            cached_tokens: 4,
            tokens_out: out,
            queue_ms: 0,
            ttft_ms: 1,
            decode_time_ms: 1,
            finish_reason: reason,
            choices: Vec::new(),
            stop_sequence: None,
            embeddings: Vec::new(),
        }
    }

    fn events(bytes: &[u8]) -> Vec<(String, Value)> {
        std::str::from_utf8(bytes)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                let name = name.strip_prefix("event: ").unwrap().to_string();
                assert_eq!(
                    data["type"],
                    name.as_str(),
                    "the event name is the data's type"
                );
                (name, data)
            })
            .collect()
    }

    #[test]
    fn text_streams_in_one_block_and_ends_with_the_usage() {
        let shape = Shape {
            id: "msg_1".into(),
            model: "m".into(),
            tools: ToolChoice::None,
            max_tokens: 3,
        };
        let mut b = Blocks {
            started: 0,
            open_text: false,
        };
        let mut out = Vec::new();
        b.text(&mut out, "Hel");
        b.text(&mut out, "lo");
        b.finish(&mut out, &shape, None, &end(FinishReason::Length, 3));
        let e = events(&out);
        let names: Vec<&str> = e.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(e[2].1["delta"]["text"], "lo");
        assert_eq!(e[4].1["delta"]["stop_reason"], "max_tokens");
        assert_eq!(e[4].1["usage"]["input_tokens"], 6);
        assert_eq!(e[4].1["usage"]["cache_read_input_tokens"], 4);
        // A slot's context that fills before max_tokens is said apart.
        let mut out = Vec::new();
        let mut b = Blocks {
            started: 0,
            open_text: false,
        };
        b.finish(&mut out, &shape, None, &end(FinishReason::Length, 2));
        let e = events(&out);
        assert_eq!(e[0].1["content_block"]["type"], "text");
        assert_eq!(
            e[2].1["delta"]["stop_reason"],
            "model_context_window_exceeded"
        );
    }

    #[test]
    fn a_held_call_goes_out_as_a_tool_use_block() {
        let shape = Shape {
            id: "msg_1".into(),
            model: "m".into(),
            tools: ToolChoice::Required,
            max_tokens: 30,
        };
        let call = ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "f".into(),
                arguments: r#"{"a":1}"#.into(),
            },
        };
        let text = format!(r#"{{"name":"f","arguments":{}}}"#, call.function.arguments);
        let mut b = Blocks {
            started: 0,
            open_text: false,
        };
        let mut out = Vec::new();
        b.finish(&mut out, &shape, Some(text), &end(FinishReason::Stop, 9));
        let e = events(&out);
        assert_eq!(e[0].1["content_block"]["type"], "tool_use");
        assert_eq!(e[0].1["content_block"]["name"], "f");
        assert_eq!(e[0].1["content_block"]["input"], json!({}));
        assert_eq!(e[1].1["delta"]["type"], "input_json_delta");
        let input: Value =
            serde_json::from_str(e[1].1["delta"]["partial_json"].as_str().unwrap()).unwrap();
        assert_eq!(input, json!({"a": 1}));
        assert_eq!(e[3].1["delta"]["stop_reason"], "tool_use");
    }
}
