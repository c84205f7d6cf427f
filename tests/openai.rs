//! The OpenAI API's depth against the real stack and the real default model: answers validated
//! against OpenAI's published OpenAPI document, structured output enforced by a grammar, and
//! log-probabilities, through `/v1` (the official Python client and raw HTTP) and the native
//! `/v2` task API.
#![allow(clippy::await_holding_lock)]

use llorch_client::HttpClient;
use llorch_tests::stack::{Stack, StackOptions, MODEL_ID};
use llorch_tests::{frames, openai_spec, post, serial};
use llorch_wire::engine::{ChatMessage, TokenEvent};
use llorch_wire::task::{TaskAccepted, TaskRequest};
use serde_json::{json, Value};

#[test]
fn answers_conform_to_openais_schema_and_structured_output_validates() {
    let _g = serial();
    let Some(spec) = openai_spec() else {
        llorch_tests::skip(
            "OpenAI's OpenAPI document is not at ../shared/vendor (set LLORCH_OPENAI_SPEC)",
        );
        return;
    };
    let stack = Stack::start(StackOptions::default());
    stack.python(
        "openai_conformance.py",
        &[spec.to_str().expect("utf-8 path")],
        "conformance ok",
    );
}

/// The native API takes the same options: a JSON Schema, tools and log-probabilities on
/// `/v2/tasks`, delivered in the task's `token` events.
#[tokio::test]
async fn native_tasks_take_a_json_schema_tools_and_logprobs() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let c = stack.client();
    let schema = json!({
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"enum": ["France", "Spain"]}},
        "required": ["city", "country"],
        "additionalProperties": false
    });
    let req = TaskRequest {
        model_ref: MODEL_ID.into(),
        messages: Some(vec![ChatMessage::new(
            "user",
            "What city is the capital of France? Answer in JSON.",
        )]),
        max_tokens: Some(60),
        temperature: Some(0.0),
        json_schema: Some(schema),
        json_schema_strict: true,
        logprobs: Some(2),
        ..TaskRequest::default()
    };
    let accepted: TaskAccepted = c.post_json("/v2/tasks", &req).await.expect("accepted");
    let events = frames(c.events(&accepted.streams.sse).await.unwrap()).await;
    let tokens: Vec<TokenEvent> = events
        .iter()
        .filter(|f| f.event == "token")
        .map(|f| serde_json::from_str(&f.data).unwrap())
        .collect();
    let text: String = tokens.iter().map(|t| t.t.as_str()).collect();
    let answer: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}\n{}", stack.logs()));
    assert!(answer["city"].is_string(), "{answer}");
    assert!(
        answer["country"] == "France" || answer["country"] == "Spain",
        "{answer}"
    );
    assert_eq!(answer.as_object().unwrap().len(), 2, "{answer}");
    let lp: Vec<_> = tokens.iter().flat_map(|t| &t.lp).collect();
    assert!(!lp.is_empty(), "{events:?}");
    assert_eq!(
        lp.iter().map(|t| t.token.as_str()).collect::<String>(),
        text
    );
    for t in &lp {
        // Greedy, with the grammar masking every token: the chosen token is the most likely
        // one the grammar allows, first among the alternatives.
        assert_eq!(t.top_logprobs.len().min(1), 1, "{t:?}");
        assert_eq!(t.top_logprobs[0].token, t.token, "{t:?}");
        assert!(t.logprob <= 0.0);
    }

    a_forced_call_is_a_valid_call(&c).await;
    bad_schemas_and_grammars_are_refused_by_name(&c).await;
    a_deeply_nested_grammar_does_not_abort_the_engine(&c).await;
}

async fn a_forced_call_is_a_valid_call(c: &HttpClient) {
    // A forced call: the answer is the call's JSON, its arguments valid for the tool.
    let call: TaskAccepted = c
        .post_json(
            "/v2/tasks",
            &json!({
                "model_ref": MODEL_ID,
                "messages": [{"role": "user", "content": "What time is it in Tokyo?"}],
                "max_tokens": 60,
                "temperature": 0,
                "tools": [{"type": "function", "function": {"name": "get_time", "parameters": {
                    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                    "required": ["zone"], "additionalProperties": false}}}],
                "tool_choice": {"type": "function", "function": {"name": "get_time"}},
            }),
        )
        .await
        .expect("accepted");
    let events = frames(c.events(&call.streams.sse).await.unwrap()).await;
    let text: String = events
        .iter()
        .filter(|f| f.event == "token")
        .map(|f| serde_json::from_str::<TokenEvent>(&f.data).unwrap().t)
        .collect();
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert_eq!(v["name"], "get_time", "{v}");
    assert!(v["arguments"]["zone"].is_string(), "{v}");
    assert_eq!(v["arguments"].as_object().unwrap().len(), 1, "{v}");
}

