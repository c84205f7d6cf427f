//! Encoding a streamed Responses answer, as OpenAI documents the sequence:
//! `response.created`, `response.in_progress`; for text `response.output_item.added`,
//! `response.content_part.added`, `response.output_text.delta`…, `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done`; for a call
//! `response.output_item.added`, `response.function_call_arguments.delta` and `.done`,
//! `response.output_item.done`; then `response.completed` (or `response.incomplete`). Every
//! event carries its `sequence_number`. A task that fails after the stream started ends it with
//! `error` and `response.failed`. Keep-alive comments flow while the task waits.

use std::time::Duration;

use bytes::Bytes;
use llorch_wire::task::TaskEnd;
use llorch_wire::tools::ToolChoice;
use llorch_wire::ErrorBody;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::response::{call_item, message_item, text_part, Answer, Shape};
use super::Keeper;
use crate::api::interactive::CancelOnDrop;
use crate::api::sse;
use crate::tasks::{Follower, TaskEvent};

/// The events of one answer as they are sent.
pub(super) struct Events {
    seq: u64,
    out: Vec<u8>,
    /// The text streamed so far, when a message item is open.
    open: Option<String>,
    /// Output items finished so far (the next one's index).
    items: usize,
}

impl Events {
    pub(super) fn new() -> Self {
        Self {
            seq: 0,
            out: Vec::new(),
            open: None,
            items: 0,
        }
    }

