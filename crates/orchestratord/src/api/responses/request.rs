//! OpenAI Responses request bodies and the engine request they become: `input` as a string or
//! items (messages, `function_call`, `function_call_output`), `instructions`, function `tools`,
//! `tool_choice`, `text.format`, sampling. Items are read from the JSON value by hand so that
//! every refusal names the item at fault (`input[2].call_id`). Nothing here runs a task.

use llorch_wire::engine::{ChatMessage, GenerateRequest};
use llorch_wire::sampling::Sampling;
use llorch_wire::tools::{FunctionCall, FunctionDef, Tool, ToolCall, ToolChoice};
use llorch_wire::ErrorBody;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::fields::{invalid, known_keys, object, optional_string_at, string_at};

type Result<T> = std::result::Result<T, ErrorBody>;

/// The body of `POST /v1/responses`. Unknown fields are refused by name; fields for OpenAI's
/// hosted features (`background`, `conversation`, `prompt`) are refused with what to do instead.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateResponse {
    pub(super) model: String,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    pub(super) instructions: Option<String>,
    #[serde(default)]
    pub(super) max_output_tokens: Option<u32>,
    #[serde(default)]
    pub(super) temperature: Option<f32>,
    #[serde(default)]
    pub(super) top_p: Option<f32>,
    #[serde(default)]
    pub(super) tools: Option<Vec<Value>>,
    #[serde(default)]
    pub(super) tool_choice: Option<Value>,
    #[serde(default)]
    pub(super) parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub(super) text: Option<Value>,
    #[serde(default)]
    pub(super) stream: Option<bool>,
    #[serde(default)]
    pub(super) store: Option<bool>,
    #[serde(default)]
    pub(super) previous_response_id: Option<String>,
    #[serde(default)]
    pub(super) metadata: Option<Map<String, Value>>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    #[serde(default)]
    background: Option<bool>,
    #[serde(default)]
    conversation: Option<Value>,
    #[serde(default)]
    prompt: Option<Value>,
    #[serde(default)]
    truncation: Option<String>,
    // Accepted and not acted on (docs/API.md says why for each).
    #[serde(default)]
    #[allow(dead_code)]
    stream_options: Option<Value>,
    #[serde(default)]
    #[allow(dead_code)]
    include: Option<Vec<String>>,
    #[serde(default)]
    #[allow(dead_code)]
    reasoning: Option<Value>,
    #[serde(default)]
    pub(super) user: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    safety_identifier: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    prompt_cache_key: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    prompt_cache_retention: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    service_tier: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    max_tool_calls: Option<u32>,
}

#[derive(Debug)]
/// What a request asks for, once read: the engine request, and the messages of this turn
/// (its input, without `instructions`) that a stored response keeps for the next turn.
pub(super) struct Turn {
    pub(super) engine: GenerateRequest,
    pub(super) input: Vec<ChatMessage>,
    /// `text.format` as it is echoed in the response.
    pub(super) format: Value,
    /// The tools as they are echoed in the response (Responses' flat shape).
    pub(super) tools: Vec<Value>,
}

const MESSAGE_KEYS: &[&str] = &["type", "role", "content", "id", "status", "phase"];

/// The text of a message's content: a string, or parts (`input_text`, `output_text`,
/// `refusal`) joined by newlines.
fn content_text(content: Option<&Value>, at: &str) -> Result<String> {
    let parts = match content {
        Some(Value::String(s)) => return Ok(s.clone()),
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(invalid(
                format!("{at}.content"),
                format!("{at}.content must be a string or a list of content parts"),
            ))
        }
        None => {
            return Err(invalid(
                format!("{at}.content"),
                format!("{at}.content: field required"),
            ))
        }
    };
    let mut texts = Vec::with_capacity(parts.len());
    for (j, p) in parts.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        let part = object(p, &at)?;
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text") => {
                known_keys(part, &["type", "text", "annotations", "logprobs"], &at)?;
                texts.push(string_at(part, "text", &at)?);
            }
            Some("refusal") => {
                known_keys(part, &["type", "refusal"], &at)?;
                texts.push(string_at(part, "refusal", &at)?);
            }
            other => {
                return Err(invalid(
                    format!("{at}.type"),
                    format!("{at}.type is {other:?}; only input_text and output_text parts are supported (images, files and audio are not)"),
                ))
            }
        }
    }
    Ok(texts.join("\n"))
}

fn message_item(obj: &Map<String, Value>, at: &str, out: &mut Vec<ChatMessage>) -> Result<()> {
    known_keys(obj, MESSAGE_KEYS, at)?;
    let role = match string_at(obj, "role", at)?.as_str() {
        "developer" | "system" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(invalid(
                format!("{at}.role"),
                format!("{at}.role is {other:?}; it must be user, assistant, system or developer"),
            ))
        }
    };
    out.push(ChatMessage::new(
        role,
        content_text(obj.get("content"), at)?,
    ));
    Ok(())
}

