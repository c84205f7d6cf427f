//! Ollama request bodies (`/api/chat`, `/api/generate`) and the engine request they become:
//! messages with `tool_calls` and `tool_name`, `tools`, `format` (`"json"` or a JSON Schema),
//! and the sampling `options` under Ollama's names. Options that tune how Ollama itself loads
//! a model (`num_ctx`, `num_gpu`, `num_thread`, …) are accepted and have no effect (a pool's
//! context and devices are its node's configuration); an unknown option is refused by name.
//! Nothing here runs a task.

use std::collections::HashMap;

use llorch_wire::engine::{ChatMessage, GenerateRequest};
use llorch_wire::sampling::Sampling;
use llorch_wire::tools::{FunctionCall, Tool, ToolCall};
use llorch_wire::ErrorBody;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::response::Kind;

type Result<T> = std::result::Result<T, ErrorBody>;

/// Options of Ollama's model loader and of samplers the engine does not have: accepted, no
/// effect (docs/API.md).
const IGNORED_OPTIONS: &[&str] = &[
    "numa",
    "num_ctx",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "low_vram",
    "f16_kv",
    "logits_all",
    "vocab_only",
    "use_mmap",
    "use_mlock",
    "embedding_only",
    "num_thread",
    "num_keep",
    "tfs_z",
    "penalize_newline",
    "mirostat_tau",
    "mirostat_eta",
];

/// `options`, under Ollama's names.
#[derive(Debug, Default, Deserialize)]
struct Options {
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    typical_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    repeat_last_n: Option<i32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Vec<String>>,
    #[serde(default)]
    num_predict: Option<i64>,
    #[serde(default)]
    mirostat: Option<i64>,
}

const OPTIONS: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "num_predict",
    "mirostat",
];

/// What `/api/chat` and `/api/generate` share.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Common {
    #[serde(default)]
    pub(super) stream: Option<bool>,
    #[serde(default)]
    format: Option<Value>,
    #[serde(default)]
    options: Option<Value>,
    /// Accepted: a pool keeps its node's keep-alive (docs/API.md).
    #[serde(default)]
    #[allow(dead_code)]
    keep_alive: Option<Value>,
    /// Accepted: these models do not think aloud.
    #[serde(default)]
    #[allow(dead_code)]
    think: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    images: Option<Vec<Value>>,
    #[serde(default)]
    tool_calls: Option<Vec<OllamaCall>>,
    #[serde(default)]
    tool_name: Option<String>,
    /// Ollama's reasoning text of an earlier turn: left out of the prompt.
    #[serde(default)]
    #[allow(dead_code)]
    thinking: Option<String>,
}

#[derive(Debug, Deserialize)]
struct OllamaCall {
    function: OllamaFunction,
}

#[derive(Debug, Deserialize)]
struct OllamaFunction {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
}

/// `POST /api/chat` (its own fields; [`Common`]'s come from the same body).
#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    model: String,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
}

/// `POST /api/generate` (its own fields; [`Common`]'s come from the same body).
#[derive(Debug, Deserialize)]
pub(super) struct GenerateBody {
    model: String,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    raw: Option<bool>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    context: Option<Vec<Value>>,
    #[serde(default)]
    images: Option<Vec<Value>>,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ErrorBody {
    ErrorBody::invalid(field, message)
}

/// The fields of [`Common`].
const COMMON_FIELDS: &[&str] = &["stream", "format", "options", "keep_alive", "think"];

/// A body of `/api/chat` or `/api/generate`: what the one handler of both needs.
pub(super) trait Answerable: serde::de::DeserializeOwned {
    /// Whether its answer is a chat `message` or a generate `response`.
    const KIND: Kind;
    /// Its own fields (besides [`COMMON_FIELDS`]).
    const FIELDS: &'static [&'static str];
    fn model(&self) -> &str;
    /// Whether there is nothing to answer: Ollama then only loads the model.
    fn is_load(&self) -> bool;
    fn into_engine(self, common: &Common, default_max_tokens: u32) -> Result<GenerateRequest>;
}

/// Decodes a body into the shared part and the endpoint's own, refusing (by name) a field
/// neither knows.
pub(super) fn decode<T: Answerable>(value: &Value) -> Result<(Common, T)> {
    let Value::Object(map) = value else {
        return Err(invalid("body", "the request body must be a JSON object"));
    };
    if let Some(k) = map
        .keys()
        .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !T::FIELDS.contains(&k.as_str()))
    {
        return Err(invalid(
            k.as_str(),
            format!("{k}: this server does not take this field"),
        ));
    }
    Ok((
        llorch_wire::json::from_value(value)?,
        llorch_wire::json::from_value(value)?,
    ))
}

