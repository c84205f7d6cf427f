//! The SSE events of one generation (`token`, `end`, `error`) and their encoding.

use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model's end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the slot's context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

/// SSE `token` event: a piece of text. `i` counts events from 0, so a client can tell a gap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    pub t: String,
    pub i: u32,
    /// The choice this text belongs to, with `n` > 1 (absent: 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub c: u32,
    /// With `logprobs`: the tokens whose text this event carries (a token can end in the next
    /// event when its bytes complete a character there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lp: Vec<TokenLogprob>,
}

impl TokenEvent {
    pub fn text(t: impl Into<String>, i: u32) -> Self {
        Self {
            t: t.into(),
            i,
            c: 0,
            lp: Vec::new(),
        }
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// How one choice of several (`n` > 1) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoiceEnd {
    pub finish_reason: FinishReason,
    pub completion_tokens: u32,
}

/// One generated token's log-probability, in OpenAI's shape (`ChatCompletionTokenLogprob`).
/// Log-probabilities are over the whole vocabulary after the penalties, the grammar and the
/// temperature (1 for greedy decoding), before top-k/top-p/min-p truncation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes (a token can hold part of a character).
    pub bytes: Vec<u8>,
    /// The most likely tokens at this position, most likely first.
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// SSE `end` event: the last event of a successful generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndEvent {
    pub finish_reason: FinishReason,
    /// Tokens in the rendered prompt.
    pub prompt_tokens: u32,
    /// Of those, how many were already in the slot's KV cache and were not evaluated again.
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    /// From the engine receiving the request to the first token being sent.
    pub ttft_ms: f64,
    /// From the first token to the last.
    pub decode_ms: f64,
    /// The slot that served the request; send it back as `slot` to reuse its cache.
    pub slot: u32,
    /// With `n` > 1: how each choice ended, in order (`completion_tokens` above is their sum,
    /// `finish_reason` the last one's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<ChoiceEnd>,
    /// The stop string that ended the (last) answer, when one did (`finish_reason` is then
    /// `stop`); absent when the model ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_sequence: Option<String>,
    /// An `embed` request's vectors, one per input in order (L2-normalised).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<Vec<f32>>,
}

/// Every event a `POST /generate` stream can carry.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    Token(TokenEvent),
    End(EndEvent),
    Error(ErrorBody),
}

impl EngineEvent {
    /// The SSE `event:` name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Token(_) => "token",
            Self::End(_) => "end",
            Self::Error(_) => "error",
        }
    }

    /// Encodes the event as one SSE frame.
    pub fn to_sse(&self) -> String {
        let data = match self {
            Self::Token(e) => serde_json::to_string(e),
            Self::End(e) => serde_json::to_string(e),
            Self::Error(e) => serde_json::to_string(e),
        }
        .expect("engine events always serialize");
        crate::sse::frame(self.name(), &data)
    }

    /// Decodes an SSE event by name and data.
    pub fn from_sse(event: &str, data: &str) -> Result<Self, String> {
        let parsed = match event {
            "token" => serde_json::from_str(data).map(Self::Token),
            "end" => serde_json::from_str(data).map(Self::End),
            "error" => serde_json::from_str(data).map(Self::Error),
            other => return Err(format!("unknown engine event {other:?}")),
        };
        parsed.map_err(|e| format!("bad {event} event: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn events_round_trip_through_sse_encoding() {
        let events = [
            EngineEvent::Token(TokenEvent::text("héllo\n", 3)),
            EngineEvent::Token(TokenEvent {
                t: "x".into(),
                i: 4,
                c: 1,
                lp: vec![TokenLogprob {
                    token: "x".into(),
                    logprob: -0.25,
                    bytes: b"x".to_vec(),
                    top_logprobs: vec![TopLogprob {
                        token: "x".into(),
                        logprob: -0.25,
                        bytes: b"x".to_vec(),
                    }],
                }],
            }),
            EngineEvent::End(EndEvent {
                finish_reason: FinishReason::Length,
                prompt_tokens: 10,
                cached_tokens: 4,
                completion_tokens: 2,
                ttft_ms: 12.5,
                decode_ms: 3.0,
                slot: 1,
                choices: vec![ChoiceEnd {
                    finish_reason: FinishReason::Stop,
                    completion_tokens: 1,
                }],
                stop_sequence: Some("\n\n".into()),
                embeddings: Vec::new(),
            }),
            EngineEvent::Error(ErrorBody::new(ErrorCode::Canceled, "engine stopping")),
        ];
        let mut decoder = crate::sse::Decoder::default();
        let wire: String = events.iter().map(EngineEvent::to_sse).collect();
        let decoded: Vec<EngineEvent> = decoder
            .push(wire.as_bytes())
            .unwrap()
            .into_iter()
            .map(|f| EngineEvent::from_sse(&f.event, &f.data).unwrap())
            .collect();
        assert_eq!(decoded, events);
    }
}
