//! Anthropic Messages request bodies and the engine request they become: `system`, messages of
//! content blocks (`text`, `tool_use`, `tool_result`), `tools` with `input_schema`,
//! `tool_choice`, `output_config.format`, sampling. Blocks are read from the JSON value by hand
//! so that every refusal names the block at fault (`messages[2].content[0].type`).
//! Nothing here runs a task.

use llorch_wire::engine::{ChatMessage, GenerateRequest};
use llorch_wire::sampling::Sampling;
use llorch_wire::tools::{FunctionCall, FunctionDef, Tool, ToolCall, ToolChoice};
use llorch_wire::ErrorBody;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::api::fields::{invalid, known_keys, object, string_at};

type Result<T> = std::result::Result<T, ErrorBody>;

/// The body of `POST /v1/messages` (and, without `max_tokens` and `stream`, of
/// `/v1/messages/count_tokens`). Unknown fields are refused by name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MessagesRequest {
    pub(super) model: String,
    messages: Vec<Value>,
    #[serde(default)]
    pub(super) max_tokens: Option<u32>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    pub(super) stream: Option<bool>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i32>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    output_config: Option<Value>,
    // Accepted and not acted on (docs/API.md says why for each).
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    thinking: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    service_tier: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    cache_control: Option<Value>,
}

/// The text of a list of `text` blocks (`system`, a `tool_result`'s content), joined by
/// newlines.
fn text_blocks(blocks: &[Value], at: &str) -> Result<String> {
    let mut parts = Vec::with_capacity(blocks.len());
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{at}[{j}]");
        let obj = object(b, &at)?;
        match obj.get("type").and_then(Value::as_str) {
            Some("text") => {
                known_keys(obj, &["type", "text", "cache_control", "citations"], &at)?;
                parts.push(string_at(obj, "text", &at)?);
            }
            other => {
                return Err(invalid(
                    format!("{at}.type"),
                    format!(
                        "{at}.type is {other:?}; only text blocks are supported here (images and documents are not)"
                    ),
                ))
            }
        }
    }
    Ok(parts.join("\n"))
}

fn system_message(system: &Value) -> Result<String> {
    match system {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => text_blocks(blocks, "system"),
        _ => Err(invalid(
            "system",
            "system must be a string or a list of text blocks",
        )),
    }
}

/// One message's content blocks as chat messages: a user turn's `tool_result` blocks become
/// `tool` messages (in their order, text between them a user message), an assistant turn's
/// `tool_use` blocks its calls. Thinking blocks of earlier turns are left out of the prompt.
fn message(i: usize, m: &Value, out: &mut Vec<ChatMessage>) -> Result<()> {
    let at = format!("messages[{i}]");
    let obj = object(m, &at)?;
    known_keys(obj, &["role", "content"], &at)?;
    let role = string_at(obj, "role", &at)?;
    if role != "user" && role != "assistant" {
        return Err(invalid(
            format!("{at}.role"),
            format!("{at}.role is {role:?}; it must be user or assistant (the system prompt is the top-level `system`)"),
        ));
    }
    let blocks = match obj.get("content") {
        Some(Value::String(s)) => {
            out.push(ChatMessage::new(role, s.clone()));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        Some(_) => {
            return Err(invalid(
                format!("{at}.content"),
                format!("{at}.content must be a string or a list of content blocks"),
            ))
        }
        None => {
            return Err(invalid(
                format!("{at}.content"),
                format!("{at}.content: field required"),
            ))
        }
    };
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        let block = object(b, &at)?;
        match (block.get("type").and_then(Value::as_str), role.as_str()) {
            (Some("text"), _) => {
                known_keys(block, &["type", "text", "cache_control", "citations"], &at)?;
                text.push_str(&string_at(block, "text", &at)?);
            }
            (Some("tool_use"), "assistant") => calls.push(tool_use(block, &at)?),
            (Some("tool_result"), "user") => {
                if !text.is_empty() {
                    out.push(ChatMessage::new("user", std::mem::take(&mut text)));
                }
                out.push(tool_result(block, &at)?);
            }
            (Some("thinking" | "redacted_thinking"), "assistant") => {}
            (kind, _) => {
                return Err(invalid(
                    format!("{at}.type"),
                    format!(
                        "{at}.type is {kind:?}; a {role} message may hold text{} blocks (images, documents and server tools are not supported)",
                        if role == "user" { " and tool_result" } else { ", tool_use and thinking" }
                    ),
                ))
            }
        }
    }
    if role == "assistant" || !text.is_empty() || out.last().is_none_or(|m| m.role != "tool") {
        out.push(ChatMessage {
            role,
            content: text,
            tool_calls: calls,
            tool_call_id: None,
        });
    }
    Ok(())
}

