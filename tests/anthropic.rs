//! Anthropic's Messages API against the real stack and the real default model: the official
//! `anthropic` Python client (plain, streamed, structured output, tools, count_tokens, error
//! shapes), and a streamed message cancelled by closing the connection, counted and recorded
//! like any task.
#![allow(clippy::await_holding_lock)]

use std::time::Duration;

use llorch_client::EventStream;
use llorch_tests::stack::{Stack, StackOptions, MODEL_ID};
use llorch_tests::{prom, serial};
use serde_json::{json, Value};

#[test]
fn the_official_anthropic_client_drives_messages() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    stack.python("anthropic_client.py", &[], "anthropic ok");
    // Each request went through the same bookkeeping as /v1: recorded in the task's journal
    // line under its own api label.
    let logs = stack.logs();
    assert!(
        logs.contains("api=\"anthropic_messages\"") || logs.contains("api=anthropic_messages"),
        "no task record with the anthropic api label:\n{logs}"
    );
}

#[tokio::test]
async fn a_streamed_message_whose_client_goes_away_frees_its_slot() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        ..StackOptions::default()
    });
    let c = stack.client();
    let body = json!({
        "model": MODEL_ID,
        "max_tokens": 800,
        "stream": true,
        "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}],
    });
    let resp = c
        .post_raw("/v1/messages", serde_json::to_vec(&body).unwrap(), &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut s = EventStream::from_response(resp, std::path::Path::new("m"))
        .await
        .unwrap();
    let mut names = Vec::new();
    while !names.iter().any(|n| n == "content_block_delta") {
        let frame = s.next_frame().await.unwrap().unwrap();
        let data: Value = serde_json::from_str(&frame.data).unwrap();
        assert_eq!(data["type"], frame.event.as_str(), "{frame:?}");
        names.push(frame.event);
    }
    assert_eq!(names[..3], ["message_start", "ping", "content_block_start"]);
    let engine = llorch_client::UnixClient::new(stack.handoff().expect("handoff").socket);
    assert_eq!(
        engine.slots().await.unwrap().busy,
        1,
        "the engine generates"
    );
    drop(s);
    stack.wait_engine_idle(Duration::from_secs(2)).await;
    prom::wait_sum(
        &c,
        "llorch_requests_total",
        &[("api", "anthropic_messages"), ("outcome", "canceled")],
        1.0,
        Duration::from_secs(2),
    )
    .await;
}