async fn bad_schemas_and_grammars_are_refused_by_name(c: &HttpClient) {
    // One validation for both front ends: a bad schema is a 400 naming the field and place.
    let (status, _, body) = post(
        c,
        "/v2/tasks",
        &json!({"model_ref": MODEL_ID, "prompt": "x", "json_schema": {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}}, "json_schema_strict": true}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "json_schema", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("#/properties/n/multipleOf"),
        "{body}"
    );
    let (status, _, body) = post(
        c,
        "/v2/tasks",
        &json!({"model_ref": MODEL_ID, "prompt": "x", "grammar": "root ::= (", "max_tokens": 4}),
    )
    .await;
    // A grammar llama.cpp cannot parse is refused by the engine, before any token.
    let task = body["task_id"].as_str().map(str::to_owned);
    let refused = match (status.as_u16(), task) {
        (400, _) => body,
        (202, Some(id)) => {
            let events = frames(c.events(&format!("/v2/tasks/{id}/events")).await.unwrap()).await;
            let err = events
                .iter()
                .find(|f| f.event == "error")
                .expect("error event");
            serde_json::from_str(&err.data).unwrap()
        }
        other => panic!("unexpected answer {other:?}: {body}"),
    };
    assert_eq!(refused["field"], "grammar", "{refused}");
}

