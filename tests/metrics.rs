//! Observability end to end: the real daemons on the real model are scraped after real
//! traffic and checked against docs/METRICS.md, the dashboard and the alert rules; and with a
//! real journald, the per-task record and the engine-crash event are found with `journalctl`.
#![allow(clippy::await_holding_lock)]

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
use hyper::StatusCode;
use llorch_client::{HttpClient, UnixClient};
use llorch_tests::prom::{documented, names_used, scrape, Documented, Scrape};
use llorch_tests::stack::{signal, Stack, StackOptions, MODEL_ID, TEST_KEY};
use llorch_tests::{frames, post, repo_root, serial, wait_for, wait_until};
use serde_json::{json, Value};

const M: &str = MODEL_ID;

async fn scrape_engine(socket: &str) -> Scrape {
    let (status, body) = UnixClient::new(socket).get_bytes("/metrics").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    Scrape::parse(std::str::from_utf8(&body).unwrap())
}

/// Every documented metric of `role` is in `scrape` with its type and exactly its labels
/// (plus `extra`, and `le` on buckets); NVML-only ones may be absent.
fn check_documented(scrape: &Scrape, docs: &[&Documented], extra: &[&str], what: &str) {
    for d in docs {
        let samples = scrape.family(&d.name);
        if samples.is_empty() && d.nvml_only {
            continue;
        }
        assert!(!samples.is_empty(), "{what}: {} is not exported", d.name);
        assert_eq!(
            scrape.types.get(&d.name).map(String::as_str),
            Some(d.kind.as_str()),
            "{what}: {} has the wrong type",
            d.name
        );
        let mut want: BTreeSet<String> = d.labels.iter().cloned().collect();
        want.extend(extra.iter().map(|s| s.to_string()));
        for s in samples {
            let mut have: BTreeSet<String> = s.labels.keys().cloned().collect();
            if s.name.ends_with("_bucket") {
                assert!(have.remove("le"), "{what}: bucket without le: {s:?}");
            }
            // pool-managerd's own build info and the engines' (with `pool`) share a family.
            if d.name == "llorch_build_info" && have.contains("pool") {
                have.remove("pool");
            }
            let mut want = want.clone();
            if d.name == "llorch_build_info" {
                want.remove("pool");
            }
            assert_eq!(have, want, "{what}: labels of {s:?}");
        }
    }
}

fn delta(a: &Scrape, b: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    b.sum(name, labels) - a.sum(name, labels)
}

/// Series that move with time rather than traffic.
fn moves_with_time(name: &str) -> bool {
    name.starts_with("process_")
        || name == "llorch_node_heartbeats_total"
        || name == "llorch_heartbeats_sent_total"
}

async fn chat(client: &HttpClient, body: Value) -> (StatusCode, Value) {
    let (status, _, value) = post(client, "/v1/chat/completions", &body).await;
    (status, value)
}

fn paris() -> Value {
    json!({
        "model": M,
        "messages": [{"role": "user", "content": "What city is the capital of France?"}],
        "max_tokens": 8,
        "temperature": 0
    })
}

#[tokio::test]
async fn every_documented_metric_is_exported_and_moves_with_traffic() {
    let _guard = serial();
    let stack = Stack::start(StackOptions::default());
    let orch = stack.client();
    let node = HttpClient::new(&format!("unix:{}", stack.node_socket().display())).unwrap();
    let engine_socket = stack.handoff().expect("ready pool").socket;
    let docs = documented();
    assert!(docs.len() >= 35, "METRICS.md lists {} metrics", docs.len());

    let orch0 = scrape(&orch).await;
    let node0 = scrape(&node).await;

    let (usage, native_tokens) = traffic(&stack, &orch, &engine_socket).await;
    let orch1 = scrape(&orch).await;
    let node1 = scrape(&node).await;
    let engine1 = scrape_engine(&engine_socket).await;
    names_types_and_labels_are_as_documented([&orch1, &node1, &engine1], &docs);
    orchestratords_counters_moved_with_the_traffic(&orch0, &orch1, &usage, native_tokens);
    the_nodes_and_engines_counters_moved_with_it([&node0, &node1, &engine1], &usage, native_tokens);
    scrapes_without_traffic_agree(&orch, &node).await;
    the_dashboard_and_alerts_use_exported_names(&orch1, &node1, &docs);
}

