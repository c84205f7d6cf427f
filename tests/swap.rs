//! Several models on one box, through the whole stack: orchestratord and pool-managerd with the
//! default pool always loaded and two on-demand pools of two real models (Gemma 3 270M and the
//! default model under another id), with room for one of them (`max_loaded = 2`). Clients use
//! the OpenAI API; the operator uses `llorch pools pin|unpin|load|unload` over HTTP.
//!
//! The second test does the same swap under real systemd: the Debian package installed in a
//! booted container, where an unload stops an engine unit and keeps its socket listening, and a
//! load is systemd's socket activation.
//!
//! The node's own decisions (memory budgets, least recently used, work in flight, one load for
//! many requests) are tested on the node in `crates/pool-managerd/tests/swap.rs`.

#![allow(clippy::await_holding_lock)]

use std::process::Command;
use std::time::Duration;

use llorch_client::HttpClient;
use llorch_tests::appliance::{boot, curl, default_pool, stage, MODEL_SHA256};
use llorch_tests::stack::{free_port, Stack, StackOptions, TEST_KEY};
use llorch_tests::{bin, model_path, second_model_path, serial};
use llorch_wire::node::PoolStatus;
use llorch_wire::task::{PoolView, PoolsAnswer};

fn on_demand(id: &str, model_id: &str, source: &std::path::Path) -> String {
    format!(
        "\n[[pools]]\nid = \"{id}\"\nslots = 1\nctx = 512\nthreads = 1\non_demand = true\nprefix_cache_mib = 0\n\n[pools.model]\nid = \"{model_id}\"\nsource = \"{}\"\n",
        source.display()
    )
}

fn start() -> Stack {
    let mut stack = Stack::start(StackOptions {
        slots: 1,
        ctx: 512,
        node_keys: "max_loaded = 2\nmin_resident_secs = 0\n".into(),
        extra_node_toml: on_demand("gemma", "gemma-270m", &second_model_path())
            + &on_demand("small-b", "smollm2-b", &model_path()),
        ..StackOptions::default()
    });
    stack.wait_ready();
    stack
}

/// `llorch ARGS` as an operator with the admin key, over HTTP; its output, which must succeed.
fn llorch(stack: &Stack, args: &[&str]) -> String {
    let out = Command::new(bin("llorch"))
        .args(args)
        .env("LLORCH_URL", stack.url())
        .env("LLORCH_API_KEY", TEST_KEY)
        .env("LLORCH_DBUS", "off")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "llorch {args:?}: {text}\n{}",
        stack.logs()
    );
    text
}

/// gemma's and small-b's status as their node holds it: exact the moment an answer or an
/// operator's action returns (the control plane's view follows with the next heartbeat).
async fn on_node(stack: &Stack) -> (PoolStatus, PoolStatus) {
    let node = HttpClient::new(&format!("unix:{}", stack.node_socket().display())).unwrap();
    let status = |id: &'static str| {
        let node = node.clone();
        async move {
            node.get_json::<PoolStatus>(&format!("/v2/pools/{id}"))
                .await
                .unwrap()
        }
    };
    (status("gemma").await, status("small-b").await)
}

async fn pool(c: &HttpClient, id: &str) -> PoolView {
    let all: PoolsAnswer = c.get_json("/v2/pools").await.unwrap();
    all.pools.into_iter().find(|p| p.pool_id == id).unwrap()
}

/// A greedy completion from `model`: (status, body).
async fn complete(c: &HttpClient, model: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"model": model, "prompt": "The sky is", "max_tokens": 4, "temperature": 0});
    let resp = c
        .post_raw("/v1/completions", body.to_string(), &[])
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_take_turns_and_the_operator_pins_loads_and_unloads() {
    let _guard = serial();
    let stack = start();
    let c = stack.client();
    each_model_answers_in_turn(&stack, &c).await;
    a_pinned_model_refuses_the_other_at_once_naming_it(&stack, &c).await;
    the_operator_loads_and_unloads(&stack, &c).await;
    only_an_admin_key_may_act_on_models(&stack, &c).await;
}

async fn each_model_answers_in_turn(stack: &Stack, c: &HttpClient) {
    for model in ["gemma-270m", "smollm2-b", "gemma-270m", "smollm2-b"] {
        let (status, body) = complete(c, model).await;
        assert_eq!(status, 200, "{model}: {body}\n{}", stack.logs());
        assert_eq!(body["model"], model);
    }
    // Each unloaded the other, least recently used first: gemma twice, small-b once.
    let (gemma, small) = on_node(stack).await;
    assert_eq!((gemma.swaps, small.swaps), (2, 1), "{gemma:?} {small:?}");
    assert!(
        small.memory_charged && !gemma.memory_charged,
        "{gemma:?} {small:?}"
    );
    assert!(small.memory_charge_bytes.unwrap() > 0);
}