impl Common {
    /// Ollama streams unless told not to.
    pub(super) fn streams(&self) -> bool {
        self.stream != Some(false)
    }

    fn options(&self) -> Result<Options> {
        let Some(options) = &self.options else {
            return Ok(Options::default());
        };
        let Value::Object(map) = options else {
            return Err(invalid("options", "options must be an object"));
        };
        let mut known = Map::new();
        for (k, v) in map {
            if OPTIONS.contains(&k.as_str()) {
                known.insert(k.clone(), v.clone());
            } else if !IGNORED_OPTIONS.contains(&k.as_str()) {
                return Err(invalid(
                    format!("options.{k}"),
                    format!("options.{k} is not an option this server knows"),
                ));
            }
        }
        let options: Options =
            llorch_wire::json::from_value(&Value::Object(known)).map_err(|mut e| {
                e.field = e.field.map(|f| format!("options.{f}"));
                e
            })?;
        if options.mirostat.is_some_and(|m| m != 0) {
            return Err(invalid(
                "options.mirostat",
                "options.mirostat: Mirostat sampling is not supported; use 0",
            ));
        }
        Ok(options)
    }

    /// The engine request for `base` with these options and `format`. `num_predict` below 0
    /// (Ollama's "no limit" and "fill the context") is the server's default `max_tokens`.
    fn engine(&self, base: GenerateRequest, default_max_tokens: u32) -> Result<GenerateRequest> {
        let o = self.options()?;
        let max_tokens = match o.num_predict {
            Some(n) if n >= 0 => u32::try_from(n).unwrap_or(u32::MAX),
            _ => default_max_tokens,
        };
        let json_schema = match &self.format {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) if s == "json" => Some(serde_json::json!({"type": "object"})),
            Some(schema @ Value::Object(_)) => {
                llorch_wire::schema::check(schema, false)
                    .map_err(|e| invalid("format", format!("format cannot be enforced {e}")))?;
                Some(schema.clone())
            }
            Some(_) => {
                return Err(invalid(
                    "format",
                    "format must be \"json\" or a JSON Schema object",
                ))
            }
        };
        let sampling = Sampling {
            temperature: o.temperature,
            top_p: o.top_p,
            top_k: o.top_k,
            min_p: o.min_p,
            typical_p: o.typical_p,
            repeat_penalty: o.repeat_penalty,
            repeat_last_n: o.repeat_last_n,
            presence_penalty: o.presence_penalty,
            frequency_penalty: o.frequency_penalty,
            // Ollama's seeds are signed 64-bit; the engine's are 32-bit (the low half).
            seed: o.seed.map(|s| s as u32),
            stop: o.stop.unwrap_or_default(),
            ignore_eos: false,
        };
        Ok(GenerateRequest {
            max_tokens: Some(max_tokens),
            json_schema,
            ..base
        }
        .with_sampling(sampling))
    }
}

/// Messages as the engine's: an assistant's calls get ids, and a `tool` message answers the
/// latest call of its `tool_name` (or the latest call).
fn chat_messages(messages: Vec<Message>) -> Result<Vec<ChatMessage>> {
    let mut out = Vec::with_capacity(messages.len());
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut last_id: Option<String> = None;
    for (i, m) in messages.into_iter().enumerate() {
        if m.images.as_ref().is_some_and(|v| !v.is_empty()) {
            return Err(invalid(
                format!("messages[{i}].images"),
                "images are not supported by this server's models",
            ));
        }
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(invalid(
                format!("messages[{i}].role"),
                format!(
                    "role {:?} is not supported; use system, user, assistant or tool",
                    m.role
                ),
            ));
        }
        let mut msg = ChatMessage::new(m.role, m.content.unwrap_or_default());
        for (j, c) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
            let arguments = match c.function.arguments {
                None => "{}".to_string(),
                Some(Value::String(s)) => s,
                Some(v @ Value::Object(_)) => v.to_string(),
                Some(_) => {
                    return Err(invalid(
                        format!("messages[{i}].tool_calls[{j}].function.arguments"),
                        "a call's arguments must be an object",
                    ))
                }
            };
            let id = format!("call_{i}_{j}");
            ids.insert(c.function.name.clone(), id.clone());
            last_id = Some(id.clone());
            msg.tool_calls.push(ToolCall {
                id,
                kind: "function".into(),
                function: FunctionCall {
                    name: c.function.name,
                    arguments,
                },
            });
        }
        if msg.role == "tool" {
            msg.tool_call_id = m
                .tool_name
                .and_then(|n| ids.get(&n).cloned())
                .or_else(|| last_id.clone());
        }
        out.push(msg);
    }
    Ok(out)
}