async fn a_deeply_nested_grammar_does_not_abort_the_engine(c: &HttpClient) {
    // 20,000 nested groups (well inside the 64 KiB a grammar may hold) once aborted the engine
    // on llama.cpp's recursive parser, and dispatch sent it to the next attempts: refused here
    // with a 400 naming the field, the engine never restarts, and the next request is answered.
    let nested = format!("root ::= {}\"a\"{}", "(".repeat(20_000), ")".repeat(20_000));
    let (status, _, refused) = post(
        c,
        "/v2/tasks",
        &json!({"model_ref": MODEL_ID, "prompt": "x", "grammar": nested, "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 400, "{refused:.300}");
    assert_eq!(refused["field"], "grammar", "{refused:.300}");
    assert!(
        refused["message"].as_str().unwrap().contains("64 deep"),
        "{refused:.300}"
    );
    let answered: TaskAccepted = c
        .post_json(
            "/v2/tasks",
            &json!({"model_ref": MODEL_ID, "prompt": "x", "grammar": "root ::= \"yes\"", "max_tokens": 4}),
        )
        .await
        .unwrap();
    let events = frames(c.events(&answered.streams.sse).await.unwrap()).await;
    assert!(events.iter().any(|f| f.event == "end"), "{events:?}");
    let pools: llorch_wire::task::PoolsAnswer = c.get_json("/v2/pools").await.unwrap();
    assert_eq!(pools.pools[0].restarts, 0, "{pools:?}");
}

/// `n` choices for one prompt: each its own index and text, usage summed, and the prompt is
/// evaluated once (the engine's prompt-token counter moves by the uncached prompt plus one
/// token per further choice, the prompt's last, evaluated again for its logits).
#[tokio::test]
async fn n_choices_share_one_prefill() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let c = stack.client();
    let node =
        llorch_client::HttpClient::new(&format!("unix:{}", stack.node_socket().display())).unwrap();
    let prompt_counter = |s: &llorch_tests::prom::Scrape| {
        s.sum("llorch_engine_prompt_tokens_total", &[("pool", "default")])
    };
    let before = prompt_counter(&llorch_tests::prom::scrape(&node).await);
    let accepted: TaskAccepted = c
        .post_json(
            "/v2/tasks",
            &json!({
                "model_ref": MODEL_ID,
                "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
                "max_tokens": 24,
                "temperature": 1.0,
                "seed": 42,
                "n": 3,
            }),
        )
        .await
        .expect("accepted");
    let events = frames(c.events(&accepted.streams.sse).await.unwrap()).await;
    let after = prompt_counter(&llorch_tests::prom::scrape(&node).await);
    let mut texts = vec![String::new(); 3];
    for f in events.iter().filter(|f| f.event == "token") {
        let t: TokenEvent = serde_json::from_str(&f.data).unwrap();
        texts[t.c as usize].push_str(&t.t);
    }
    let metrics: Value = serde_json::from_str(
        &events
            .iter()
            .find(|f| f.event == "metrics")
            .expect("metrics")
            .data,
    )
    .unwrap();
    let end: llorch_wire::task::TaskEnd =
        serde_json::from_str(&events.iter().find(|f| f.event == "end").expect("end").data).unwrap();
    assert_eq!(end.choices.len(), 3, "{end:?}");
    assert_eq!(
        end.tokens_out,
        end.choices.iter().map(|c| c.completion_tokens).sum::<u32>()
    );
    assert!(texts.iter().all(|t| !t.is_empty()), "{texts:?}");
    let distinct: std::collections::BTreeSet<&String> = texts.iter().collect();
    assert!(distinct.len() >= 2, "three samples, one text: {texts:?}");
    let uncached = end.tokens_in as f64 - metrics["cached_tokens"].as_f64().unwrap();
    assert_eq!(after - before, uncached + 2.0, "{end:?} {metrics}");
}

/// The default model with its chat template replaced by `template` (a copy in `dir`). The GGUF
/// string grows by a multiple of 32 bytes (padded with a Jinja comment), so the tensor data,
/// aligned to 32 bytes after the header, moves by the same amount and its offsets stay valid.
fn with_template(dir: &std::path::Path, template: &str) -> std::path::PathBuf {
    let bytes = std::fs::read(llorch_tests::model_path()).expect("read the default model");
    let key = b"tokenizer.chat_template";
    let at = bytes
        .windows(key.len())
        .position(|w| w == key)
        .expect("the model has a chat template")
        + key.len()
        + 4; // the value's type
    let old = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let mut new = template.as_bytes().to_vec();
    let pad = (old + 32 * 64 - new.len() - 4) % 32;
    new.extend_from_slice(b"{#");
    new.extend(std::iter::repeat_n(b' ', pad));
    new.extend_from_slice(b"#}");
    assert_eq!((new.len() + 32 * 64 - old) % 32, 0);
    let mut out = bytes[..at].to_vec();
    out.extend_from_slice(&(new.len() as u64).to_le_bytes());
    out.extend_from_slice(&new);
    out.extend_from_slice(&bytes[at + 8 + old..]);
    let path = dir.join("tools-template.gguf");
    std::fs::write(&path, out).unwrap();
    path
}

/// `auto` on a model whose template takes tools: the template renders them, the model decides,
/// and a `<tool_call>` in its answer becomes `tool_calls` (streamed and not); an answer without
/// one stays text. The default model with a Hermes-style template (`tests/data/`): the 135M
/// model calls the tool when its history shows it doing so.
#[tokio::test]
async fn auto_on_a_template_with_tools_reads_the_models_own_calls() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let template =
        std::fs::read_to_string(llorch_tests::repo_root().join("tests/data/hermes-tools.jinja"))
            .unwrap();
    let stack = Stack::start(StackOptions {
        model: Some(with_template(dir.path(), &template)),
        ..StackOptions::default()
    });
    let c = stack.client();
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let history = json!([
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]);
    let body = json!({"model": MODEL_ID, "messages": history, "tools": tools, "temperature": 0, "max_tokens": 60});
    let (status, _, answer) = post(&c, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}\n{}", stack.logs());
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{answer}");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Paris"}), "{answer}");
    assert!(choice["message"]["content"].is_null(), "{answer}");

    // Streamed: the same call, as deltas.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = c
        .post_raw(
            "/v1/chat/completions",
            serde_json::to_vec(&streamed).unwrap(),
            &[],
        )
        .await
        .unwrap();
    let text = String::from_utf8(
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let (mut name, mut arguments, mut finish) = (String::new(), String::new(), String::new());
    for data in text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
    {
        let chunk: Value = serde_json::from_str(data).unwrap();
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        for d in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            name.push_str(d["function"]["name"].as_str().unwrap_or(""));
            arguments.push_str(d["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    assert_eq!(
        (name.as_str(), finish.as_str()),
        ("get_weather", "tool_calls"),
        "{text}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        json!({"city": "Paris"})
    );

    // A question no tool answers: text, and no 400 for auto on this template.
    let (status, _, answer) = post(
        &c,
        "/v1/chat/completions",
        &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi, who are you?"}],
                "tools": tools, "temperature": 0, "max_tokens": 20}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer["choices"][0]["message"]["tool_calls"].is_null(),
        "{answer}"
    );
    assert!(!answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
}
