//! Chat prompts: the model's own template (GGUF `tokenizer.chat_template`, Jinja) rendered with
//! minijinja the way transformers' `apply_chat_template` renders it, tools included.
//!
//! - The environment matches transformers': `trim_blocks` and `lstrip_blocks`, loop controls,
//!   Python's string, list and dict methods (`.strip()`, `.items()` ...), `raise_exception`,
//!   `strftime_now`, and a `tojson` that writes what Python's `json.dumps` writes (`", "` and
//!   `": "` separators, keys in their order, no HTML escaping), since tool declarations reach
//!   the model in that shape.
//! - A template is untrusted input (it comes with the model file): rendering runs on fuel, so a
//!   template that loops forever fails instead of hanging the request handler.
//! - A template that takes `tools` (its source uses the variable) gets them and the messages
//!   with `tool_calls` and `tool` roles as they are. A template that does not is still usable,
//!   with every `tool_choice`: the tools are described in a system message
//!   ([`tools::generic_prompt`]; a grammar makes a forced answer a call, and an `auto` answer a
//!   call or plain text), earlier calls appear as a sentence naming them, and tool results as
//!   user messages.

use llorch_wire::engine::ChatMessage;
use llorch_wire::tools::{self, Tool, ToolChoice};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::json;

/// minijinja fuel per render (about one unit per instruction): far above what real templates
/// use on long conversations, far below a render that would hold a request for seconds.
const FUEL: u64 = 5_000_000;
/// The most a render may write: far above any prompt a slot holds (the request body is at most
/// 4 MiB), so a template that writes more (`{% for i in range(100) %}{{ "x" * 100000000 }}…`,
/// a handful of steps) fails instead of filling memory. minijinja bounds each repeated string
/// at 100 MB itself.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;
const NAME: &str = "chat_template";

/// The render's output, refusing to grow past [`MAX_RENDERED_BYTES`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other(format!(
                "the chat template wrote more than {MAX_RENDERED_BYTES} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    /// The template renders `tools` itself.
    pub takes_tools: bool,
}

/// Why a render failed: the template itself refused the conversation (`raise_exception`, with
/// its message), or the template could not be evaluated.
#[derive(Debug)]
pub enum RenderError {
    Refused(String),
    Failed(String),
}

impl ChatTemplate {
    /// Compiles `source`; `bos` and `eos` are the model's special token texts.
    pub fn new(source: &str, bos: String, eos: String) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| e.to_string())?,
        );
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("{REFUSED}{msg}"),
            ))
        });
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| format!("the chat template does not compile: {e}"))?;
        Ok(Self {
            env,
            bos,
            eos,
            takes_tools: source.contains("tools"),
        })
    }

    /// Renders `messages` ending with the assistant's turn. `tools` are offered to the model
    /// under `choice` (none: left out).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        tools: &[Tool],
        choice: &ToolChoice,
        parallel: bool,
    ) -> Result<String, RenderError> {
        let offered = !tools.is_empty() && *choice != ToolChoice::None;
        let native = offered && self.takes_tools;
        let mut list: Vec<serde_json::Value> = Vec::with_capacity(messages.len() + 1);
        // Tools offered to a template without them: they go into the first system message, or
        // a new one.
        let prompt = (offered && !native).then(|| tools::generic_prompt(tools, choice, parallel));
        if let Some(p) = &prompt {
            if messages.first().is_none_or(|m| m.role != "system") {
                list.push(json!({"role": "system", "content": p}));
            }
        }
        for (i, m) in messages.iter().enumerate() {
            list.push(if native {
                native_message(m)
            } else {
                generic_message(m, messages, i, prompt.as_deref())
            });
        }
        let tools_value = native.then(|| json!(tools));
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(&list)),
            tools => tools_value.map(|t| Value::from(minijinja::value::Serde(t))),
            add_generation_prompt => true,
            bos_token => self.bos.clone(),
            eos_token => self.eos.clone(),
        };
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| RenderError::Failed(e.to_string()))?;
        let mut out = Bounded(Vec::new());
        template
            .render_captured_to(ctx, &mut out)
            .map(drop)
            .map_err(|e| match e.detail().and_then(|d| d.strip_prefix(REFUSED)) {
                Some(why) => RenderError::Refused(why.to_string()),
                None => RenderError::Failed(error_chain(&e)),
            })?;
        String::from_utf8(out.0)
            .map_err(|_| RenderError::Failed("the chat template wrote invalid UTF-8".into()))
    }
}

