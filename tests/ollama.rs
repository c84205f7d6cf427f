//! Ollama's API against the real stack and the real default model: the official `ollama`
//! Python client (listings, chat and generate streamed and not, structured output, tools,
//! errors), a streamed chat cancelled by closing the connection, counted like any task, and
//! the key every new route needs.
#![allow(clippy::await_holding_lock)]

use std::time::Duration;

use http_body_util::BodyExt;
use llorch_tests::stack::{Stack, StackOptions, MODEL_ID};
use llorch_tests::{prom, serial};
use serde_json::{json, Value};

#[test]
fn the_official_ollama_client_drives_the_api() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    stack.python("ollama_client.py", &[], "ollama ok");
    // Each request went through the same bookkeeping as /v1: recorded in the task's journal
    // line under its own api label.
    stack.assert_recorded("ollama");
}

/// Every route of the Anthropic and Ollama surfaces needs a key once keys are configured, and
/// refuses without one in its own envelope, before reading the body; `/api/version` alone
/// answers (it tells only the version, as `/health` tells readiness).
#[tokio::test]
async fn the_new_surfaces_refuse_a_caller_without_a_key() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let anon = stack.client().with_token(None);
    let body = serde_json::to_vec(&json!({"model": MODEL_ID, "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hi"}]}))
    .unwrap();
    for (method, path) in [
        ("POST", "/v1/messages"),
        ("POST", "/v1/messages/count_tokens"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/responses/resp_0123"),
        ("DELETE", "/v1/responses/resp_0123"),
        ("POST", "/v1/embeddings"),
        ("GET", "/api/tags"),
        ("GET", "/api/ps"),
        ("POST", "/api/show"),
        ("POST", "/api/chat"),
        ("POST", "/api/generate"),
        ("POST", "/api/embed"),
        ("POST", "/api/embeddings"),
        ("GET", "/api/version"),
    ] {
        let resp = if method != "POST" {
            let req = anon
                .request(hyper::Method::from_bytes(method.as_bytes()).unwrap(), path)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            anon.send(req).await.unwrap()
        } else {
            anon.post_raw(path, body.clone(), &[]).await.unwrap()
        };
        let status = resp.status();
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&text).unwrap();
        if path == "/api/version" {
            assert_eq!(status, 200, "{v}");
            assert!(v["version"].is_string(), "{v}");
            continue;
        }
        assert_eq!(status, 401, "{path}: {v}");
        if path.starts_with("/v1/") {
            assert_eq!(v["error"]["type"], "authentication_error", "{path}: {v}");
        } else {
            assert!(
                v["error"].as_str().unwrap().contains("API key"),
                "{path}: {v}"
            );
        }
    }
}

#[tokio::test]
async fn a_streamed_chat_whose_client_goes_away_frees_its_slot() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        ..StackOptions::default()
    });
    let c = stack.client();
    // No `stream` field: Ollama streams by default.
    let body = json!({
        "model": MODEL_ID,
        "options": {"num_predict": 800},
        "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}],
    });
    let resp = c
        .post_raw("/api/chat", serde_json::to_vec(&body).unwrap(), &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/x-ndjson"
    );
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while !seen.contains(&b'\n') {
        let frame = body.frame().await.unwrap().unwrap();
        seen.extend_from_slice(frame.data_ref().unwrap());
    }
    let first: Value =
        serde_json::from_slice(&seen[..seen.iter().position(|b| *b == b'\n').unwrap()]).unwrap();
    assert_eq!(first["done"], false, "{first}");
    assert_eq!(first["message"]["role"], "assistant", "{first}");
    drop(body);
    stack.wait_engine_idle(Duration::from_secs(2)).await;
    prom::wait_sum(
        &c,
        "llorch_requests_total",
        &[("api", "ollama"), ("outcome", "canceled")],
        1.0,
        Duration::from_secs(2),
    )
    .await;
}