/// Two answers, one invalid and one unauthorized request, one cancelled task: each answer's (prompt, completion) tokens, and the tokens the cancelled task produced.
async fn traffic(stack: &Stack, orch: &HttpClient, engine_socket: &str) -> (Vec<(u64, u64)>, f64) {
    // Traffic: two answers, one invalid and one unauthorized request, one cancelled task.
    let mut usage = Vec::new();
    for _ in 0..2 {
        let (status, body) = chat(orch, paris()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        usage.push((
            body["usage"]["prompt_tokens"].as_u64().unwrap(),
            body["usage"]["completion_tokens"].as_u64().unwrap(),
        ));
    }
    let mut tools = paris();
    tools["tools"] = json!([{"type": "function", "function": {"name": "not a name"}}]);
    tools["tool_choice"] = json!("required");
    assert_eq!(chat(orch, tools).await.0, StatusCode::BAD_REQUEST);
    let anonymous = HttpClient::new(&stack.url()).unwrap();
    assert_eq!(chat(&anonymous, paris()).await.0, StatusCode::UNAUTHORIZED);
    let accepted: Value = orch
        .post_json(
            "/v2/tasks",
            &json!({"model_ref": M, "prompt": "1, 2, 3, 4, 5,", "max_tokens": 300, "temperature": 0}),
        )
        .await
        .unwrap();
    let id = accepted["task_id"].as_str().unwrap().to_string();
    let mut events = orch
        .events(&format!("/v2/tasks/{id}/events"))
        .await
        .unwrap();
    let mut seen = 0;
    while seen < 3 {
        if events.next_frame().await.unwrap().unwrap().event == "token" {
            seen += 1;
        }
    }
    let _: Value = orch
        .post_json(&format!("/v2/tasks/{id}/cancel"), &json!({}))
        .await
        .unwrap();
    // The whole log, read again: how many tokens the cancelled task produced.
    let log = frames(
        orch.events(&format!("/v2/tasks/{id}/events"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(log.last().unwrap().event, "error");
    let native_tokens = log.iter().filter(|f| f.event == "token").count() as f64;
    wait_for("no task in flight", Duration::from_secs(10), || {
        stack
            .pools_blocking()
            .is_some_and(|p| p.queue.depth == 0 && p.pools.iter().all(|p| p.slots_busy == 0))
    });

    // The engine frees the cancelled task's slot at its next step.
    let socket = engine_socket;
    wait_until(
        "the engine to free the cancelled task's slot",
        Duration::from_secs(5),
        || async move {
            let free = scrape_engine(socket)
                .await
                .sum("llorch_engine_slots", &[("state", "free")]);
            (free >= 4.0)
                .then_some(())
                .ok_or(format!("{free} of 4 slots free"))
        },
    )
    .await;
    (usage, native_tokens)
}

fn names_types_and_labels_are_as_documented(
    [orch1, node1, engine1]: [&Scrape; 3],
    docs: &[Documented],
) {
    let of = |role: &str| docs.iter().filter(|d| d.role == role).collect::<Vec<_>>();
    check_documented(orch1, &of("orchestratord"), &[], "orchestratord");
    check_documented(node1, &of("pool-managerd"), &[], "pool-managerd");
    check_documented(engine1, &of("llorch-engine"), &[], "engine");
    check_documented(
        node1,
        &of("llorch-engine"),
        &["pool"],
        "engine via pool-managerd",
    );
    for (s, role) in [
        (orch1, "orchestratord"),
        (node1, "pool-managerd"),
        (engine1, "llorch-engine"),
    ] {
        assert_eq!(s.sum("llorch_build_info", &[("role", role)]), 1.0, "{role}");
        assert!(s.has("process_resident_memory_bytes", &[]), "{role}");
    }
}

fn orchestratords_counters_moved_with_the_traffic(
    orch0: &Scrape,
    orch1: &Scrape,
    usage: &[(u64, u64)],
    native_tokens: f64,
) {
    // Counters moved by what the traffic did.
    let (prompt, completion): (u64, u64) = usage.iter().fold((0, 0), |a, u| (a.0 + u.0, a.1 + u.1));
    let d = |name: &str, labels: &[(&str, &str)]| delta(orch0, orch1, name, labels);
    assert_eq!(
        d(
            "llorch_requests_total",
            &[("api", "openai_chat"), ("model", M), ("outcome", "ok")]
        ),
        2.0
    );
    assert_eq!(
        d(
            "llorch_requests_total",
            &[("api", "openai_chat"), ("model", M), ("outcome", "invalid")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "llorch_requests_total",
            &[
                ("api", "openai_chat"),
                ("model", "unknown"),
                ("outcome", "unauthorized")
            ]
        ),
        1.0
    );
    assert_eq!(
        d(
            "llorch_requests_total",
            &[("api", "native"), ("model", M), ("outcome", "canceled")]
        ),
        1.0
    );
    assert_eq!(
        d("llorch_requests_total", &[]),
        5.0,
        "every request counted once"
    );
    assert_eq!(
        d("llorch_tasks_canceled_total", &[("reason", "client")]),
        1.0
    );
    assert_eq!(d("llorch_tasks_canceled_total", &[]), 1.0);
    assert_eq!(
        d("llorch_prompt_tokens_total", &[("model", M)]),
        prompt as f64
    );
    assert_eq!(
        d("llorch_generated_tokens_total", &[("model", M)]),
        completion as f64 + native_tokens
    );
    assert_eq!(
        d("llorch_time_to_first_token_seconds_count", &[("model", M)]),
        3.0
    );
    assert_eq!(
        d("llorch_request_duration_seconds_count", &[("model", M)]),
        3.0
    );
    assert_eq!(
        d("llorch_inter_token_latency_seconds_count", &[("model", M)]),
        2.0
    );
    assert!(d("llorch_inter_token_latency_seconds_sum", &[("model", M)]) > 0.0);
    assert_eq!(d("llorch_queue_wait_seconds_count", &[]), 3.0);
    assert_eq!(
        d("llorch_placement_decisions_total", &[("outcome", "placed")]),
        3.0
    );
    assert_eq!(
        d(
            "llorch_placement_decisions_total",
            &[("outcome", "requeued")]
        ),
        0.0
    );
    assert_eq!(d("llorch_admission_rejections_total", &[]), 0.0);
    assert_eq!(orch1.sum("llorch_tasks_in_flight", &[("model", M)]), 0.0);
    assert_eq!(orch1.sum("llorch_queue_depth", &[]), 0.0);
    assert_eq!(orch1.sum("llorch_queue_capacity", &[]), 64.0);
    assert_eq!(orch1.sum("llorch_pools", &[("state", "ready")]), 1.0);
    assert_eq!(orch1.sum("llorch_pools", &[]), 1.0);
    assert_eq!(orch1.sum("llorch_nodes", &[("state", "online")]), 1.0);
    assert_eq!(orch1.sum("llorch_slots", &[("state", "free")]), 4.0);
    assert_eq!(orch1.sum("llorch_slots", &[("state", "busy")]), 0.0);
    assert!(orch1.sum("llorch_node_heartbeats_total", &[("outcome", "ok")]) >= 1.0);
    // A histogram's buckets hold every observation.
    assert_eq!(
        orch1.sum(
            "llorch_time_to_first_token_seconds_bucket",
            &[("model", M), ("le", "+Inf")]
        ),
        orch1.sum("llorch_time_to_first_token_seconds_count", &[("model", M)])
    );
}

fn the_nodes_and_engines_counters_moved_with_it(
    [node0, node1, engine1]: [&Scrape; 3],
    usage: &[(u64, u64)],
    native_tokens: f64,
) {
    let p = [("pool", "default")];
    let (prompt, completion): (u64, u64) = usage.iter().fold((0, 0), |a, u| (a.0 + u.0, a.1 + u.1));
    let dn = |name: &str, labels: &[(&str, &str)]| delta(node0, node1, name, labels);
    let engine_generated = dn("llorch_engine_generated_tokens_total", &p);
    assert!(
        engine_generated >= completion as f64 + native_tokens,
        "engine generated {engine_generated}, clients saw {completion} + {native_tokens}"
    );
    let engine_prompt = dn("llorch_engine_prompt_tokens_total", &p);
    assert!(
        engine_prompt >= 1.0 && engine_prompt <= prompt as f64 + 20.0,
        "{engine_prompt}"
    );
    let steps = dn("llorch_engine_decode_steps_total", &p);
    assert!(
        steps >= usage.iter().map(|u| u.1).max().unwrap() as f64,
        "{steps} steps"
    );
    assert_eq!(dn("llorch_engine_batch_size_count", &p), steps);
    assert!(node1.sum("llorch_engine_tokens_per_second", &p) > 1.0);
    let kv = node1.sum("llorch_engine_kv_cache_used_ratio", &p);
    assert!(kv > 0.0 && kv <= 1.0, "{kv}");
    assert_eq!(
        node1.sum(
            "llorch_engine_slots",
            &[("pool", "default"), ("state", "free")]
        ),
        4.0
    );
    assert_eq!(
        node1.sum(
            "llorch_pool_slots",
            &[("pool", "default"), ("state", "free")]
        ),
        4.0
    );
    assert_eq!(
        node1.sum(
            "llorch_pool_slots",
            &[("pool", "default"), ("state", "busy")]
        ),
        0.0
    );
    assert_eq!(
        node1.sum(
            "llorch_pool_state",
            &[("pool", "default"), ("state", "ready")]
        ),
        1.0
    );
    assert_eq!(node1.sum("llorch_pool_state", &[("pool", "default")]), 1.0);
    assert_eq!(
        node1.sum(
            "llorch_engine_starts_total",
            &[("pool", "default"), ("result", "ready")]
        ),
        1.0
    );
    assert_eq!(
        node1.sum(
            "llorch_engine_starts_total",
            &[("pool", "default"), ("result", "failed")]
        ),
        0.0
    );
    assert_eq!(node1.sum("llorch_engine_restarts_total", &[]), 0.0);
    assert_eq!(
        node1.sum("llorch_model_load_duration_seconds_count", &p),
        1.0
    );
    assert!(node1.sum("llorch_model_load_duration_seconds_sum", &p) > 0.0);
    assert!(node1.sum("llorch_handoff_events_total", &[("kind", "written")]) >= 1.0);
    assert!(node1.sum("llorch_heartbeats_sent_total", &[("outcome", "ok")]) >= 1.0);
    assert_eq!(
        node1.sum("llorch_model_verification_failures_total", &[]),
        0.0
    );
    // The engine's own scrape and its copy through pool-managerd agree.
    assert_eq!(
        engine1.sum("llorch_engine_decode_steps_total", &[]),
        node1.sum("llorch_engine_decode_steps_total", &p)
    );
}

async fn scrapes_without_traffic_agree(orch: &HttpClient, node: &HttpClient) {
    // Two scrapes in a row without traffic return the same values.
    for (client, what) in [(orch, "orchestratord"), (node, "pool-managerd")] {
        let a = scrape(client).await.values(moves_with_time);
        let b = scrape(client).await.values(moves_with_time);
        assert_eq!(a, b, "{what}: a scrape changed a value");
    }
}

fn the_dashboard_and_alerts_use_exported_names(
    orch1: &Scrape,
    node1: &Scrape,
    docs: &[Documented],
) {
    // The dashboard and the alert rules use only names these daemons export.
    let exported: BTreeSet<String> = [orch1, node1].iter().flat_map(|s| s.names()).collect();
    let nvml: BTreeSet<String> = docs
        .iter()
        .filter(|d| d.nvml_only)
        .map(|d| d.name.clone())
        .collect();
    for file in [
        "docs/observability/grafana-dashboard.json",
        "docs/observability/alerts.yml",
    ] {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        let used = names_used(&text);
        assert!(used.len() >= 5, "{file} uses {used:?}");
        for name in used {
            assert!(
                exported.contains(&name) || nvml.contains(&name),
                "{file} uses {name}, which no daemon exports"
            );
        }
    }
}

/// A journald for the test: the running one, or one started here (and stopped at the end).
struct Journald(Option<Child>);

impl Journald {
    const SOCKET: &'static str = "/run/systemd/journal/socket";

    fn running() -> bool {
        std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.connect(Self::SOCKET))
            .is_ok()
    }

    fn ensure() -> Self {
        if Self::running() {
            return Self(None);
        }
        let bin = "/lib/systemd/systemd-journald";
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: install systemd (scripts/setup.sh does)"
        );
        std::fs::create_dir_all("/run/systemd/journal")
            .expect("create /run/systemd/journal (run as root)");
        let child = Command::new(bin)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start journald");
        let j = Self(Some(child));
        wait_for("journald's socket", Duration::from_secs(10), Self::running);
        j
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            signal(c.id(), libc::SIGTERM);
            let _ = c.wait();
        }
    }
}

/// `journalctl -o json` entries matching `filters`, waiting up to 10 s for at least `n`.
fn journal(filters: &[String], n: usize) -> Vec<Value> {
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    llorch_tests::journal::wait(
        || Command::new("journalctl"),
        &filters,
        n,
        Duration::from_secs(10),
    )
}

#[tokio::test]
async fn journald_gets_one_record_per_task_and_the_engine_crash() {
    let _guard = serial();
    let _journald = Journald::ensure();
    let env = vec![("JOURNAL_STREAM".to_string(), "0:0".to_string())];
    let mut stack = Stack::start(StackOptions {
        node_env: env.clone(),
        orch_env: env,
        ..StackOptions::default()
    });
    let orch = stack.client();
    let node_pid = stack.node.as_ref().unwrap().pid();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let task_id = format!("journal-{}-{stamp}", std::process::id());
    let cid = format!("corr-{task_id}");
    let prompt = "Name the capital of France in one word.";
    let resp = orch
        .post_raw(
            "/v2/tasks",
            serde_json::to_vec(&json!({
                "task_id": task_id, "model_ref": M, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}]
            }))
            .unwrap(),
            &[(
                HeaderName::from_static("x-correlation-id"),
                HeaderValue::from_str(&cid).unwrap(),
            )],
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let log = frames(
        orch.events(&format!("/v2/tasks/{task_id}/events"))
            .await
            .unwrap(),
    )
    .await;
    let end: Value =
        serde_json::from_str(&log.iter().find(|f| f.event == "end").expect("end").data).unwrap();

    one_record_holds_the_tasks_fields_and_no_secret(
        &task_id,
        &cid,
        &end,
        stack.orch.as_ref().unwrap().pid(),
    );
    an_engine_crash_is_recorded_and_counted(&mut stack, node_pid).await;
}

fn one_record_holds_the_tasks_fields_and_no_secret(
    task_id: &str,
    cid: &str,
    end: &Value,
    orch_pid: u32,
) {
    // One record, with the task's fields; no prompt text, no key.
    let records = journal(
        &[
            format!("TASK_ID={task_id}"),
            format!("MESSAGE_ID={}", "e7846ffff7a2484e9c2b1dbb157ce02c"),
        ],
        1,
    );
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    let field = |k: &str| {
        r[k].as_str()
            .unwrap_or_else(|| panic!("no {k} in {r}"))
            .to_string()
    };
    assert_eq!(field("CORRELATION_ID"), cid);
    assert_eq!(field("MODEL"), M);
    assert_eq!(field("POOL_ID"), "default");
    assert_eq!(field("NODE_ID"), "node-a");
    assert_eq!(field("API_KEY_NAME"), "tester");
    assert_eq!(field("API"), "native");
    assert_eq!(field("OUTCOME"), "ok");
    assert_eq!(field("TOKENS_OUT"), end["tokens_out"].to_string());
    assert_eq!(field("TOKENS_IN"), end["tokens_in"].to_string());
    for k in ["QUEUE_MS", "TTFT_MS", "DURATION_MS", "FINISH_REASON"] {
        field(k);
    }
    assert_eq!(field("_PID"), orch_pid.to_string());
    let text = r.to_string();
    assert!(
        !text.contains("capital of France"),
        "prompt text in the record: {text}"
    );
    assert!(!text.contains(TEST_KEY), "API key in the record");
    // Never one record per token: the task's records are few, whatever its length.
    let all = journal(&[format!("TASK_ID={task_id}")], 1);
    assert!(
        all.len() <= 3,
        "{} records for one task: {all:?}",
        all.len()
    );
}

async fn an_engine_crash_is_recorded_and_counted(stack: &mut Stack, node_pid: u32) {
    // Kill the engine: the crash is found by its MESSAGE_ID, and counted.
    let engine_pid = stack.handoff().expect("ready").pid;
    signal(engine_pid, libc::SIGKILL);
    let crashes = journal(
        &[
            "MESSAGE_ID=9e28f6f50b014cb5817eb2a796f3069d".to_string(),
            format!("_PID={node_pid}"),
        ],
        1,
    );
    assert_eq!(crashes.len(), 1, "{crashes:?}");
    assert_eq!(crashes[0]["POOL_ID"], "default");
    assert!(
        crashes[0]["EXIT"].as_str().unwrap().contains("SIGKILL"),
        "{}",
        crashes[0]
    );
    stack.wait_ready();
    let ready = journal(
        &[
            "MESSAGE_ID=abe1172963a64f73ac7bfa31084c61ea".to_string(),
            format!("_PID={node_pid}"),
        ],
        2,
    );
    assert_eq!(ready.len(), 2, "one ready record per start: {ready:?}");
    let node = HttpClient::new(&format!("unix:{}", stack.node_socket().display())).unwrap();
    let s = scrape(&node).await;
    assert_eq!(
        s.sum(
            "llorch_engine_restarts_total",
            &[("pool", "default"), ("reason", "crashed")]
        ),
        1.0
    );
    assert_eq!(
        s.sum(
            "llorch_engine_starts_total",
            &[("pool", "default"), ("result", "ready")]
        ),
        2.0
    );
}
