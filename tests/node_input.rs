//! What a node may send the control plane, against a running `llorch up` stack: registration
//! is reachable only with the node token `llorch up` wrote for its own pool-managerd, every
//! field of a registration or heartbeat is checked (400 naming the field), and nothing a node
//! sends takes orchestratord down: a chat completion afterwards is answered as before.
//!
//! The test holds `serial()` across awaits, as the other end-to-end tests do: the guard
//! serializes whole tests (engines on two cores), and nothing else in this binary takes it.
#![allow(clippy::await_holding_lock)]

use http_body_util::BodyExt;
use llorch_client::HttpClient;
use llorch_tests::serial;
use llorch_tests::stack::{alive, MODEL_ID};
use llorch_tests::up::Up;
use serde_json::{json, Value};

/// `POST path` with a JSON body and an optional bearer token: the status and the JSON answer.
async fn post(url: &str, token: Option<&str>, path: &str, body: &Value) -> (u16, Value) {
    let client = HttpClient::new(url)
        .unwrap()
        .with_token(token.map(str::to_string));
    let resp = client
        .post_raw(path, serde_json::to_vec(body).unwrap(), &[])
        .await
        .unwrap_or_else(|e| panic!("POST {path} got no answer (did orchestratord die?): {e}"));
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, json)
}

fn pool(id: &str, slots: u64) -> Value {
    json!({
        "pool_id": id, "model_id": MODEL_ID, "state": "ready", "slots_total": slots,
        "slots_busy": 0, "ctx_per_slot": 1024, "device": "cpu"
    })
}

/// A registration as node "home", the id `llorch up`'s token is bound to (a refused one
/// changes nothing of the real node).
fn registration(address: &str, pools: Vec<Value>) -> Value {
    json!({
        "node_id": "home", "address": address, "version": "0.0.0",
        "heartbeat_secs": 5, "pools": pools
    })
}

async fn chat(url: &str) -> Value {
    let body = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "What city is the capital of France?"}],
        "max_tokens": 8, "temperature": 0
    });
    let (status, answer) = post(url, None, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_node_cannot_register_or_crash_the_stack() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let mut up = tokio::task::block_in_place(|| Up::start(&runtime, 2));
    let url = up.url.clone();

    // The token files `llorch up` wrote: only their owner can read them.
    for name in ["node-token", "node-tokens"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(runtime.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    let token = std::fs::read_to_string(runtime.join("node-token")).unwrap();
    let token = token.trim();
    assert!(token.len() >= 32, "a real secret: {token:?}");

    registrations_without_the_nodes_token_are_refused(&url, token).await;
    each_bad_field_of_a_registration_or_heartbeat_is_named(&url, token).await;
    the_stack_serves_as_before_with_only_the_real_node(&url).await;
    assert!(alive(up.child.id()), "llorch up is still running");
    assert!(
        matches!(up.child.try_wait(), Ok(None)),
        "llorch up stopped: {}",
        up.stop_and_stderr()
    );
    // Stopping is clean: both daemons exit 0 (a panic would have been exit status 101).
    llorch_tests::stack::signal(up.child.id(), libc::SIGINT);
    let status = tokio::task::block_in_place(|| up.child.wait()).unwrap();
    let stderr = up.stderr_after_exit();
    assert!(status.success(), "{status}\n{stderr}");
    assert!(!stderr.contains("exited unexpectedly"), "{stderr}");
}

async fn registrations_without_the_nodes_token_are_refused(url: &str, token: &str) {
    // The exact request that used to panic orchestratord: refused without the token, before
    // any of it is read.
    let the_request = registration("http://bad host:1", vec![pool("default", 4294967295)]);
    let (status, body) = post(url, None, "/v2/nodes/register", &the_request).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "UNAUTHORIZED");
    let (status, _) = post(
        url,
        Some("not-the-token-0123456789"),
        "/v2/nodes/register",
        &the_request,
    )
    .await;
    assert_eq!(status, 401);
    // The token is bound to node "home": as another node id it is refused (403).
    let mut intruder = registration("http://127.0.0.1:1", vec![pool("default", 1)]);
    intruder["node_id"] = json!("intruder");
    let (status, body) = post(url, Some(token), "/v2/nodes/register", &intruder).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "FORBIDDEN", "{body}");
}