/// Marks the message of a `raise_exception` inside minijinja's error.
const REFUSED: &str = "template refused: ";

fn error_chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A message as templates with tool support expect it: `tool_calls` with their arguments as
/// an object (the Hugging Face convention), `tool_call_id` on tool results.
fn native_message(m: &ChatMessage) -> serde_json::Value {
    let mut v = json!({"role": m.role, "content": m.content});
    if !m.tool_calls.is_empty() {
        let calls: Vec<serde_json::Value> = m
            .tool_calls
            .iter()
            .map(|c| {
                let arguments = serde_json::from_str::<serde_json::Value>(&c.function.arguments)
                    .unwrap_or_else(|_| json!(c.function.arguments));
                json!({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": arguments}})
            })
            .collect();
        v["tool_calls"] = json!(calls);
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    v
}

/// A message for a template without tool support: earlier calls as a sentence that names them
/// ([`tools::calls_as_text`]), tool results as user messages `<name> returned: <result>`, and
/// the tool description added to an existing system message.
fn generic_message(
    m: &ChatMessage,
    all: &[ChatMessage],
    i: usize,
    tool_prompt: Option<&str>,
) -> serde_json::Value {
    if m.role == "tool" {
        let name = all[..i]
            .iter()
            .rev()
            .flat_map(|p| &p.tool_calls)
            .find(|c| Some(&c.id) == m.tool_call_id.as_ref())
            .map_or("the function", |c| c.function.name.as_str());
        return json!({"role": "user", "content": format!("{name} returned: {}", m.content)});
    }
    if !m.tool_calls.is_empty() {
        return json!({"role": "assistant", "content": tools::calls_as_text(&m.tool_calls)});
    }
    match tool_prompt {
        Some(p) if i == 0 && m.role == "system" => {
            json!({"role": "system", "content": format!("{}\n\n{p}", m.content)})
        }
        _ => json!({"role": m.role, "content": m.content}),
    }
}

/// transformers' `tojson`: Python's `json.dumps` with `ensure_ascii=False`; `indent` honoured.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // ensure_ascii, sort_keys and separators are accepted; output is always ensure_ascii=False
    // with Python's default separators, as transformers renders.
    for k in ["ensure_ascii", "sort_keys", "separators"] {
        let _: Option<Value> = kwargs.get(k)?;
    }
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let pad = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&pad),
            );
            serde::Serialize::serialize(&json, &mut ser)
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut out, PythonFormatter);
            serde::Serialize::serialize(&json, &mut ser)
        }
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

/// Python's `json.dumps` separators: `", "` between items, `": "` after keys.
struct PythonFormatter;

