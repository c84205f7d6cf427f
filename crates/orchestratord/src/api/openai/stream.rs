//! Encoding a streamed OpenAI answer: `chat.completion.chunk` / `text_completion` chunks as
//! SSE `data:` lines, keep-alive comments while the task waits, and the final error chunk when
//! the task fails after the stream started; `data: [DONE]` ends every stream.

use std::time::Duration;

use bytes::Bytes;
use llorch_wire::engine::TokenLogprob;
use llorch_wire::task::TaskEnd;
use llorch_wire::tools::{ToolCall, ToolChoice};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::response::{
    choice_of, choice_reason, error_object, finish_reason, logprobs_json, read_calls, usage,
    Answer, Kind, Shape, SYSTEM_FINGERPRINT,
};
use crate::api::interactive::CancelOnDrop;
use crate::api::{sse, status_for};
use crate::tasks::{Follower, TaskEvent};

/// Sends a task's answer as chunks on `tx` until its final event, or until the client goes
/// away (the channel closes; `_guard` then cancels the task). `first` is a batch of events
/// already read, `None` when the stream was committed to before the task started.
pub(super) async fn pump(
    tx: mpsc::Sender<Bytes>,
    mut follower: Follower,
    _guard: CancelOnDrop,
    shape: Shape,
    include_usage: bool,
    keep_alive: Duration,
    first: Option<Vec<TaskEvent>>,
) {
    let n = shape.n;
    let buffered = shape.tools != ToolChoice::None;
    let mut chunks = Chunks::new(
        shape.kind,
        &shape.id,
        shape.created,
        &shape.model,
        n,
        include_usage,
    );
    // The role chunk goes out with the first batch of text, in one write.
    let mut out = Vec::new();
    chunks.role(&mut out);
    let mut batches = sse::Batches::new(first, keep_alive);
    let mut held: Vec<Answer> = (0..n).map(|_| Answer::default()).collect();
    loop {
        let Some(events) = batches.next(&mut follower, &tx).await else {
            return;
        };
        let mut done = false;
        for e in events {
            match e {
                TaskEvent::Token(t) if buffered => held[choice_of(&t, n)].add(t),
                TaskEvent::Token(t) => {
                    let lp = shape.with_logprobs.then_some(t.lp.as_slice());
                    chunks.text(&mut out, choice_of(&t, n), &t.t, lp)
                }
                TaskEvent::End(end) => {
                    let mut reasons = Vec::with_capacity(held.len());
                    for (i, a) in std::mem::take(&mut held).into_iter().enumerate() {
                        let reason = choice_reason(&end, i);
                        let (calls, text) = read_calls(&shape.tools, reason, a.text);
                        if !text.is_empty() {
                            let lp = shape.with_logprobs.then_some(a.lp.as_slice());
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
                    out.extend_from_slice(format!("data: {err}\n\ndata: [DONE]\n\n").as_bytes());
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
}

/// Encodes stream chunks. Everything but the text is the same in every chunk of a response, so
/// it is encoded once; a token chunk is then three copies and one JSON string escape.
pub(super) struct Chunks {
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
    pub(super) fn new(
        kind: Kind,
        id: &str,
        created: u64,
        model: &str,
        n: u32,
        include_usage: bool,
    ) -> Self {
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
    pub(super) fn role(&self, out: &mut Vec<u8>) {
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
    pub(super) fn text(
        &mut self,
        out: &mut Vec<u8>,
        index: usize,
        t: &str,
        lp: Option<&[TokenLogprob]>,
    ) {
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
    pub(super) fn tool_call(
        &self,
        out: &mut Vec<u8>,
        choice: usize,
        index: usize,
        call: &ToolCall,
    ) {
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
    pub(super) fn finish(&self, out: &mut Vec<u8>, reasons: &[&str], end: &TaskEnd) {
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
    use serde_json::Value;

    #[test]
    fn stream_chunks_are_openai_json() {
        let end = TaskEnd {
            task_id: "t".into(),
            tokens_in: 3,
            cached_tokens: 1,
            tokens_out: 2,
            queue_ms: 0,
            ttft_ms: 1,
            decode_time_ms: 1,
            finish_reason: llorch_wire::engine::FinishReason::Length,
            choices: Vec::new(),
            stop_sequence: None,
            embeddings: Vec::new(),
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
        assert_eq!(v[3]["usage"]["prompt_tokens_details"]["cached_tokens"], 1);

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
}
