//! OpenAI request bodies and their validation: the fields both endpoints share ([`Common`]),
//! each endpoint's own, the parameters refused by name, and the engine request they become.
//! Nothing here runs a task.

use axum::body::Body;
use axum::http::HeaderMap;
use llorch_wire::engine::{limits, ChatMessage, GenerateRequest};
use llorch_wire::sampling::Sampling;
use llorch_wire::tools::{Tool, ToolCall, ToolChoice};
use serde::Deserialize;
use serde_json::{json, Value};

use super::{bad, bad_body, oai, Result};
use crate::api::{authenticate, parse, read_body};
use crate::state::State;

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
pub(super) struct Common {
    #[serde(default)]
    pub(super) stream: Option<bool>,
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
pub(super) struct ChatRequest {
    pub(super) model: String,
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
pub(super) struct CompletionRequest {
    pub(super) model: String,
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
pub(super) const CHAT_FIELDS: &[&str] = &[
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
pub(super) const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo", "suffix", "best_of"];

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
            n: self.n,
            ..base
        }
        .with_sampling(self.sampling())
    }

    /// OpenAI's sampling fields in the shared shape: `stop` as a string or a list, the
    /// `repetition_penalty` alias, a 64-bit `seed`.
    fn sampling(&self) -> Sampling {
        Sampling {
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
            stop: match &self.stop {
                None => Vec::new(),
                Some(Stop::One(s)) => vec![s.clone()],
                Some(Stop::Many(v)) => v.clone(),
            },
        }
    }

    pub(super) fn include_usage(&self) -> bool {
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
pub(crate) fn response_format(rf: &Value) -> Result<(Option<Value>, bool)> {
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
pub(super) async fn decode<T: serde::de::DeserializeOwned>(
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
impl ChatRequest {
    /// Refuses what this server does not honour and builds the engine request; returns it with
    /// the model the request names.
    pub(super) fn into_engine(
        self,
        common: &Common,
        default_max_tokens: u32,
    ) -> Result<(String, GenerateRequest)> {
        let req = self;
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
                max_tokens.unwrap_or(default_max_tokens),
            )
        };
        Ok((req.model, engine))
    }
}

impl CompletionRequest {
    /// Refuses what this server does not honour and builds the engine request; returns it with
    /// the model the request names.
    pub(super) fn into_engine(
        self,
        common: &Common,
        default_max_tokens: u32,
    ) -> Result<(String, GenerateRequest)> {
        let req = self;
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
                common.max_tokens.unwrap_or(default_max_tokens),
            )
        };
        Ok((req.model, engine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_errors_name_the_parameter() {
        let body = br#"{"model":"m","messages":[],"temperature":"hot"}"#;
        let err = parse::<Common>(body).unwrap_err();
        assert_eq!(err.1.field.as_deref(), Some("temperature"), "{:?}", err.1);
    }
}
