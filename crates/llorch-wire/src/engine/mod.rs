//! The engine's HTTP API bodies: `POST /generate`, its SSE events, `GET /slots`, `GET /health`.
//!
//! The request and its validation are here; [`events`] holds the SSE events of a generation and
//! [`status`] the `GET /slots` and `GET /health` bodies.

pub mod embed;
pub mod events;
pub mod status;

pub use embed::{EmbedInput, MAX_EMBED_INPUTS};
pub use events::*;
pub use status::*;

use serde::{Deserialize, Serialize};

use crate::error::ErrorBody;
use crate::sampling::{sampling_fields, sampling_request};
use crate::tools::{Tool, ToolCall, ToolChoice};

/// Defaults applied when a request leaves a sampling field out. They follow llama.cpp's own.
pub mod defaults {
    pub const MAX_TOKENS: u32 = 256;
    pub const TEMPERATURE: f32 = 0.8;
    pub const TOP_P: f32 = 0.95;
    pub const TOP_K: i32 = 40;
    pub const MIN_P: f32 = 0.05;
    pub const REPEAT_PENALTY: f32 = 1.0;
    /// Tokens the repetition, frequency and presence penalties look back over.
    pub const REPEAT_LAST_N: i32 = 64;
    pub const TYPICAL_P: f32 = 1.0;
}

/// Limits on request fields, checked by [`GenerateRequest::validate`].
pub mod limits {
    pub const MAX_STOP_STRINGS: usize = 8;
    pub const MAX_STOP_BYTES: usize = 256;
    pub const MAX_TEMPERATURE: f32 = 2.0;
    pub const MAX_REPEAT_PENALTY: f32 = 10.0;
    /// `repeat_last_n` at most (-1 means the slot's whole context).
    pub const MAX_REPEAT_LAST_N: i32 = 65_536;
    /// OpenAI's range of `presence_penalty` and `frequency_penalty`.
    pub const MAX_ABS_PENALTY: f32 = 2.0;
    /// Alternatives returned per token with `logprobs` (OpenAI's `top_logprobs` limit).
    pub const MAX_TOP_LOGPROBS: u32 = 20;
    /// Choices (`n`) one request may ask for.
    pub const MAX_CHOICES: u32 = 16;
    /// A `grammar` longer than this is refused (a JSON Schema is bounded by the body size).
    pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;
}

/// One chat message. The engine renders a list of them with the model's own chat template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's calls of tools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

sampling_fields!(sampling_request! {
    /// `POST /generate`: one generation request to one engine.
    ///
    /// Unknown fields are rejected so a misspelt parameter is never silently ignored.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct GenerateRequest {
        /// Raw prompt text, sent to the model as is. Exactly one of `prompt` and `messages`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub prompt: Option<String>,
        /// Chat messages, rendered with the model's chat template from its GGUF metadata.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub messages: Option<Vec<ChatMessage>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub max_tokens: Option<u32>,
    }
    // Then the sampling fields (`crate::sampling`), then these.
    {
        /// Structured output: the answer is JSON that validates against this JSON Schema, enforced
        /// while decoding by a llama.cpp grammar converted from it. `{"type": "object"}` is JSON
        /// mode. Checked by [`crate::schema::check`] (strict or not: see `json_schema_strict`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub json_schema: Option<serde_json::Value>,
        /// Refuse the keywords of `json_schema` that the grammar cannot enforce (OpenAI's `strict`),
        /// instead of ignoring them.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub json_schema_strict: bool,
        /// A grammar in llama.cpp's GBNF syntax (root rule `root`) that the answer follows. Not
        /// together with `json_schema`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub grammar: Option<String>,
        /// Tools the model may call (chat only), in OpenAI's shape.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub tools: Vec<Tool>,
        /// How the model may use `tools`: `none` (they are left out of the prompt), `auto` (the
        /// model decides; needs a chat template that takes tools), `required` or a named function
        /// (the answer is a call, enforced by a grammar). Default: `auto` with tools.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tool_choice: Option<ToolChoice>,
        /// With `required`: the answer may be a list of calls.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub parallel_tool_calls: bool,
        /// Answers to generate for the prompt (1 to 16, default 1). They run one after another in
        /// the request's slot: the prompt is evaluated once and each further answer starts from
        /// its KV cache (only the prompt's last token is evaluated again, for its logits).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub n: Option<u32>,
        /// Return each generated token's log-probability and this many most likely alternatives
        /// (0 to 20) in the `token` events' `lp`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub logprobs: Option<u32>,
        /// Preferred slot (for example the one that holds this session's KV cache). Used when free.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub slot: Option<u32>,
        /// The caller's task id, for logs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub task_id: Option<String>,
        /// Count the prompt's tokens and answer at once (Anthropic's `count_tokens`): the stream
        /// is one `end` event whose `prompt_tokens` is the count, and nothing is decoded nor
        /// a slot taken.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub count_only: bool,
        /// Whose prompt this is, as an opaque number: the engine reuses cached prompt state
        /// only between requests of the same scope (absent: scope 0). orchestratord gives
        /// each API key its own, so one key cannot learn from reuse what another key sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub cache_scope: Option<u64>,
        /// Embed these inputs instead of generating ([`embed`]); the pool must serve
        /// embeddings.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub embed: Option<Vec<EmbedInput>>,
        /// With `embed`: cut an input longer than the engine's embedding context to fit,
        /// instead of refusing it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub embed_truncate: bool,
    }
});

