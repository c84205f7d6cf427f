//! Anthropic's Messages API against the real stack and the real default model: the official
//! `anthropic` Python client (plain, streamed, structured output, tools, count_tokens, error
//! shapes), and a streamed message cancelled by closing the connection, counted and recorded
//! like any task.
#![allow(clippy::await_holding_lock)]

use std::time::Duration;

use llorch_tests::stack::{Stack, StackOptions, MODEL_ID};
use llorch_tests::{prom, serial};
use serde_json::json;

#[test]
fn the_official_anthropic_client_drives_messages() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    stack.python("anthropic_client.py", &[], "anthropic ok");
    // Each request went through the same bookkeeping as /v1: recorded in the task's journal
    // line under its own api label.
    stack.assert_recorded("anthropic_messages");
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
    let names = stack
        .stream_then_go_away("/v1/messages", body, "content_block_delta")
        .await;
    assert_eq!(names[..3], ["message_start", "ping", "content_block_start"]);
    prom::wait_sum(
        &c,
        "llorch_requests_total",
        &[("api", "anthropic_messages"), ("outcome", "canceled")],
        1.0,
        Duration::from_secs(2),
    )
    .await;
}
