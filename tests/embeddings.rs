//! Embeddings against the real stack and the real default model (no small embedding model is
//! published in a package registry this machine reaches: the default chat model, mean-pooled,
//! proves the mechanics): the official `openai` and `ollama` Python clients, answers validated
//! against OpenAI's published OpenAPI document, and a pool that does not serve embeddings
//! refusing with what to set.
#![allow(clippy::await_holding_lock)]

use http_body_util::BodyExt;
use llorch_tests::stack::{Stack, StackOptions, MODEL_ID};
use llorch_tests::{openai_spec, serial};
use serde_json::{json, Value};

#[test]
fn the_official_clients_embed() {
    let _g = serial();
    let Some(spec) = openai_spec() else {
        llorch_tests::skip(
            "OpenAI's OpenAPI document is not at ../shared/vendor (set LLORCH_OPENAI_SPEC)",
        );
        return;
    };
    let stack = Stack::start(StackOptions {
        embeddings: true,
        ..StackOptions::default()
    });
    let out = stack.python(
        "embeddings_client.py",
        &[spec.to_str().expect("utf-8 path")],
        "embeddings ok",
    );
    assert!(out.contains("\"CreateEmbeddingResponse\""), "{out}");
    stack.assert_recorded("openai_embeddings");
}

#[tokio::test]
async fn a_pool_without_embeddings_says_what_to_set() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let c = stack.client();
    for (path, body) in [
        (
            "/v1/embeddings",
            json!({"model": MODEL_ID, "input": "Hello"}),
        ),
        ("/api/embed", json!({"model": MODEL_ID, "input": "Hello"})),
    ] {
        let resp = c
            .post_raw(path, serde_json::to_vec(&body).unwrap(), &[])
            .await
            .unwrap();
        let status = resp.status();
        let v: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(status, 400, "{path}: {v}");
        let text = v.to_string();
        assert!(text.contains("embeddings = true"), "{path}: {v}");
    }
}