/// The roles a chat message may have.
pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

impl GenerateRequest {
    pub fn prompt(text: impl Into<String>) -> Self {
        Self {
            prompt: Some(text.into()),
            ..Self::default()
        }
    }

    pub fn chat(messages: Vec<ChatMessage>) -> Self {
        Self {
            messages: Some(messages),
            ..Self::default()
        }
    }

    /// Checks every field's range. The engine adds the checks that need the model (prompt
    /// length against the slot context, slot index against the slot count). The first field
    /// at fault is named, in this order.
    pub fn validate(&self) -> Result<(), ErrorBody> {
        self.validate_input()?;
        self.validate_tools()?;
        if self.max_tokens == Some(0) {
            return Err(ErrorBody::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        self.validate_sampling()?;
        self.validate_choices()?;
        self.validate_structured()?;
        self.validate_stop()
    }

    /// A prompt or messages, and each message well formed.
    fn validate_input(&self) -> Result<(), ErrorBody> {
        if let Some(inputs) = &self.embed {
            return embed::validate(self, inputs);
        }
        match (&self.prompt, &self.messages) {
            (Some(_), Some(_)) => {
                return Err(ErrorBody::invalid(
                    "messages",
                    "give either prompt or messages, not both",
                ))
            }
            (None, None) => {
                return Err(ErrorBody::invalid(
                    "prompt",
                    "prompt or messages is required",
                ))
            }
            (Some(p), None) if p.is_empty() => {
                return Err(ErrorBody::invalid("prompt", "prompt must not be empty"))
            }
            (None, Some(m)) if m.is_empty() => {
                return Err(ErrorBody::invalid(
                    "messages",
                    "messages must hold at least one message",
                ))
            }
            _ => {}
        }
        for (i, m) in self.messages.iter().flatten().enumerate() {
            if !CHAT_ROLES.contains(&m.role.as_str()) {
                return Err(ErrorBody::invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "messages[{i}].role is {:?}; use one of {}",
                        m.role,
                        CHAT_ROLES.join(", ")
                    ),
                ));
            }
            if m.content.contains('\0') {
                return Err(ErrorBody::invalid(
                    format!("messages[{i}].content"),
                    format!("messages[{i}].content must not contain NUL characters"),
                ));
            }
            if !m.tool_calls.is_empty() && m.role != "assistant" {
                return Err(ErrorBody::invalid(
                    format!("messages[{i}].tool_calls"),
                    format!("messages[{i}].tool_calls belong to assistant messages only"),
                ));
            }
            for (j, c) in m.tool_calls.iter().enumerate() {
                if !crate::tools::valid_name(&c.function.name) {
                    return Err(ErrorBody::invalid(
                        format!("messages[{i}].tool_calls[{j}].function.name"),
                        "a function name is 1 to 64 letters, digits, underscores or dashes",
                    ));
                }
            }
            if (m.role == "tool") != m.tool_call_id.is_some() {
                return Err(ErrorBody::invalid(
                    format!("messages[{i}].tool_call_id"),
                    format!("messages[{i}]: a tool message needs a tool_call_id, and only tool messages have one"),
                ));
            }
        }
        Ok(())
    }