/// A `function_call` item: a call the assistant made, joined to the assistant message just
/// before it (the model's own turn) or a new one.
fn function_call_item(
    obj: &Map<String, Value>,
    at: &str,
    out: &mut Vec<ChatMessage>,
) -> Result<()> {
    known_keys(
        obj,
        &[
            "type",
            "id",
            "call_id",
            "name",
            "arguments",
            "status",
            "namespace",
        ],
        at,
    )?;
    let arguments = string_at(obj, "arguments", at)?;
    if serde_json::from_str::<Map<String, Value>>(&arguments).is_err() {
        return Err(invalid(
            format!("{at}.arguments"),
            format!("{at}.arguments must be a JSON object in a string"),
        ));
    }
    let call = ToolCall {
        id: string_at(obj, "call_id", at)?,
        kind: "function".into(),
        function: FunctionCall {
            name: string_at(obj, "name", at)?,
            arguments,
        },
    };
    match out.last_mut() {
        Some(m) if m.role == "assistant" => m.tool_calls.push(call),
        _ => out.push(ChatMessage {
            role: "assistant".into(),
            content: String::new(),
            tool_calls: vec![call],
            tool_call_id: None,
        }),
    }
    Ok(())
}

/// A `function_call_output` item: the result of a call, as a `tool` message.
fn function_output_item(obj: &Map<String, Value>, at: &str) -> Result<ChatMessage> {
    known_keys(obj, &["type", "id", "call_id", "output", "status"], at)?;
    let output = match obj.get("output") {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Array(_)) => content_text(Some(v), &format!("{at}.output"))?,
        _ => {
            return Err(invalid(
                format!("{at}.output"),
                format!("{at}.output must be a string or a list of input_text parts"),
            ))
        }
    };
    Ok(ChatMessage {
        role: "tool".into(),
        content: output,
        tool_calls: Vec::new(),
        tool_call_id: Some(string_at(obj, "call_id", at)?),
    })
}

/// `input`: a string (one user message) or a list of items, as chat messages in order.
/// Reasoning items of earlier turns are left out of the prompt.
fn input_messages(input: &Value) -> Result<Vec<ChatMessage>> {
    let items = match input {
        Value::String(s) => return Ok(vec![ChatMessage::new("user", s.clone())]),
        Value::Array(items) => items,
        _ => {
            return Err(invalid(
                "input",
                "input must be a string or a list of input items",
            ))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let obj = object(item, &at)?;
        match obj.get("type").and_then(Value::as_str) {
            None | Some("message") => message_item(obj, &at, &mut out)?,
            Some("function_call") => function_call_item(obj, &at, &mut out)?,
            Some("function_call_output") => out.push(function_output_item(obj, &at)?),
            Some("reasoning") => {}
            Some(other) => {
                return Err(invalid(
                    format!("{at}.type"),
                    format!("{at}.type is {other:?}; the items taken are message, function_call, function_call_output and reasoning (item references need `previous_response_id`)"),
                ))
            }
        }
    }
    Ok(out)
}

/// A function tool (`{type: "function", name, description, parameters, strict}`) in the
/// engine's shape. OpenAI's hosted tools (web search, file search, …) are refused.
fn tool(i: usize, t: &Value) -> Result<Tool> {
    let at = format!("tools[{i}]");
    let obj = object(t, &at)?;
    if obj.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid(
            format!("{at}.type"),
            format!(
                "{at}.type is {}; only function tools are supported, not OpenAI's hosted tools",
                obj.get("type").unwrap_or(&Value::Null)
            ),
        ));
    }
    known_keys(
        obj,
        &["type", "name", "description", "parameters", "strict"],
        &at,
    )?;
    let parameters = match obj.get("parameters") {
        None | Some(Value::Null) => None,
        Some(s @ Value::Object(_)) => Some(s.clone()),
        Some(_) => {
            return Err(invalid(
                format!("{at}.parameters"),
                format!("{at}.parameters must be a JSON Schema object"),
            ))
        }
    };
    Ok(Tool {
        kind: "function".into(),
        function: FunctionDef {
            name: string_at(obj, "name", &at)?,
            description: optional_string_at(obj, "description", &at)?,
            parameters,
            strict: obj.get("strict").and_then(Value::as_bool),
        },
    })
}