    fn emit(&mut self, mut data: Value) {
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        let name = data["type"].as_str().unwrap_or("message").to_string();
        self.out
            .extend_from_slice(format!("event: {name}\ndata: {data}\n\n").as_bytes());
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub(super) fn start(&mut self, shape: &Shape) {
        let r = shape.response("in_progress", Vec::new(), None);
        self.emit(json!({"type": "response.created", "response": r}));
        self.emit(json!({"type": "response.in_progress", "response": r}));
    }

    /// Text as it is generated: the first piece opens the message item and its part.
    pub(super) fn text(&mut self, shape: &Shape, text: &str) {
        if text.is_empty() {
            return;
        }
        let id = shape.message_id();
        let index = self.items;
        if self.open.is_none() {
            self.emit(
                json!({"type": "response.output_item.added", "output_index": index,
                "item": message_item(&id, "in_progress", "")}),
            );
            self.emit(json!({"type": "response.content_part.added", "item_id": id,
                "output_index": index, "content_index": 0, "part": text_part("")}));
        }
        self.open.get_or_insert_default().push_str(text);
        self.emit(json!({"type": "response.output_text.delta", "item_id": id,
            "output_index": index, "content_index": 0, "delta": text, "logprobs": []}));
    }

    /// Closes the open message item: its whole text, part and item.
    fn close_text(&mut self, shape: &Shape, status: &str) {
        let Some(text) = self.open.take() else {
            return;
        };
        let (id, index) = (shape.message_id(), self.items);
        self.emit(json!({"type": "response.output_text.done", "item_id": id,
            "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
        self.emit(json!({"type": "response.content_part.done", "item_id": id,
            "output_index": index, "content_index": 0, "part": text_part(&text)}));
        self.emit(
            json!({"type": "response.output_item.done", "output_index": index,
            "item": message_item(&id, status, &text)}),
        );
        self.items += 1;
    }

    /// A whole item of a held answer, sent as its events.
    fn whole_item(&mut self, shape: &Shape, item: Value) {
        let index = self.items;
        if item["type"] == "function_call" {
            let id = item["id"].clone();
            let args = item["arguments"].clone();
            let mut added = item.clone();
            added["status"] = json!("in_progress");
            added["arguments"] = json!("");
            self.emit(
                json!({"type": "response.output_item.added", "output_index": index, "item": added}),
            );
            self.emit(
                json!({"type": "response.function_call_arguments.delta", "item_id": id,
                "output_index": index, "delta": args}),
            );
            self.emit(
                json!({"type": "response.function_call_arguments.done", "item_id": id,
                "output_index": index, "name": item["name"], "arguments": args}),
            );
            self.emit(
                json!({"type": "response.output_item.done", "output_index": index, "item": item}),
            );
            self.items += 1;
        } else {
            let text = item["content"][0]["text"].as_str().unwrap_or_default();
            self.text(shape, text);
            if self.open.is_none() {
                // An empty answer still has its message item, as a whole answer does.
                self.open = Some(String::new());
                let id = shape.message_id();
                self.emit(
                    json!({"type": "response.output_item.added", "output_index": index,
                    "item": message_item(&id, "in_progress", "")}),
                );
                self.emit(json!({"type": "response.content_part.added", "item_id": id,
                    "output_index": index, "content_index": 0, "part": text_part("")}));
            }
            let status = item["status"].as_str().unwrap_or("completed").to_string();
            self.close_text(shape, &status);
        }
    }

    /// The end: the open text closes (or the held answer goes out as whole items). Returns
    /// the answer and the final response object, which [`Events::complete`] sends.
    pub(super) fn finish(&mut self, shape: &Shape, text: String, end: &TaskEnd) -> (Answer, Value) {
        let answer = Answer::read(shape, text, end);
        if self.open.is_some() {
            self.close_text(shape, answer.status);
            for (i, c) in answer.calls.iter().enumerate() {
                self.whole_item(shape, call_item(shape, i, c, "completed"));
            }
        } else {
            for item in answer.items(shape) {
                self.whole_item(shape, item);
            }
        }
        let r = shape.response(answer.status, answer.items(shape), Some(end));
        (answer, r)
    }

    /// The last event: `response.completed`, or `response.incomplete` for a cut answer.
    pub(super) fn complete(&mut self, response: Value) {
        let kind = if response["status"] == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.emit(json!({"type": kind, "response": response}));
    }

    /// A failure after the stream started: `error`, then `response.failed`.
    pub(super) fn fail(&mut self, shape: &Shape, body: &ErrorBody) {
        self.emit(
            json!({"type": "error", "code": body.code.as_str().to_ascii_lowercase(),
            "message": body.message, "param": body.field}),
        );
        let mut r = shape.response("failed", Vec::new(), None);
        r["error"] = json!({"code": "server_error", "message": body.message});
        self.emit(json!({"type": "response.failed", "response": r}));
    }
}

/// Sends a task's answer as events on `tx` until its final event, or until the client goes
/// away (the channel closes; `_guard` then cancels the task). `first` is a batch of events
/// already read, `None` when the stream was committed to before the task started. A finished
/// answer is kept by `keeper` (when the request asked to store it).
pub(super) async fn pump(
    tx: mpsc::Sender<Bytes>,
    mut follower: Follower,
    _guard: CancelOnDrop,
    (shape, keeper): (Shape, Keeper),
    keep_alive: Duration,
    first: Option<Vec<TaskEvent>>,
) {
    let buffered = shape.tools != ToolChoice::None;
    let mut keeper = Some(keeper);
    let mut events = Events::new();
    events.start(&shape);
    // With tools in play the answer is held until it is known to be calls or text.
    let mut held = String::new();
    let mut batches = sse::Batches::new(first, keep_alive);
    loop {
        let Some(batch) = batches.next(&mut follower, &tx).await else {
            return;
        };
        let mut done = false;
        for e in batch {
            match e {
                TaskEvent::Token(t) if buffered => held.push_str(&t.t),
                TaskEvent::Token(t) => events.text(&shape, &t.t),
                TaskEvent::End(end) => {
                    let whole = if buffered {
                        std::mem::take(&mut held)
                    } else {
                        events.open.clone().unwrap_or_default()
                    };
                    let (answer, response) = events.finish(&shape, whole, &end);
                    let response = match keeper.take() {
                        Some(k) => k.keep(&shape.id, &answer, response),
                        None => response,
                    };
                    events.complete(response);
                    done = true;
                }
                TaskEvent::Error(body) => {
                    events.fail(&shape, &body);
                    done = true;
                }
                _ => {}
            }
        }
        let out = events.take();
        if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
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
    use serde_json::Map;

    fn end(reason: FinishReason) -> TaskEnd {
        TaskEnd {
            task_id: "t".into(),
            tokens_in: 10,
            cached_tokens: 4,
            tokens_out: 3,
            queue_ms: 0,
            ttft_ms: 1,
            decode_time_ms: 1,
            finish_reason: reason,
            choices: Vec::new(),
            stop_sequence: None,
            embeddings: Vec::new(),
        }
    }

    fn shape(tools: ToolChoice) -> Shape {
        Shape {
            id: "resp_abc".into(),
            created_at: 1,
            model: "m".into(),
            tools,
            echo: Map::new(),
        }
    }

    fn events(bytes: &[u8]) -> Vec<Value> {
        let e: Vec<Value> = std::str::from_utf8(bytes)
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let data: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                assert_eq!(name.strip_prefix("event: ").unwrap(), data["type"]);
                data
            })
            .collect();
        for (i, d) in e.iter().enumerate() {
            assert_eq!(d["sequence_number"], i, "sequence numbers count up from 0");
        }
        e
    }

    fn run(shape: &Shape, pieces: &[&str], whole: &str, reason: FinishReason) -> Vec<Value> {
        let mut ev = Events::new();
        ev.start(shape);
        for p in pieces {
            ev.text(shape, p);
        }
        let (_, r) = ev.finish(shape, whole.to_string(), &end(reason));
        ev.complete(r);
        events(&ev.take())
    }

    #[test]
    fn text_streams_in_the_documented_order() {
        let e = run(
            &shape(ToolChoice::None),
            &["Hel", "lo"],
            "Hello",
            FinishReason::Stop,
        );
        let names: Vec<&str> = e.iter().map(|d| d["type"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert_eq!(e[6]["text"], "Hello");
        assert_eq!(e[9]["response"]["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(
            e[9]["response"]["usage"]["input_tokens_details"]["cached_tokens"],
            4
        );
        // A cut answer ends incomplete.
        let e = run(&shape(ToolChoice::None), &["x"], "x", FinishReason::Length);
        let last = e.last().unwrap();
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
    }

    #[test]
    fn a_held_call_goes_out_as_a_function_call_item() {
        let text = r#"{"name":"f","arguments":{"a":1}}"#;
        let e = run(&shape(ToolChoice::Required), &[], text, FinishReason::Stop);
        let names: Vec<&str> = e.iter().map(|d| d["type"].as_str().unwrap()).collect();
        assert_eq!(
            names[2..],
            [
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        assert_eq!(e[2]["item"]["arguments"], "");
        let args: Value = serde_json::from_str(e[4]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, serde_json::json!({"a": 1}));
        let out = &e[6]["response"]["output"];
        assert_eq!(out.as_array().unwrap().len(), 1);
        assert_eq!(out[0]["type"], "function_call");
        assert_eq!(out[0]["name"], "f");
    }
}