    /// The sampling ranges (`crate::sampling`), `stop` aside.
    fn validate_sampling(&self) -> Result<(), ErrorBody> {
        check_range(
            "temperature",
            self.temperature,
            0.0,
            limits::MAX_TEMPERATURE,
            true,
        )?;
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ErrorBody::invalid(
                    "top_p",
                    format!("top_p is {p}; it must be greater than 0 and at most 1"),
                ));
            }
        }
        if let Some(k) = self.top_k {
            if k < 0 {
                return Err(ErrorBody::invalid(
                    "top_k",
                    format!("top_k is {k}; it must be 0 (disabled) or more"),
                ));
            }
        }
        check_range("min_p", self.min_p, 0.0, 1.0, true)?;
        if let Some(r) = self.repeat_penalty {
            if !(r > 0.0 && r <= limits::MAX_REPEAT_PENALTY) {
                return Err(ErrorBody::invalid(
                    "repeat_penalty",
                    format!(
                        "repeat_penalty is {r}; it must be greater than 0 and at most {} (1 disables it)",
                        limits::MAX_REPEAT_PENALTY
                    ),
                ));
            }
        }
        if let Some(p) = self.typical_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ErrorBody::invalid(
                    "typical_p",
                    format!(
                        "typical_p is {p}; it must be greater than 0 and at most 1 (1 disables it)"
                    ),
                ));
            }
        }
        if let Some(n) = self.repeat_last_n {
            if !(-1..=limits::MAX_REPEAT_LAST_N).contains(&n) {
                return Err(ErrorBody::invalid(
                    "repeat_last_n",
                    format!(
                        "repeat_last_n is {n}; use 0 (no penalties) to {}, or -1 for the whole context",
                        limits::MAX_REPEAT_LAST_N
                    ),
                ));
            }
        }
        let m = limits::MAX_ABS_PENALTY;
        check_range("presence_penalty", self.presence_penalty, -m, m, true)?;
        check_range("frequency_penalty", self.frequency_penalty, -m, m, true)?;
        Ok(())
    }

    /// `n` and `logprobs`.
    fn validate_choices(&self) -> Result<(), ErrorBody> {
        if let Some(n) = self.n {
            if !(1..=limits::MAX_CHOICES).contains(&n) {
                return Err(ErrorBody::invalid(
                    "n",
                    format!("n is {n}; it must be between 1 and {}", limits::MAX_CHOICES),
                ));
            }
        }
        if let Some(n) = self.logprobs {
            if n > limits::MAX_TOP_LOGPROBS {
                return Err(ErrorBody::invalid(
                    "logprobs",
                    format!(
                        "logprobs asks for {n} alternatives per token; at most {} are returned",
                        limits::MAX_TOP_LOGPROBS
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `json_schema` or `grammar`, not both, each well formed.
    fn validate_structured(&self) -> Result<(), ErrorBody> {
        if let Some(schema) = &self.json_schema {
            if self.grammar.is_some() {
                return Err(ErrorBody::invalid(
                    "grammar",
                    "give either json_schema or grammar, not both",
                ));
            }
            crate::schema::check(schema, self.json_schema_strict)
                .map_err(|e| ErrorBody::invalid("json_schema", format!("json_schema {e}")))?;
        }
        if let Some(g) = &self.grammar {
            if g.trim().is_empty() || g.len() > limits::MAX_GRAMMAR_BYTES || g.contains('\0') {
                return Err(ErrorBody::invalid(
                    "grammar",
                    format!(
                        "grammar must be GBNF text of 1 to {} bytes without NUL characters",
                        limits::MAX_GRAMMAR_BYTES
                    ),
                ));
            }
            crate::gbnf::check(g).map_err(|e| ErrorBody::invalid("grammar", e))?;
        }
        Ok(())
    }

    /// At most a few `stop` strings, none empty or long.
    fn validate_stop(&self) -> Result<(), ErrorBody> {
        if self.stop.len() > limits::MAX_STOP_STRINGS {
            return Err(ErrorBody::invalid(
                "stop",
                format!(
                    "stop has {} strings; at most {} are allowed",
                    self.stop.len(),
                    limits::MAX_STOP_STRINGS
                ),
            ));
        }
        for (i, s) in self.stop.iter().enumerate() {
            if s.is_empty() || s.len() > limits::MAX_STOP_BYTES {
                return Err(ErrorBody::invalid(
                    format!("stop[{i}]"),
                    format!(
                        "stop[{i}] must be between 1 and {} bytes long",
                        limits::MAX_STOP_BYTES
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl GenerateRequest {
    /// The `tools`, `tool_choice` and `parallel_tool_calls` checks.
    fn validate_tools(&self) -> Result<(), ErrorBody> {
        use crate::tools::{valid_name, MAX_TOOLS};
        if self.tools.len() > MAX_TOOLS {
            return Err(ErrorBody::invalid(
                "tools",
                format!(
                    "tools has {} entries; at most {MAX_TOOLS} are allowed",
                    self.tools.len()
                ),
            ));
        }
        if !self.tools.is_empty() && self.messages.is_none() {
            return Err(ErrorBody::invalid(
                "tools",
                "tools need a chat request (messages), not a prompt",
            ));
        }
        let choice = self.tool_choice.as_ref();
        if !self.tools.is_empty()
            && !matches!(choice, Some(ToolChoice::None))
            && (self.json_schema.is_some() || self.grammar.is_some())
        {
            return Err(ErrorBody::invalid(
                "tools",
                "tools cannot be combined with a JSON schema or grammar for the answer",
            ));
        }
        for (i, t) in self.tools.iter().enumerate() {
            if t.kind != "function" {
                return Err(ErrorBody::invalid(
                    format!("tools[{i}].type"),
                    format!(
                        "tools[{i}].type is {:?}; only \"function\" tools exist",
                        t.kind
                    ),
                ));
            }
            if !valid_name(&t.function.name) {
                return Err(ErrorBody::invalid(
                    format!("tools[{i}].function.name"),
                    "a function name is 1 to 64 letters, digits, underscores or dashes",
                ));
            }
            if self.tools[..i]
                .iter()
                .any(|o| o.function.name == t.function.name)
            {
                return Err(ErrorBody::invalid(
                    format!("tools[{i}].function.name"),
                    format!("two tools are named {:?}", t.function.name),
                ));
            }
            if let Some(p) = &t.function.parameters {
                if !p.is_object() {
                    return Err(ErrorBody::invalid(
                        format!("tools[{i}].function.parameters"),
                        "parameters must be a JSON Schema object",
                    ));
                }
                crate::schema::check(p, t.function.strict.unwrap_or(false)).map_err(|e| {
                    ErrorBody::invalid(
                        format!("tools[{i}].function.parameters"),
                        format!("tools[{i}].function.parameters cannot be enforced {e}"),
                    )
                })?;
            }
        }
        match choice {
            Some(c @ (ToolChoice::Required | ToolChoice::Function(_) | ToolChoice::Auto))
                if self.tools.is_empty() =>
            {
                let what = match c {
                    ToolChoice::Auto => "auto",
                    _ => "a call",
                };
                Err(ErrorBody::invalid(
                    "tool_choice",
                    format!("tool_choice asks for {what}, but the request offers no tools"),
                ))
            }
            Some(ToolChoice::Function(name))
                if !self.tools.iter().any(|t| &t.function.name == name) =>
            {
                Err(ErrorBody::invalid(
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not among the tools"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// The effective tool choice: `auto` when tools are offered and none was given.
    pub fn effective_tool_choice(&self) -> ToolChoice {
        match (&self.tool_choice, self.tools.is_empty()) {
            (Some(c), _) => c.clone(),
            (None, false) => ToolChoice::Auto,
            (None, true) => ToolChoice::None,
        }
    }
}

fn check_range(
    field: &str,
    value: Option<f32>,
    min: f32,
    max: f32,
    inclusive: bool,
) -> Result<(), ErrorBody> {
    if let Some(v) = value {
        let ok = v.is_finite() && v >= min && (v < max || (inclusive && v == max));
        if !ok {
            return Err(ErrorBody::invalid(
                field,
                format!("{field} is {v}; it must be between {min} and {max}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    fn field_of(req: &GenerateRequest) -> String {
        let err = req.validate().unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidParams);
        err.field.unwrap()
    }

    #[test]
    fn each_out_of_range_value_names_its_field() {
        let base = GenerateRequest::prompt("hi");
        assert!(base.validate().is_ok());
        let cases: Vec<(GenerateRequest, &str)> = vec![
            (GenerateRequest::default(), "prompt"),
            (GenerateRequest::prompt(""), "prompt"),
            (
                GenerateRequest {
                    messages: Some(vec![]),
                    ..base.clone()
                },
                "messages",
            ),
            (GenerateRequest::chat(vec![]), "messages"),
            (
                GenerateRequest::chat(vec![ChatMessage::new("wizard", "x")]),
                "messages[0].role",
            ),
            (
                GenerateRequest {
                    max_tokens: Some(0),
                    ..base.clone()
                },
                "max_tokens",
            ),
            (
                GenerateRequest {
                    temperature: Some(-0.1),
                    ..base.clone()
                },
                "temperature",
            ),
            (
                GenerateRequest {
                    temperature: Some(f32::NAN),
                    ..base.clone()
                },
                "temperature",
            ),
            (
                GenerateRequest {
                    top_p: Some(0.0),
                    ..base.clone()
                },
                "top_p",
            ),
            (
                GenerateRequest {
                    top_k: Some(-1),
                    ..base.clone()
                },
                "top_k",
            ),
            (
                GenerateRequest {
                    min_p: Some(1.5),
                    ..base.clone()
                },
                "min_p",
            ),
            (
                GenerateRequest {
                    repeat_penalty: Some(0.0),
                    ..base.clone()
                },
                "repeat_penalty",
            ),
            (
                GenerateRequest {
                    stop: vec!["a".into(), String::new()],
                    ..base.clone()
                },
                "stop[1]",
            ),
            (
                GenerateRequest {
                    stop: vec!["a".into(); 9],
                    ..base.clone()
                },
                "stop",
            ),
            (
                GenerateRequest {
                    logprobs: Some(21),
                    ..base.clone()
                },
                "logprobs",
            ),
            (
                GenerateRequest {
                    json_schema: Some(serde_json::json!({"type": "text"})),
                    ..base.clone()
                },
                "json_schema",
            ),
            (
                GenerateRequest {
                    json_schema: Some(serde_json::json!({})),
                    grammar: Some("root ::= \"a\"".into()),
                    ..base.clone()
                },
                "grammar",
            ),
            (
                GenerateRequest {
                    grammar: Some(" ".into()),
                    ..base.clone()
                },
                "grammar",
            ),
        ];
        for (req, field) in cases {
            assert_eq!(field_of(&req), field, "{req:?}");
        }
    }

    #[test]
    fn boundary_values_are_accepted() {
        let req = GenerateRequest {
            temperature: Some(0.0),
            top_p: Some(1.0),
            top_k: Some(0),
            min_p: Some(0.0),
            repeat_penalty: Some(1.0),
            max_tokens: Some(1),
            ..GenerateRequest::prompt("x")
        };
        assert!(req.validate().is_ok());
        let req = GenerateRequest {
            temperature: Some(2.0),
            ..GenerateRequest::prompt("x")
        };
        assert!(req.validate().is_ok());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<GenerateRequest>(r#"{"prompt":"x","max_token":3}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_token"), "{err}");
    }
}
