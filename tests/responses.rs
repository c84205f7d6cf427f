//! OpenAI's Responses API against the real stack and the real default model: the official
//! `openai` Python client (plain, streamed, structured output, tools, stored responses and
//! `previous_response_id`, keys kept apart, error shapes) with every answer and stream event
//! validated against OpenAI's published OpenAPI document, and a streamed response cancelled by
//! closing the connection, counted and recorded like any task.
#![allow(clippy::await_holding_lock)]

use std::time::Duration;

use llorch_tests::stack::{Stack, StackOptions, MODEL_ID};
use llorch_tests::{openai_spec, prom, serial};
use serde_json::json;

#[test]
fn the_official_openai_client_drives_responses() {
    let _g = serial();
    let Some(spec) = openai_spec() else {
        llorch_tests::skip(
            "OpenAI's OpenAPI document is not at ../shared/vendor (set LLORCH_OPENAI_SPEC)",
        );
        return;
    };
    let stack = Stack::start(StackOptions::default());
    let out = stack.python(
        "responses_client.py",
        &[spec.to_str().expect("utf-8 path")],
        "responses ok",
    );
    assert!(
        out.contains("\"ResponseStreamEvent\""),
        "no stream event was validated: {out}"
    );
    stack.assert_recorded("openai_responses");
}

#[tokio::test]
async fn a_streamed_response_whose_client_goes_away_frees_its_slot() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        ..StackOptions::default()
    });
    let body = json!({
        "model": MODEL_ID,
        "max_output_tokens": 800,
        "stream": true,
        "input": "Tell me a very long story about a lighthouse keeper.",
    });
    let names = stack
        .stream_then_go_away("/v1/responses", body, "response.output_text.delta")
        .await;
    assert_eq!(names[..2], ["response.created", "response.in_progress"]);
    prom::wait_sum(
        &stack.client(),
        "llorch_requests_total",
        &[("api", "openai_responses"), ("outcome", "canceled")],
        1.0,
        Duration::from_secs(2),
    )
    .await;
}