impl Answerable for ChatRequest {
    const KIND: Kind = Kind::Chat;
    const FIELDS: &'static [&'static str] = &["model", "messages", "tools"];

    fn model(&self) -> &str {
        &self.model
    }

    fn is_load(&self) -> bool {
        self.messages.is_empty()
    }

    fn into_engine(self, common: &Common, default_max_tokens: u32) -> Result<GenerateRequest> {
        let base = GenerateRequest {
            tools: self.tools.unwrap_or_default(),
            ..GenerateRequest::chat(chat_messages(self.messages)?)
        };
        common.engine(base, default_max_tokens)
    }
}

impl Answerable for GenerateBody {
    const KIND: Kind = Kind::Generate;
    const FIELDS: &'static [&'static str] = &[
        "model", "prompt", "system", "raw", "suffix", "template", "context", "images",
    ];

    fn model(&self) -> &str {
        &self.model
    }

    fn is_load(&self) -> bool {
        self.prompt.as_deref().unwrap_or_default().is_empty()
    }

    /// The prompt through the model's chat template (with `system`), or as is with `raw`.
    fn into_engine(self, common: &Common, default_max_tokens: u32) -> Result<GenerateRequest> {
        let refused = [
            (
                "suffix",
                self.suffix.as_ref().is_some_and(|s| !s.is_empty()),
            ),
            (
                "template",
                self.template.as_ref().is_some_and(|s| !s.is_empty()),
            ),
            (
                "context",
                self.context.as_ref().is_some_and(|c| !c.is_empty()),
            ),
            (
                "images",
                self.images.as_ref().is_some_and(|c| !c.is_empty()),
            ),
        ];
        if let Some((field, _)) = refused.iter().find(|(_, given)| *given) {
            return Err(invalid(
                *field,
                format!("{field} is not supported by this server (the model's own template renders the prompt; send the conversation to /api/chat instead of a context)"),
            ));
        }
        let prompt = self.prompt.unwrap_or_default();
        let base = if self.raw == Some(true) {
            if self.system.is_some() {
                return Err(invalid("system", "system cannot be combined with raw"));
            }
            GenerateRequest::prompt(prompt)
        } else {
            let mut messages = Vec::with_capacity(2);
            if let Some(system) = self.system.filter(|s| !s.is_empty()) {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::new("user", prompt));
            GenerateRequest::chat(messages)
        };
        common.engine(base, default_max_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> Result<GenerateRequest> {
        let (common, req) = decode::<ChatRequest>(&body)?;
        req.into_engine(&common, 256)
    }

    #[test]
    fn options_and_history_become_the_engine_request() {
        let e = chat(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_name": "get_weather", "content": "sunny"}
            ],
            "options": {"temperature": 0, "num_predict": 12, "num_ctx": 4096, "stop": ["\n"], "seed": -1},
            "format": "json", "keep_alive": "5m"
        }))
        .unwrap();
        let m = e.messages.as_ref().unwrap();
        assert_eq!(m[1].tool_calls[0].function.arguments, r#"{"city":"Oslo"}"#);
        assert_eq!(
            m[2].tool_call_id.as_deref(),
            Some(m[1].tool_calls[0].id.as_str())
        );
        assert_eq!(e.max_tokens, Some(12));
        assert_eq!(e.temperature, Some(0.0));
        assert_eq!(e.stop, ["\n"]);
        assert_eq!(e.json_schema, Some(json!({"type": "object"})));
        assert!(e.validate().is_ok());
        // No limit (-1) is the server's default.
        let e = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "options": {"num_predict": -1}}),
        )
        .unwrap();
        assert_eq!(e.max_tokens, Some(256));
    }

    #[test]
    fn refusals_name_the_field() {
        let field = |body: Value| chat(body).unwrap_err().field.unwrap();
        let msg = json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            field(json!({"model": "m", "messages": msg, "options": {"nope": 1}})),
            "options.nope"
        );
        assert_eq!(
            field(json!({"model": "m", "messages": msg, "options": {"top_k": "many"}})),
            "options.top_k"
        );
        assert_eq!(
            field(json!({"model": "m", "messages": msg, "options": {"mirostat": 2}})),
            "options.mirostat"
        );
        assert_eq!(
            field(
                json!({"model": "m", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]})
            ),
            "messages[0].images"
        );
        assert_eq!(
            field(json!({"model": "m", "messages": msg, "format": 5})),
            "format"
        );
        assert_eq!(
            field(json!({"model": "m", "messages": msg, "bogus": 1})),
            "bogus"
        );
    }
}