/// `tool_choice`: `none`, `auto`, `required`, or `{type: "function", name}`.
fn tool_choice(v: &Value) -> Result<ToolChoice> {
    match v {
        Value::String(s) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => Err(invalid(
                "tool_choice",
                format!("tool_choice is {other:?}; it must be none, auto, required or {{\"type\": \"function\", \"name\": …}}"),
            )),
        },
        Value::Object(obj) => {
            if obj.get("type").and_then(Value::as_str) != Some("function") {
                return Err(invalid(
                    "tool_choice.type",
                    "tool_choice.type must be function (allowed_tools and hosted tools are not supported)",
                ));
            }
            known_keys(obj, &["type", "name"], "tool_choice")?;
            Ok(ToolChoice::Function(string_at(obj, "name", "tool_choice")?))
        }
        _ => Err(invalid(
            "tool_choice",
            "tool_choice must be a string or an object",
        )),
    }
}

/// `text.format` as the engine's JSON Schema and strictness, checked by the same code as
/// `/v1/chat/completions`' `response_format` (refusals name `text.format…`).
fn text_format(text: &Value) -> Result<(Option<Value>, bool, Value)> {
    let obj = object(text, "text")?;
    known_keys(obj, &["format", "verbosity"], "text")?;
    let Some(format) = obj.get("format").filter(|f| !f.is_null()) else {
        return Ok((None, false, json!({"type": "text"})));
    };
    let f = object(format, "text.format")?;
    known_keys(
        f,
        &["type", "name", "schema", "strict", "description"],
        "text.format",
    )?;
    // Chat's shape: `{type, json_schema: {name, schema, strict}}`.
    let mut chat = json!({"type": f.get("type")});
    if f.get("type").and_then(Value::as_str) == Some("json_schema") {
        let mut js = f.clone();
        js.remove("type");
        chat["json_schema"] = Value::Object(js);
    }
    let (schema, strict) = crate::api::openai::response_format(&chat).map_err(|e| {
        let mut body = e.body;
        body.field = body
            .field
            .map(|p| p.replacen("response_format.json_schema", "text.format", 1))
            .map(|p| p.replacen("response_format", "text.format", 1));
        body.message = body
            .message
            .replacen("response_format.json_schema", "text.format", 1)
            .replacen(
                "response_format of type json_schema",
                "text.format of type json_schema",
                1,
            )
            .replacen("response_format", "text.format", 1);
        body
    })?;
    Ok((schema, strict, format.clone()))
}

/// `metadata` as OpenAI bounds it (it is echoed and stored): at most 16 pairs, keys of at most
/// 64 characters, string values of at most 512.
fn check_metadata(metadata: &Map<String, Value>) -> Result<()> {
    if metadata.len() > 16 {
        return Err(invalid(
            "metadata",
            format!("metadata has {} keys; at most 16", metadata.len()),
        ));
    }
    for (k, v) in metadata {
        let at = format!("metadata.{k}");
        match v {
            _ if k.chars().count() > 64 => {
                return Err(invalid(at, "a metadata key is at most 64 characters"))
            }
            Value::String(s) if s.chars().count() <= 512 => {}
            _ => {
                return Err(invalid(
                    at,
                    "a metadata value is a string of at most 512 characters",
                ))
            }
        }
    }
    Ok(())
}

/// Refuses what asks for OpenAI's hosted features, naming the field and what to do instead.
fn refuse_hosted(req: &CreateResponse) -> Result<()> {
    if let Some(m) = &req.metadata {
        check_metadata(m)?;
    }
    if req.background == Some(true) {
        return Err(invalid(
            "background",
            "background: true is not supported; stream the response (stream: true) or wait for it",
        ));
    }
    if req.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(invalid(
            "conversation",
            "conversation objects are not supported; chain turns with previous_response_id",
        ));
    }
    if req.prompt.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(invalid(
            "prompt",
            "stored prompt templates are not supported; send instructions and input",
        ));
    }
    if req.top_logprobs.is_some_and(|n| n > 0) {
        return Err(invalid(
            "top_logprobs",
            "top_logprobs is not supported on /v1/responses; /v1/chat/completions returns log-probabilities",
        ));
    }
    match req.truncation.as_deref() {
        None | Some("disabled" | "auto") => Ok(()),
        Some(other) => Err(invalid(
            "truncation",
            format!("truncation is {other:?}; it must be auto or disabled"),
        )),
    }
}