async fn each_bad_field_of_a_registration_or_heartbeat_is_named(url: &str, token: &str) {
    // With the token, each bad field is a 400 that names it.
    let many: Vec<Value> = (0..10_000).map(|i| pool(&format!("p{i}"), 1)).collect();
    let cases = [
        (
            registration("http://bad host:1", vec![pool("default", 4294967295)]),
            "address",
        ),
        (
            registration("http://127.0.0.1:1", vec![pool("default", 4294967295)]),
            "pools[0].slots_total",
        ),
        (
            registration("http://bad host:1", vec![pool("default", 1)]),
            "address",
        ),
        (
            registration("gopher://127.0.0.1:1", vec![pool("default", 1)]),
            "address",
        ),
        (
            registration("http://127.0.0.1:1", vec![pool("", 1)]),
            "pools[0].pool_id",
        ),
        (registration("http://127.0.0.1:1", many.clone()), "pools"),
        (
            registration("http://[::1:1", vec![pool("default", 1)]),
            "address",
        ),
    ];
    for (body, field) in &cases {
        let (status, answer) = post(url, Some(token), "/v2/nodes/register", body).await;
        assert_eq!(status, 400, "{field}: {answer}");
        assert_eq!(answer["code"], "INVALID_PARAMS", "{answer}");
        assert_eq!(answer["field"], *field, "{answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // Heartbeats of the real node "home" are checked the same way, and a refused one changes
    // nothing: its pool stays as it was.
    let heartbeats = [
        (
            json!({"pools": [pool("default", 4294967295), pool("b", 2)]}),
            "pools[0].slots_total",
        ),
        (json!({"pools": [pool("a b", 1)]}), "pools[0].pool_id"),
        (json!({"pools": [pool("", 1)]}), "pools[0].pool_id"),
        (json!({"pools": many}), "pools"),
        (
            json!({"pools": [], "gpus": {"devices": [
                {"index": 0, "uuid": "GPU-a", "name": "x", "memory_total_bytes": 1,
                 "memory_used_bytes": 0, "memory_free_bytes": 2}]}}),
            "gpus.devices[0].memory_free_bytes",
        ),
        (
            json!({"pools": [], "gpus": {"devices": [
                {"index": 0, "uuid": "GPU-a", "name": "x", "memory_total_bytes": 1,
                 "memory_used_bytes": 0, "memory_free_bytes": 1, "utilization_percent": 400}]}}),
            "gpus.devices[0].utilization_percent",
        ),
    ];
    for (body, field) in &heartbeats {
        let (status, answer) = post(url, Some(token), "/v2/nodes/home/heartbeat", body).await;
        assert_eq!(status, 400, "{field}: {answer}");
        assert_eq!(answer["field"], *field, "{answer}");
    }
}

async fn the_stack_serves_as_before_with_only_the_real_node(url: &str) {
    // orchestratord is alive and serves as before, on the real node's pool.
    let answer = chat(url).await;
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{answer}");
    // The node list is an operator's: with the token `llorch up` wrote for `llorch`.
    let client = HttpClient::new(url)
        .unwrap()
        .with_token(llorch::up::admin_token_for(url));
    let nodes: Value = client.get_json("/v2/nodes").await.unwrap();
    let ids: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node_id"].as_str())
        .collect();
    assert_eq!(ids, ["home"], "no bogus node was registered: {nodes}");
    let pools: Value = client.get_json("/v2/pools").await.unwrap();
    assert_eq!(pools["pools"][0]["slots_total"], 2, "{pools}");
}
