//! Tool calling, in OpenAI's shapes: the tools a request offers, how the model may use them
//! (`tool_choice`), the calls an answer makes, and the two ways a call is read from the
//! model's text.
//!
//! - Forced calls (`tool_choice` `required` or a named function): the engine constrains the
//!   answer with a grammar built from [`call_schema`], so the text is exactly one JSON object
//!   `{"name": ..., "arguments": {...}}` (or, with `parallel_tool_calls: true` and `required`, a
//!   list of them), whatever the model. [`parse_forced`] reads it.
//! - `auto`, on a model whose chat template takes `tools`: the model answers freely and calls a
//!   tool the way such templates teach it, `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
//!   (the Hermes format of Qwen, Hermes, SmolLM3 and others). [`parse_tagged`] reads those.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Value};

/// Tools one request may offer at most.
pub const MAX_TOOLS: usize = 128;
/// Calls one answer may make at most with `parallel_tool_calls`.
pub const MAX_PARALLEL_CALLS: u64 = 8;

/// One tool of a request: `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionDef,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionDef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON Schema of the arguments object; absent means any object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Refuse parameter keywords the grammar cannot enforce (see [`crate::schema`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// One call an assistant message makes: `{"id", "type": "function", "function": {"name",
/// "arguments"}}`, `arguments` being JSON text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    /// The arguments as a JSON object, for the surfaces that send them as one (Anthropic's
    /// `input`, Ollama's `arguments`); `{}` when the text is not an object.
    pub fn arguments_object(&self) -> Value {
        serde_json::from_str(&self.function.arguments)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}))
    }
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or
/// `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Function(String),
}

impl ToolChoice {
    /// Whether the answer must be a call, enforced by a grammar.
    pub fn forced(&self) -> bool {
        matches!(self, Self::Required | Self::Function(_))
    }
}

impl Serialize for ToolChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::None => s.serialize_str("none"),
            Self::Auto => s.serialize_str("auto"),
            Self::Required => s.serialize_str("required"),
            Self::Function(name) => {
                json!({"type": "function", "function": {"name": name}}).serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        match &v {
            Value::String(s) => match s.as_str() {
                "none" => Ok(Self::None),
                "auto" => Ok(Self::Auto),
                "required" => Ok(Self::Required),
                other => Err(D::Error::custom(format!(
                    "tool_choice {other:?} is not one of none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
                ))),
            },
            Value::Object(o) => {
                let name = o
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str);
                match (o.get("type").and_then(Value::as_str), name) {
                    (Some("function"), Some(name)) => Ok(Self::Function(name.to_string())),
                    _ => Err(D::Error::custom(
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )),
                }
            }
            _ => Err(D::Error::custom(
                "tool_choice must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )),
        }
    }
}