/// `", "` before every item but the first.
fn item_separator<W: ?Sized + std::io::Write>(w: &mut W, first: bool) -> std::io::Result<()> {
    if first {
        Ok(())
    } else {
        w.write_all(b", ")
    }
}

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(w, first)
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        item_separator(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

/// `strftime_now(format)`: the current UTC date and time, formatted as Python's `strftime`
/// does (chrono's directives are the same for what templates use: `%d %B %Y`, `%Y-%m-%d`).
fn strftime_now(format: String) -> String {
    strftime(&format, chrono::Utc::now())
}

/// `format` with the directives of `at`. A format chrono cannot read (a template is untrusted
/// input) comes back as it was rather than failing the render.
fn strftime(format: &str, at: chrono::DateTime<chrono::Utc>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    match write!(out, "{}", at.format(format)) {
        Ok(()) => out,
        Err(_) => format.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_wire::tools::{FunctionCall, FunctionDef, ToolCall};

    /// SmolLM2-Instruct's template (the default model): no tool support.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A Hermes-style template with tools (the shape of Qwen2.5's), trimmed.
    const HERMES: &str = r#"{%- if tools %}<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}
# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each call return <tool_call>{"name": <function-name>, "arguments": <args-json-object>}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
<tool_call>
{"name": "{{ tool_call.function.name }}", "arguments": {{ tool_call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content.strip() }}
</tool_response><|im_end|>
{% elif not (tools and message.role == "system") %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"#;

    fn weather() -> Tool {
        Tool {
            kind: "function".into(),
            function: FunctionDef {
                name: "get_weather".into(),
                description: Some("Weather in a city".into()),
                parameters: Some(
                    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
                ),
                strict: None,
            },
        }
    }

    fn history() -> Vec<ChatMessage> {
        let call = ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: FunctionCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
        };
        vec![
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                tool_calls: vec![call],
                ..ChatMessage::new("assistant", "")
            },
            ChatMessage {
                tool_call_id: Some("call_1".into()),
                ..ChatMessage::new("tool", " 18 C, sunny ")
            },
        ]
    }

    #[test]
    fn renders_the_default_models_template_as_transformers_does() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>".into(), "<|im_end|>".into()).unwrap();
        assert!(!t.takes_tools);
        let out = t
            .render(
                &[ChatMessage::new("user", "Hi")],
                &[],
                &ToolChoice::None,
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn forced_calls_on_a_template_without_tools_describe_them_in_a_system_message() {
        let t = ChatTemplate::new(SMOLLM2, String::new(), String::new()).unwrap();
        let out = t
            .render(&history(), &[weather()], &ToolChoice::Required, false)
            .unwrap();
        assert!(
            out.starts_with("<|im_start|>system\nYou can call these functions:"),
            "{out}"
        );
        assert!(out.contains("\"name\": \"get_weather\""), "{out}");
        assert!(
            out.contains(
                r#"<|im_start|>assistant
I will call get_weather({"city":"Paris"}).<|im_end|>"#
            ),
            "{out}"
        );
        assert!(
            out.contains("<|im_start|>user\nget_weather returned:  18 C, sunny <|im_end|>"),
            "{out}"
        );
        // tool_choice none leaves the tools out.
        let out = t
            .render(&history()[..1], &[weather()], &ToolChoice::None, false)
            .unwrap();
        assert!(!out.contains("get_weather"), "{out}");
    }

    #[test]
    fn a_template_with_tools_gets_them_with_pythons_json() {
        let t = ChatTemplate::new(HERMES, String::new(), String::new()).unwrap();
        assert!(t.takes_tools);
        let out = t
            .render(&history(), &[weather()], &ToolChoice::Auto, false)
            .unwrap();
        assert!(out.contains(r#"{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}"#), "{out}");
        assert!(
            out.contains("{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"),
            "{out}"
        );
        assert!(
            out.contains("<tool_response>\n18 C, sunny\n</tool_response>"),
            "{out}"
        );
        assert!(out.ends_with("<|im_start|>assistant\n"), "{out}");
    }

    #[test]
    fn refusals_and_runaway_templates_are_errors() {
        let t = ChatTemplate::new(
            "{{ raise_exception('Conversation roles must alternate') }}",
            String::new(),
            String::new(),
        )
        .unwrap();
        match t.render(&history(), &[], &ToolChoice::None, false) {
            Err(RenderError::Refused(why)) => assert_eq!(why, "Conversation roles must alternate"),
            other => panic!("{other:?}"),
        }
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            String::new(),
            String::new(),
        )
        .unwrap();
        assert!(matches!(
            t.render(&history(), &[], &ToolChoice::None, false),
            Err(RenderError::Failed(_))
        ));
        assert!(ChatTemplate::new("{% for %}", String::new(), String::new()).is_err());
        // Few steps, much output: bounded in bytes, not only in fuel.
        let t = ChatTemplate::new(
            "{% for i in range(100) %}{{ 'x' * 100000000 }}{% endfor %}",
            String::new(),
            String::new(),
        )
        .unwrap();
        match t.render(&history(), &[], &ToolChoice::None, false) {
            Err(RenderError::Failed(why)) => assert!(why.contains("more than"), "{why}"),
            other => panic!("{:?}", other.map(|s| s.len())),
        }
    }

    #[test]
    fn strftime_now_formats_a_date() {
        use chrono::TimeZone;
        let at = chrono::Utc.with_ymd_and_hms(2024, 10, 4, 7, 5, 9).unwrap();
        assert_eq!(strftime("%d %B %Y", at), "04 October 2024");
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %b %%", at),
            "2024-10-04 07:05:09 Oct %"
        );
        assert_eq!(
            strftime("%Q", at),
            "%Q",
            "an unknown directive fails nothing"
        );
        let today = strftime_now("%d %B %Y".into());
        assert!(
            today.len() >= 11 && today.ends_with(|c: char| c.is_ascii_digit()),
            "{today}"
        );
    }
}