fn tool_use(block: &Map<String, Value>, at: &str) -> Result<ToolCall> {
    known_keys(block, &["type", "id", "name", "input", "cache_control"], at)?;
    let input = match block.get("input") {
        Some(v @ Value::Object(_)) => v.to_string(),
        _ => {
            return Err(invalid(
                format!("{at}.input"),
                format!("{at}.input must be an object"),
            ))
        }
    };
    Ok(ToolCall {
        id: string_at(block, "id", at)?,
        kind: "function".into(),
        function: FunctionCall {
            name: string_at(block, "name", at)?,
            arguments: input,
        },
    })
}

fn tool_result(block: &Map<String, Value>, at: &str) -> Result<ChatMessage> {
    known_keys(
        block,
        &[
            "type",
            "tool_use_id",
            "content",
            "is_error",
            "cache_control",
        ],
        at,
    )?;
    let content = match block.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(blocks)) => text_blocks(blocks, &format!("{at}.content"))?,
        Some(_) => {
            return Err(invalid(
                format!("{at}.content"),
                format!("{at}.content must be a string or a list of text blocks"),
            ))
        }
    };
    let content = match block.get("is_error") {
        Some(Value::Bool(true)) => format!("Error: {content}"),
        _ => content,
    };
    Ok(ChatMessage {
        role: "tool".into(),
        content,
        tool_calls: Vec::new(),
        tool_call_id: Some(string_at(block, "tool_use_id", at)?),
    })
}

/// A client tool (`{name, description, input_schema}`) in the engine's shape.
fn tool(i: usize, t: &Value) -> Result<Tool> {
    let at = format!("tools[{i}]");
    let obj = object(t, &at)?;
    match obj.get("type") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "custom" => {}
        Some(other) => {
            return Err(invalid(
                format!("{at}.type"),
                format!("{at}.type is {other}; only client tools (type \"custom\" or absent) are supported, not Anthropic's server tools"),
            ))
        }
    }
    known_keys(
        obj,
        &[
            "type",
            "name",
            "description",
            "input_schema",
            "strict",
            "cache_control",
        ],
        &at,
    )?;
    let parameters = match obj.get("input_schema") {
        Some(s @ Value::Object(_)) => s.clone(),
        _ => {
            return Err(invalid(
                format!("{at}.input_schema"),
                format!("{at}.input_schema must be a JSON Schema object"),
            ))
        }
    };
    let description = match obj.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(invalid(
                format!("{at}.description"),
                format!("{at}.description must be a string"),
            ))
        }
    };
    Ok(Tool {
        kind: "function".into(),
        function: FunctionDef {
            name: string_at(obj, "name", &at)?,
            description,
            parameters: Some(parameters),
            strict: obj.get("strict").and_then(Value::as_bool),
        },
    })
}

/// `tool_choice` (`auto`, `any`, `tool` with a name, `none`) and whether several calls may be
/// made at once: only when the client says `disable_parallel_tool_use: false`, as on `/v1`
/// (small models asked for "one or more" calls tend to repeat one).
fn tool_choice(v: &Value) -> Result<(ToolChoice, bool)> {
    let obj = object(v, "tool_choice")?;
    known_keys(
        obj,
        &["type", "name", "disable_parallel_tool_use"],
        "tool_choice",
    )?;
    let parallel = obj.get("disable_parallel_tool_use") == Some(&Value::Bool(false));
    let choice = match obj.get("type").and_then(Value::as_str) {
        Some("auto") => ToolChoice::Auto,
        Some("any") => ToolChoice::Required,
        Some("none") => ToolChoice::None,
        Some("tool") => ToolChoice::Function(string_at(obj, "name", "tool_choice")?),
        other => {
            return Err(invalid(
                "tool_choice.type",
                format!("tool_choice.type is {other:?}; it must be auto, any, tool or none"),
            ))
        }
    };
    Ok((choice, parallel))
}

/// `output_config.format` (`{"type": "json_schema", "schema": {...}}`) as the engine's schema;
/// `effort` is accepted and has no meaning for these models.
fn output_schema(v: &Value) -> Result<Option<Value>> {
    let obj = object(v, "output_config")?;
    known_keys(obj, &["format", "effort"], "output_config")?;
    let format = match obj.get("format") {
        None | Some(Value::Null) => return Ok(None),
        Some(f) => object(f, "output_config.format")?,
    };
    known_keys(format, &["type", "schema"], "output_config.format")?;
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Err(invalid(
            "output_config.format.type",
            "output_config.format.type must be json_schema",
        ));
    }
    let Some(schema @ Value::Object(_)) = format.get("schema") else {
        return Err(invalid(
            "output_config.format.schema",
            "output_config.format.schema must be a JSON Schema object",
        ));
    };
    llorch_wire::schema::check(schema, false).map_err(|e| {
        invalid(
            "output_config.format.schema",
            format!("output_config.format.schema cannot be enforced {e}"),
        )
    })?;
    Ok(Some(schema.clone()))
}