/// Whether `name` is a valid function name (OpenAI's rule: 1 to 64 letters, digits, `_`, `-`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The JSON Schema of a forced answer: one call of the named tool, one call of any tool, or
/// (with `parallel`) a list of 1 to [`MAX_PARALLEL_CALLS`] calls. `name` comes before
/// `arguments`, so the model chooses the function first.
pub fn call_schema(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Value {
    let call = |t: &Tool| {
        json!({
            "type": "object",
            "properties": {
                "name": {"const": t.function.name},
                "arguments": t.function.parameters.clone().unwrap_or_else(|| json!({"type": "object"})),
            },
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    let one = match choice {
        ToolChoice::Function(name) => tools
            .iter()
            .find(|t| &t.function.name == name)
            .map(call)
            .unwrap_or_else(|| json!({"type": "object"})),
        _ if tools.len() == 1 => call(&tools[0]),
        _ => json!({"anyOf": tools.iter().map(call).collect::<Vec<_>>()}),
    };
    if parallel && matches!(choice, ToolChoice::Required) {
        json!({"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS})
    } else {
        one
    }
}

/// The system prompt that describes the tools to a model whose template does not take them
/// (the grammar does the rest): for forced calls, answer with the call; for `auto`, answer
/// with one call or in plain text.
pub fn generic_prompt(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> String {
    let list: Vec<Value> = tools
        .iter()
        .filter(|t| match choice {
            ToolChoice::Function(name) => &t.function.name == name,
            _ => true,
        })
        .map(|t| {
            json!({
                "name": t.function.name,
                "description": t.function.description,
                "parameters": t.function.parameters,
            })
        })
        .collect();
    let shape = if parallel && matches!(choice, ToolChoice::Required) {
        "a JSON list of one or more objects {\"name\": <function name>, \"arguments\": <arguments object>}"
    } else {
        "one JSON object {\"name\": <function name>, \"arguments\": <arguments object>}"
    };
    let list = serde_json::to_string_pretty(&list).expect("values serialize");
    if *choice == ToolChoice::Auto {
        // Each function as what it does and an example call (its required arguments filled
        // with placeholders): the request it serves next to the call's shape.
        let each: Vec<String> = tools
            .iter()
            .map(|t| {
                let call = json!({"name": t.function.name, "arguments": example_arguments(t)});
                match t.function.description.as_deref().filter(|d| !d.is_empty()) {
                    Some(d) => format!("- {d}: {call}"),
                    None => format!("- {}: {call}", t.function.name),
                }
            })
            .collect();
        return format!(
            "You can call these functions:\n{list}\nWhen the user asks for one of these, answer with the call as one JSON object, and nothing else:\n{}\nOtherwise answer in plain text.",
            each.join("\n")
        );
    }
    format!("You can call these functions:\n{list}\nCall a function by answering with {shape}, and nothing else.")
}

/// A function's arguments for an example call: each required property with a placeholder of
/// its type (the first of an `enum`).
fn example_arguments(t: &Tool) -> Value {
    let params = t.function.parameters.as_ref();
    let props = params
        .and_then(|p| p.get("properties"))
        .and_then(Value::as_object);
    let required = params
        .and_then(|p| p.get("required"))
        .and_then(Value::as_array);
    let mut out = serde_json::Map::new();
    for name in required.into_iter().flatten().filter_map(Value::as_str) {
        let schema = props.and_then(|p| p.get(name));
        let value = match schema {
            Some(s)
                if s.get("enum")
                    .and_then(Value::as_array)
                    .is_some_and(|e| !e.is_empty()) =>
            {
                s["enum"][0].clone()
            }
            Some(s) => match s.get("type").and_then(Value::as_str) {
                Some("integer" | "number") => json!(1),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                _ => json!("..."),
            },
            None => json!("..."),
        };
        out.insert(name.to_string(), value);
    }
    Value::Object(out)
}

/// The rule a call grammar's `root` becomes in [`auto_grammar`].
const AUTO_CALL: &str = "llorch-call";

/// The grammar of an `auto` answer on a template without tool support: `call_gbnf` (one call,
/// from [`call_schema`] through llama.cpp's JSON Schema converter, its start rule `root`) or
/// plain text that does not start with `{` or white space. The first character is the model's
/// choice; the answer is then either a whole call or text, and [`parse_auto`] reads it back.
pub fn auto_grammar(call_gbnf: &str) -> String {
    let mut out = String::with_capacity(call_gbnf.len() + 128);
    out.push_str("root ::= llorch-call | llorch-text\n");
    out.push_str("llorch-text ::= [^{ \\t\\r\\n] [^\\x00]*\n");
    for line in call_gbnf.lines() {
        match line.trim_start().strip_prefix("root") {
            Some(rest) if rest.trim_start().starts_with("::=") => {
                out.push_str(AUTO_CALL);
                out.push_str(rest);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The calls of an `auto` answer from a model without tool support: a whole JSON call object
/// `{"name": …, "arguments": …}` (the shape [`auto_grammar`] enforces), or the sentence its
/// history shows earlier calls as, `I will call name({…}).` ([`calls_as_text`]; a model shown
/// its earlier calls that way answers the next one the same way). `None` for anything else,
/// which is text.
pub fn parse_auto(text: &str) -> Option<Vec<ToolCall>> {
    let t = text.trim();
    if t.starts_with('{') {
        let v: Value = serde_json::from_str(t).ok()?;
        let o = v.as_object()?;
        // Only a call's keys: an answer that happens to be other JSON stays text.
        if !o.get("name")?.as_str().is_some_and(valid_name)
            || o.keys().any(|k| k != "name" && k != "arguments")
        {
            return None;
        }
        return Some(vec![to_call(&v)?]);
    }
    parse_said(t)
}

/// `I will call a({…}) and b({…}).`: each name must be a function name and each argument an
/// object, or it is not a call.
fn parse_said(text: &str) -> Option<Vec<ToolCall>> {
    let mut rest = text.strip_prefix("I will call ")?.strip_suffix('.')?;
    let mut calls = Vec::new();
    loop {
        let (name, after) = rest.split_once('(')?;
        if !valid_name(name) {
            return None;
        }
        let mut values = serde_json::Deserializer::from_str(after).into_iter::<Value>();
        let arguments = values.next()?.ok()?;
        if !arguments.is_object() {
            return None;
        }
        let after = after[values.byte_offset()..].strip_prefix(')')?;
        calls.push(to_call(&json!({"name": name, "arguments": arguments}))?);
        if after.is_empty() {
            return Some(calls);
        }
        rest = after.strip_prefix(" and ")?;
    }
}

/// How an assistant's earlier calls appear in the history of a model without tool support: a
/// sentence naming each call and its arguments. (Shown its earlier call as bare JSON, the default
/// model repeats it instead of answering from the result; told in words, it answers.)
pub fn calls_as_text(calls: &[ToolCall]) -> String {
    let each: Vec<String> = calls
        .iter()
        .map(|c| format!("{}({})", c.function.name, c.function.arguments))
        .collect();
    format!("I will call {}.", each.join(" and "))
}

/// A new call id, `call_` and 24 hex digits.
pub fn call_id() -> String {
    use crate::id::random_u64;
    format!("call_{:016x}{:08x}", random_u64(), random_u64() as u32)
}

fn to_call(v: &Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?;
    let arguments = match v.get("arguments") {
        None => "{}".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ToolCall {
        id: call_id(),
        kind: "function".into(),
        function: FunctionCall {
            name: name.to_string(),
            arguments,
        },
    })
}

/// The calls of a forced answer (one object or a list of them); `None` when the text is not
/// that (cut short by `max_tokens`, say).
pub fn parse_forced(text: &str) -> Option<Vec<ToolCall>> {
    match serde_json::from_str::<Value>(text.trim()).ok()? {
        Value::Array(items) if !items.is_empty() => items.iter().map(to_call).collect(),
        v @ Value::Object(_) => Some(vec![to_call(&v)?]),
        _ => None,
    }
}

/// The `<tool_call>{...}</tool_call>` blocks of a free answer, and the text outside them
/// (trimmed). No blocks: no calls, and the text unchanged.
pub fn parse_tagged(text: &str) -> (Vec<ToolCall>, String) {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut calls = Vec::new();
    let mut rest = String::new();
    let mut s = text;
    while let Some(start) = s.find(OPEN) {
        let body = &s[start + OPEN.len()..];
        let (inner, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        match serde_json::from_str::<Value>(inner.trim())
            .ok()
            .as_ref()
            .and_then(to_call)
        {
            Some(call) => {
                rest.push_str(&s[..start]);
                calls.push(call);
            }
            // Not a call after all: keep the text as it was.
            None => rest.push_str(&s[..start + OPEN.len() + inner.len()]),
        }
        s = after;
    }
    rest.push_str(s);
    if calls.is_empty() {
        return (calls, text.to_string());
    }
    (calls, rest.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(name: &str, parameters: Value) -> Tool {
        Tool {
            kind: "function".into(),
            function: FunctionDef {
                name: name.into(),
                description: None,
                parameters: Some(parameters),
                strict: None,
            },
        }
    }

    #[test]
    fn auto_answers_are_a_whole_call_or_text() {
        let calls =
            parse_auto(" {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}")
                .unwrap();
        assert_eq!(calls[0].function.name, "get_weather");
        assert_eq!(calls[0].function.arguments, r#"{"city":"Paris"}"#);
        // The sentence of the history, read back: what calls_as_text writes.
        let said = parse_auto(
            r#"I will call get_weather({"city": "Paris"}) and get_time({"zone": "CET"})."#,
        )
        .unwrap();
        assert_eq!(
            said.iter()
                .map(|c| c.function.name.as_str())
                .collect::<Vec<_>>(),
            ["get_weather", "get_time"]
        );
        assert_eq!(said[1].function.arguments, r#"{"zone":"CET"}"#);
        let round = calls_as_text(&said);
        assert_eq!(parse_auto(&round).unwrap().len(), 2, "{round}");
        for text in [
            "Hello! How can I help?",
            "{\"name\": \"bad name\", \"arguments\": {}}",
            "{\"name\": \"f\", \"arguments\": {}, \"also\": 1}",
            "{\"answer\": 42}",
            "{\"name\": \"f\", \"arguments\": {",
            "I will call you tomorrow.",
            "I will call get_weather(Paris).",
            "I will call get_weather({\"city\": \"Paris\"}) now.",
            "I will call bad name({}).",
        ] {
            assert!(parse_auto(text).is_none(), "{text}");
        }
    }

    #[test]
    fn the_auto_grammar_offers_the_call_or_text() {
        let g = auto_grammar("root ::= \"{\" space \"}\"\nspace ::= \" \"?\n");
        assert!(g.starts_with("root ::= llorch-call | llorch-text\n"), "{g}");
        assert!(g.contains("\nllorch-call ::= \"{\" space \"}\"\n"), "{g}");
        assert!(g.contains("\nspace ::= \" \"?\n"), "{g}");
        assert_eq!(g.matches("root ::=").count(), 1, "{g}");
        crate::gbnf::check(&g).unwrap();
    }

    #[test]
    fn tool_choice_reads_and_writes_openais_forms() {
        for (text, choice) in [
            (r#""none""#, ToolChoice::None),
            (r#""auto""#, ToolChoice::Auto),
            (r#""required""#, ToolChoice::Required),
            (
                r#"{"type":"function","function":{"name":"f"}}"#,
                ToolChoice::Function("f".into()),
            ),
        ] {
            let parsed: ToolChoice = serde_json::from_str(text).unwrap();
            assert_eq!(parsed, choice);
            assert_eq!(serde_json::to_string(&parsed).unwrap(), text);
        }
        assert!(serde_json::from_str::<ToolChoice>(r#""sometimes""#).is_err());
        assert!(serde_json::from_str::<ToolChoice>(r#"{"type":"function"}"#).is_err());
    }

    #[test]
    fn forced_schemas_put_the_name_first_and_accept_only_offered_tools() {
        let tools = [
            tool(
                "weather",
                json!({"type": "object", "properties": {"city": {"type": "string"}}}),
            ),
            tool("time", json!({"type": "object"})),
        ];
        let s = call_schema(&tools, &ToolChoice::Function("time".into()), true);
        assert_eq!(s["properties"]["name"]["const"], "time");
        let keys: Vec<&String> = s["properties"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "arguments"]);
        let s = call_schema(&tools, &ToolChoice::Required, false);
        assert_eq!(s["anyOf"].as_array().unwrap().len(), 2);
        let s = call_schema(&tools, &ToolChoice::Required, true);
        assert_eq!(s["type"], "array");
        crate::schema::check(&s, true).unwrap();
    }

    #[test]
    fn forced_and_tagged_answers_parse_into_calls() {
        let calls =
            parse_forced(r#" {"name": "weather", "arguments": {"city": "Paris"}} "#).unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].function.name, "weather");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].function.arguments).unwrap(),
            json!({"city": "Paris"})
        );
        assert!(calls[0].id.starts_with("call_") && calls[0].id.len() == 29);
        assert_eq!(
            parse_forced(r#"[{"name":"a","arguments":{}},{"name":"b","arguments":{}}]"#)
                .unwrap()
                .len(),
            2
        );
        assert!(parse_forced(r#"{"name": "weather", "argu"#).is_none());

        let (calls, rest) = parse_tagged(
            "Let me look.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
        );
        assert_eq!(calls.len(), 1);
        assert_eq!(rest, "Let me look.");
        let (calls, rest) = parse_tagged("plain <tool_call> not json </tool_call> text");
        assert!(calls.is_empty());
        assert_eq!(rest, "plain <tool_call> not json </tool_call> text");
    }

    #[test]
    fn earlier_calls_render_as_a_sentence() {
        let call = ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
        };
        let text = calls_as_text(&[call.clone(), call]);
        assert_eq!(
            text,
            r#"I will call weather({"city":"Paris"}) and weather({"city":"Paris"})."#
        );
    }
}