async fn a_pinned_model_refuses_the_other_at_once_naming_it(stack: &Stack, c: &HttpClient) {
    let out = llorch(stack, &["pools", "pin", "small-b"]);
    assert!(out.contains("(pinned)"), "{out}");
    let (status, body) = complete(c, "gemma-270m").await;
    assert_eq!(status, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("small-b (pinned"), "{body}");
    assert!(message.contains("at most 2 pools loaded"), "{body}");
    llorch(stack, &["pools", "unpin", "small-b"]);
}

async fn the_operator_loads_and_unloads(stack: &Stack, c: &HttpClient) {
    llorch(stack, &["pools", "load", "gemma"]);
    // The load made room: small-b went, gemma is charged from the moment it was admitted.
    let (gemma, small) = on_node(stack).await;
    assert!(
        gemma.memory_charged && !small.memory_charged && small.swaps == 2,
        "{gemma:?} {small:?}"
    );
    llorch(stack, &["pools", "unload", "gemma"]);
    assert!(!on_node(stack).await.0.memory_charged);
    let status = llorch(stack, &["status"]);
    assert!(
        status.contains("MEMORY") && status.contains("SWAPS"),
        "{status}"
    );
    // The node's budget and what is charged on it: the always-loaded default pool.
    assert!(status.contains("CHARGED/BUDGET MiB"), "{status}");
    let nodes: Vec<llorch_wire::task::NodeView> = c.get_json("/v2/nodes").await.unwrap();
    let host = nodes[0].memory.iter().find(|m| m.device == "host").unwrap();
    let default = pool(c, "default").await.memory_charge_bytes.unwrap();
    assert!(
        host.budget_bytes > 0 && host.charged_bytes >= default,
        "{host:?}"
    );
}

async fn only_an_admin_key_may_act_on_models(stack: &Stack, c: &HttpClient) {
    // The stack's second key is valid but not marked admin.
    let other = HttpClient::new(&stack.url())
        .unwrap()
        .with_token(Some("other-key-0123456789abcdef".into()));
    for action in ["load", "unload", "pin", "unpin"] {
        let resp = other
            .post_raw(
                &format!("/v2/pools/small-b/{action}"),
                "{}".to_string(),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{action}");
    }
    assert!(!pool(c, "small-b").await.pinned);
}

/// An on-demand pool of the appliance's model under another id, without a prefix cache.
fn appliance_on_demand(id: &str) -> String {
    format!(
        "\n[[pools]]\nid = \"{id}\"\nslots = 1\nctx = 512\nthreads = 1\non_demand = true\nprefix_cache_mib = 0\n\n[pools.model]\nid = \"smollm2-{id}\"\nsource = \"/mnt/llorch/model.gguf\"\nsha256 = \"{MODEL_SHA256}\"\n"
    )
}

#[test]
fn models_swap_under_systemd() {
    let _guard = serial();
    let dir = tempfile::Builder::new()
        .prefix("llorch-swap-")
        .tempdir()
        .unwrap();
    let port = free_port();
    // Keys of [node] first (the staged file's [node] table is still open), then the pools: the
    // default pool always loaded, room for one of the two on-demand pools besides it.
    let pools = format!(
        "max_loaded = 2\nmin_resident_secs = 0\n{}{}{}",
        default_pool(),
        appliance_on_demand("one"),
        appliance_on_demand("two")
    );
    stage(dir.path(), port, &pools, "");
    let mut c = boot(dir.path(), "swap");
    c.ok(&["systemctl", "start", "llama-orch.target"]);
    c.wait_until(
        "both on-demand pools on standby",
        Duration::from_secs(120),
        |c| {
            c.show("orchestratord.service", "StatusText")
                .starts_with("1 of 3 pools ready (2 on standby)")
        },
    );
    let engine = |id: &str| format!("llorch-engine@{id}.service");
    for (id, other) in [("one", "two"), ("two", "one"), ("one", "two")] {
        let body = serde_json::json!({"model": format!("smollm2-{id}"), "prompt": "The sky is", "max_tokens": 4, "temperature": 0});
        let (status, answer) = curl(
            port,
            &[
                "-H",
                "content-type: application/json",
                "-d",
                &body.to_string(),
            ],
            "/v1/completions",
        );
        assert_eq!(status, 200, "{id}: {answer}");
        // The asked-for engine runs; the other one's unit stopped, its socket still listens.
        assert_eq!(c.show(&engine(id), "ActiveState"), "active");
        assert_eq!(c.show(&engine(other), "ActiveState"), "inactive");
        assert_eq!(
            c.show(&format!("llorch-engine@{other}.socket"), "ActiveState"),
            "active"
        );
    }
    let unloads = c.journal(&[
        "-u",
        "pool-managerd",
        "MESSAGE=Unloading the least recently used idle pool to make room for another.",
    ]);
    assert_eq!(unloads.len(), 2, "{unloads:?}");
    assert!(c.poweroff(), "{}", c.log_text());
}