impl MessagesRequest {
    /// The engine request, with `max_tokens` as given (count_tokens has none: the caller
    /// sets it).
    pub(super) fn into_engine(self) -> Result<GenerateRequest> {
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = &self.system {
            let text = system_message(system)?;
            if !text.is_empty() {
                messages.push(ChatMessage::new("system", text));
            }
        }
        if self.messages.is_empty() {
            return Err(invalid(
                "messages",
                "messages must hold at least one message",
            ));
        }
        for (i, m) in self.messages.iter().enumerate() {
            message(i, m, &mut messages)?;
        }
        let tools = self
            .tools
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<Vec<_>>>()?;
        let (choice, parallel) = match &self.tool_choice {
            Some(c) => {
                let (c, p) = tool_choice(c)?;
                (Some(c), p)
            }
            None => (None, false),
        };
        let json_schema = match &self.output_config {
            Some(c) => output_schema(c)?,
            None => None,
        };
        let sampling = Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            stop: self.stop_sequences.unwrap_or_default(),
            ..Sampling::default()
        };
        Ok(GenerateRequest {
            max_tokens: self.max_tokens,
            tools,
            tool_choice: choice,
            parallel_tool_calls: parallel,
            json_schema,
            ..GenerateRequest::chat(messages)
        }
        .with_sampling(sampling))
    }
}

/// The engine's names of fields, as this surface calls them (an engine-side check names the
/// engine's field: `stop` is `stop_sequences` here, a tool's `function.parameters` its
/// `input_schema`).
pub(super) fn rename_field(mut e: ErrorBody) -> ErrorBody {
    let Some(field) = e.field.take() else {
        return e;
    };
    let renamed = if field == "stop" || field.starts_with("stop[") {
        field.replacen("stop", "stop_sequences", 1)
    } else if field.starts_with("tools[") {
        field
            .replacen(".function.parameters", ".input_schema", 1)
            .replacen(".function.", ".", 1)
    } else if field == "json_schema" {
        "output_config.format.schema".to_string()
    } else {
        field
    };
    e.field = Some(renamed);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engine(body: Value) -> Result<GenerateRequest> {
        llorch_wire::json::from_value::<MessagesRequest>(&body)?.into_engine()
    }

    #[test]
    fn blocks_become_chat_messages_in_order() {
        let e = engine(json!({
            "model": "m", "max_tokens": 8,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
                    {"type": "text", "text": "And tomorrow?"}
                ]}
            ],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
            "stop_sequences": ["END"], "top_k": 5
        }))
        .unwrap();
        let m = e.messages.as_ref().unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        assert_eq!(m[2].content, "Checking.");
        assert_eq!(m[2].tool_calls[0].function.arguments, r#"{"city":"Paris"}"#);
        assert_eq!(m[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(m[3].content, "sunny");
        assert_eq!(e.tool_choice, Some(ToolChoice::Required));
        assert!(!e.parallel_tool_calls);
        assert_eq!(e.stop, ["END"]);
        assert_eq!(e.top_k, Some(5));
        assert_eq!(e.max_tokens, Some(8));
        assert!(e.validate().is_ok());
    }

    #[test]
    fn refusals_name_the_block_at_fault() {
        let field = |body: Value| engine(body).unwrap_err().field.unwrap();
        let with = |content: Value| json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": content}]});
        assert_eq!(
            field(with(json!([{"type": "image", "source": {}}]))),
            "messages[0].content[0].type"
        );
        assert_eq!(
            field(with(json!([{"type": "text"}]))),
            "messages[0].content[0].text"
        );
        assert_eq!(
            field(with(
                json!([{"type": "tool_use", "id": "a", "name": "f", "input": {}}])
            )),
            "messages[0].content[0].type"
        );
        assert_eq!(
            field(json!({"model": "m", "messages": [{"role": "system", "content": "x"}]})),
            "messages[0].role"
        );
        assert_eq!(
            field(json!({"model": "m", "messages": [], "max_tokens": 1})),
            "messages"
        );
        assert_eq!(
            field(
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "web_search_20250305", "name": "s"}]})
            ),
            "tools[0].type"
        );
        assert_eq!(
            field(
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                "tool_choice": {"type": "tool"}})
            ),
            "tool_choice.name"
        );
        assert_eq!(
            field(
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                "output_config": {"format": {"type": "json_schema", "schema": {"type": "object", "x-unknown": 1, "$ref": "http://x"}}}})
            ),
            "output_config.format.schema"
        );
        let err = llorch_wire::json::from_value::<MessagesRequest>(
            &json!({"model": "m", "messages": [], "container": "c"}),
        )
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("container"));
    }

    #[test]
    fn engine_fields_are_renamed_to_this_surface() {
        let e = ErrorBody::invalid("tools[1].function.parameters", "bad");
        assert_eq!(
            rename_field(e).field.as_deref(),
            Some("tools[1].input_schema")
        );
        let e = ErrorBody::invalid("stop", "too many");
        assert_eq!(rename_field(e).field.as_deref(), Some("stop_sequences"));
        let e = ErrorBody::invalid("tools[0].function.name", "bad");
        assert_eq!(rename_field(e).field.as_deref(), Some("tools[0].name"));
    }
}
