//! Ollama's API against the real stack and the real default model: the official `ollama`
//! Python client (listings, chat and generate streamed and not, structured output, tools,
//! errors), and a streamed chat cancelled by closing the connection, counted like any task.
#![allow(clippy::await_holding_lock)]

use std::time::Duration;

use http_body_util::BodyExt;
use llorch_tests::stack::{Stack, StackOptions, MODEL_ID};
use llorch_tests::{prom, serial, wait_until};
use serde_json::{json, Value};

#[test]
fn the_official_ollama_client_drives_the_api() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    stack.python("ollama_client.py", &[], "ollama ok");
    // Each request went through the same bookkeeping as /v1: recorded in the task's journal
    // line under its own api label.
    let logs = stack.logs();
    assert!(
        logs.contains("api=\"ollama\"") || logs.contains("api=ollama"),
        "no task record with the ollama api label:\n{logs}"
    );
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
    let c = &c;
    wait_until(
        "the cancelled chat to be counted",
        Duration::from_secs(2),
        || async move {
            let n = prom::scrape(c).await.sum(
                "llorch_requests_total",
                &[("api", "ollama"), ("outcome", "canceled")],
            );
            (n == 1.0).then_some(()).ok_or(format!("{n} counted"))
        },
    )
    .await;
}