impl CreateResponse {
    /// The engine request for this turn after `history` (the stored conversation of
    /// `previous_response_id`, empty without one). `instructions` are not carried from earlier
    /// turns, as OpenAI documents.
    pub(super) fn turn(&self, history: &[ChatMessage], max_tokens: u32) -> Result<Turn> {
        refuse_hosted(self)?;
        let input = match &self.input {
            Some(v) => input_messages(v)?,
            None => Vec::new(),
        };
        if input.is_empty() && history.is_empty() {
            return Err(invalid(
                "input",
                "input must hold at least one message (a string, or a list of items)",
            ));
        }
        let mut messages = Vec::with_capacity(history.len() + input.len() + 1);
        if let Some(text) = self.instructions.as_deref().filter(|t| !t.is_empty()) {
            messages.push(ChatMessage::new("system", text));
        }
        messages.extend_from_slice(history);
        messages.extend_from_slice(&input);
        let tools = self
            .tools
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<Vec<_>>>()?;
        let echoed = tools
            .iter()
            .map(|t| {
                json!({"type": "function", "name": t.function.name,
                    "description": t.function.description, "parameters": t.function.parameters,
                    "strict": t.function.strict})
            })
            .collect();
        let choice = self.tool_choice.as_ref().map(tool_choice).transpose()?;
        let (json_schema, json_schema_strict, format) = match &self.text {
            Some(t) => text_format(t)?,
            None => (None, false, json!({"type": "text"})),
        };
        let sampling = Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            ..Sampling::default()
        };
        let engine = GenerateRequest {
            max_tokens: Some(max_tokens),
            tools,
            tool_choice: choice,
            // As on /v1/chat/completions: one call unless the client asks for more.
            parallel_tool_calls: self.parallel_tool_calls == Some(true),
            json_schema,
            json_schema_strict,
            ..GenerateRequest::chat(messages)
        }
        .with_sampling(sampling);
        Ok(Turn {
            engine,
            input,
            format,
            tools: echoed,
        })
    }
}

/// The engine's names of fields, as this surface calls them.
pub(super) fn rename_field(mut e: ErrorBody) -> ErrorBody {
    let Some(field) = e.field.take() else {
        return e;
    };
    let renamed = if field == "max_tokens" {
        "max_output_tokens".to_string()
    } else if field.starts_with("tools[") {
        field.replacen(".function.", ".", 1)
    } else if field == "json_schema" {
        "text.format.schema".to_string()
    } else {
        field
    };
    e.field = Some(renamed);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: Value) -> Result<Turn> {
        llorch_wire::json::from_value::<CreateResponse>(&body)?.turn(&[], 16)
    }

    #[test]
    fn items_become_chat_messages_in_order() {
        let t = read(json!({
            "model": "m", "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Use tools."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
            ],
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}}
        }))
        .unwrap();
        let m = t.engine.messages.as_ref().unwrap();
        let roles: Vec<&str> = m.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "system", "user", "assistant", "tool"]);
        assert_eq!(m[3].tool_calls[0].id, "call_1");
        assert_eq!(m[4].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(
            t.input.len(),
            4,
            "instructions are not part of the stored turn"
        );
        assert_eq!(
            t.engine.tool_choice,
            Some(ToolChoice::Function("get_weather".into()))
        );
        assert_eq!(t.engine.json_schema, Some(json!({"type": "object"})));
        assert_eq!(t.format["name"], "w");
        // A forced call and a response schema are one grammar too many: the engine says so.
        assert!(t.engine.validate().is_err());
    }

    #[test]
    fn refusals_name_the_item_at_fault() {
        let field = |body: Value| read(body).unwrap_err().field.unwrap();
        let with = |input: Value| json!({"model": "m", "input": input});
        assert_eq!(
            field(with(
                json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])
            )),
            "input[0].content[0].type"
        );
        assert_eq!(
            field(with(
                json!([{"type": "function_call_output", "output": "x"}])
            )),
            "input[0].call_id"
        );
        assert_eq!(
            field(with(
                json!([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}])
            )),
            "input[0].arguments"
        );
        assert_eq!(
            field(with(json!([{"type": "item_reference", "id": "x"}]))),
            "input[0].type"
        );
        assert_eq!(field(with(json!([]))), "input");
        assert_eq!(
            field(json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]})),
            "tools[0].type"
        );
        assert_eq!(
            field(
                json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}})
            ),
            "text.format.name"
        );
        assert_eq!(
            field(json!({"model": "m", "input": "x", "background": true})),
            "background"
        );
        assert_eq!(
            field(json!({"model": "m", "input": "x", "metadata": {"k": 1}})),
            "metadata.k"
        );
        let err = llorch_wire::json::from_value::<CreateResponse>(
            &json!({"model": "m", "input": "x", "modalities": ["text"]}),
        )
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("modalities"));
    }

    #[test]
    fn history_comes_after_the_instructions_and_before_the_input() {
        let history = vec![
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello"),
        ];
        let req = llorch_wire::json::from_value::<CreateResponse>(
            &json!({"model": "m", "instructions": "New rules.", "input": "Again?"}),
        )
        .unwrap();
        let t = req.turn(&history, 8).unwrap();
        let m = t.engine.messages.unwrap();
        let texts: Vec<&str> = m.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["New rules.", "Hi", "Hello", "Again?"]);
        // A follow-up may send no input at all (the previous turn is the prompt).
        let req = llorch_wire::json::from_value::<CreateResponse>(&json!({"model": "m"})).unwrap();
        assert!(req.turn(&history, 8).is_ok());
    }
}
