//! D-Bus, end to end: the real orchestratord and pool-managerd on the real model, with a
//! private `dbus-daemon` (its policy built from the shipped `systemd/org.llamaorch.conf`) as
//! their session bus, driven with `busctl` only, as an operator would. The HTTP API is used to
//! check that both doors lead to the same state, and to make work.
//!
//! The same calls against the real system bus and polkit run in the appliance test.
#![allow(clippy::await_holding_lock)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use llorch_client::HttpClient;
use llorch_tests::bus::{Monitor, PrivateBus};
use llorch_tests::stack::{alive, signal, Stack, StackOptions, MODEL_ID, TEST_KEY};
use llorch_tests::{bin, frames, repo_root, serial};
use llorch_wire::node::PoolState;
use llorch_wire::task::{PoolsAnswer, TaskAccepted, TaskRequest};
use llorch_wire::ErrorCode;
use serde_json::Value;

const ORCH: &str = "org.llamaorch.Orchestrator1";
const ORCH_PATH: &str = "/org/llamaorch/Orchestrator1";
const NODE: &str = "org.llamaorch.PoolManager1";
const NODE_PATH: &str = "/org/llamaorch/PoolManager1";
const POOL: &str = "org.llamaorch.PoolManager1.Pool";
const ON_DEMAND_PATH: &str = "/org/llamaorch/PoolManager1/pool/ondemand";
const DEFAULT_PATH: &str = "/org/llamaorch/PoolManager1/pool/default";
/// The unprivileged caller.
const NOBODY: u32 = 65534;

fn on_demand_pool() -> String {
    format!(
        r#"
[[pools]]
id = "ondemand"
slots = 1
ctx = 512
threads = 2
on_demand = true
keep_alive_secs = 600

[pools.model]
id = "smollm2-on-demand"
source = "{}"
sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"#,
        llorch_tests::model_path().display()
    )
}

/// (member, kind, signature, returns) of one interface, from `busctl introspect`; `returns` is
/// kept for methods only (a property's column is its value).
fn introspected(bus: &PrivateBus, service: &str, path: &str, iface: &str) -> BTreeSet<[String; 4]> {
    let text = bus.ok(&["introspect", "--no-pager", service, path, iface]);
    text.lines()
        .filter(|l| l.starts_with('.'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let returns = if f[1] == "method" { f[3] } else { "" };
            [
                f[0][1..].to_string(),
                f[1].into(),
                f[2].into(),
                returns.into(),
            ]
        })
        .collect()
}

/// The same, from the table under the heading "### `iface`" in docs/DBUS.md.
fn documented(iface: &str) -> BTreeSet<[String; 4]> {
    let doc = std::fs::read_to_string(repo_root().join("docs/DBUS.md")).unwrap();
    let heading = format!("### `{iface}`");
    let start = doc
        .lines()
        .position(|l| l.trim() == heading)
        .unwrap_or_else(|| panic!("docs/DBUS.md has no heading {heading}"));
    doc.lines()
        .skip(start + 1)
        .take_while(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let f: Vec<String> = l
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect();
            let returns = if f[2] == "method" {
                f[4].clone()
            } else {
                String::new()
            };
            [f[1].clone(), f[2].clone(), f[3].clone(), returns]
        })
        .collect()
}

async fn pools(c: &HttpClient) -> PoolsAnswer {
    c.get_json("/v2/pools").await.expect("pools")
}

fn http_pool(p: &PoolsAnswer, id: &str) -> PoolState {
    p.pools.iter().find(|p| p.pool_id == id).unwrap().state
}

/// `busctl get-property` of one property, as busctl prints it (`s "ready"`).
fn property(bus: &PrivateBus, service: &str, path: &str, iface: &str, name: &str) -> String {
    bus.ok(&["get-property", service, path, iface, name])
        .trim()
        .to_string()
}

/// Waits until `cond` holds for what `busctl monitor` has seen (at most 2 minutes).
fn wait_seen(monitor: &llorch_tests::bus::Monitor, what: &str, cond: impl Fn(&[Value]) -> bool) {
    assert!(
        monitor.wait_for(Duration::from_secs(120), cond),
        "busctl monitor did not see {what}: {:#?}",
        monitor.messages()
    );
}

/// `busctl call` of an orchestratord method (`[method, signature, args...]`): its output.
fn orch(bus: &PrivateBus, method: &[&str]) -> String {
    bus.ok(&orch_args(method))
}

fn orch_args<'a>(method: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["call", ORCH, ORCH_PATH, ORCH];
    args.extend_from_slice(method);
    args
}

fn is_signal(m: &Value, member: &str, data: &[&str]) -> bool {
    m["type"] == "signal"
        && m["member"] == member
        && data
            .iter()
            .enumerate()
            .all(|(i, d)| m["payload"]["data"][i] == *d)
}

#[tokio::test]
async fn operators_drive_both_daemons_with_busctl_on_a_private_bus() {
    let _g = serial();
    let bus = PrivateBus::start();
    let stack = Stack::start(StackOptions {
        queue_capacity: 200,
        orch_env: bus.env(),
        node_env: bus.env(),
        extra_node_toml: on_demand_pool(),
        ..StackOptions::default()
    });
    let c = stack.client();

    introspection_matches_the_docs(&bus);
    properties_read_the_http_apis_state(&bus, &stack);
    llorch_acts_over_the_bus_without_a_key(&bus, &stack, &c).await;
    let monitor = bus.monitor(&[ORCH, NODE]);
    pools_drain_and_resume_on_the_bus(&bus, &c, &monitor).await;
    queue_changes_are_announced_at_a_bounded_rate(&bus, &c, &monitor).await;
    cancel_task_ends_a_stream(&bus, &c).await;
    an_on_demand_pool_loads_and_unloads(&bus, &c, &monitor).await;
    nodes_drain_and_keys_reload(&bus, &stack);
    let new_engine = restart_starts_a_new_engine(&bus, &stack, &monitor);
    reload_checks_the_configuration_first(&bus, &stack, &monitor);
    a_stopped_node_is_lost_and_joins_again(&stack, &monitor);
    another_user_may_read_but_not_act(&bus, &stack, &c, new_engine).await;
}

fn introspection_matches_the_docs(bus: &PrivateBus) {
    // What busctl introspects is what docs/DBUS.md lists, member by member.
    for (service, path, iface) in [
        (ORCH, ORCH_PATH, ORCH),
        (NODE, NODE_PATH, NODE),
        (NODE, DEFAULT_PATH, POOL),
    ] {
        let have = introspected(bus, service, path, iface);
        assert!(have.len() >= 4, "{iface}: {have:?}");
        assert_eq!(
            have,
            documented(iface),
            "{iface}: introspection vs docs/DBUS.md"
        );
    }
    let tree = bus.ok(&["tree", "--no-pager", NODE]);
    for path in [DEFAULT_PATH, ON_DEMAND_PATH] {
        assert!(tree.contains(path), "{tree}");
    }
    let listed = bus.ok(&["call", NODE, NODE_PATH, NODE, "ListPools"]);
    assert!(
        listed.contains(&format!("\"default\" \"{DEFAULT_PATH}\" \"ready\""))
            && listed.contains(&format!("\"ondemand\" \"{ON_DEMAND_PATH}\" \"standby\"")),
        "{listed}"
    );
}

fn properties_read_the_http_apis_state(bus: &PrivateBus, stack: &Stack) {
    // Properties read the same state as the HTTP API.
    assert_eq!(property(bus, ORCH, ORCH_PATH, ORCH, "Ready"), "b true");
    assert_eq!(
        property(bus, ORCH, ORCH_PATH, ORCH, "QueueCapacity"),
        "u 200"
    );
    let nodes = property(bus, ORCH, ORCH_PATH, ORCH, "Nodes");
    assert!(
        nodes.starts_with("a(ssstasb) 1 \"node-a\" \"online\""),
        "{nodes}"
    );
    let pools_prop = property(bus, ORCH, ORCH_PATH, ORCH, "Pools");
    assert!(
        pools_prop.contains(&format!(
            "\"node-a\" \"default\" \"{MODEL_ID}\" \"ready\" 4 4 false"
        )),
        "{pools_prop}"
    );
    assert_eq!(
        property(bus, NODE, DEFAULT_PATH, POOL, "State"),
        "s \"ready\""
    );
    assert_eq!(
        property(bus, NODE, DEFAULT_PATH, POOL, "Sha256"),
        "s \"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\""
    );
    let engine_pid = stack.handoff().expect("the default pool's handoff").pid;
    assert_eq!(
        property(bus, NODE, DEFAULT_PATH, POOL, "EnginePid"),
        format!("u {engine_pid}")
    );
}

async fn llorch_acts_over_the_bus_without_a_key(bus: &PrivateBus, stack: &Stack, c: &HttpClient) {
    // llorch finds orchestratord on the bus and needs no API key there; over HTTP (--dbus
    // off) the same command without a key is refused, with one it works.
    let llorch = |args: &[&str], key: Option<&str>| {
        let mut cmd = std::process::Command::new(bin("llorch"));
        cmd.args(args)
            .args(["--url", &stack.url()])
            .env_remove("LLORCH_API_KEY")
            .env_remove("LLORCH_DBUS")
            .env("DBUS_SESSION_BUS_ADDRESS", &bus.address);
        if let Some(k) = key {
            cmd.env("LLORCH_API_KEY", k);
        }
        cmd.output().expect("llorch")
    };
    let out = llorch(&["pools", "drain", "default", "--dbus", "session"], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pool default: drain requested over D-Bus"
    );
    assert_eq!(http_pool(&pools(c).await, "default"), PoolState::Draining);
    let out = llorch(&["status", "--bus", "--dbus", "session"], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("default") && l.contains("node-a") && l.contains("draining")),
        "{text}"
    );
    assert!(text.contains("(read over D-Bus)"), "{text}");
    let out = llorch(&["pools", "resume", "default", "--dbus", "off"], None);
    assert!(!out.status.success(), "HTTP without a key: {out:?}");
    let out = llorch(
        &["pools", "resume", "default", "--dbus", "off"],
        Some(TEST_KEY),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(http_pool(&pools(c).await, "default"), PoolState::Ready);
}

async fn pools_drain_and_resume_on_the_bus(bus: &PrivateBus, c: &HttpClient, monitor: &Monitor) {
    // DrainPool on the bus: the HTTP API shows the pool draining, both daemons signal it.
    orch(bus, &["DrainPool", "ss", "", "default"]);
    assert_eq!(http_pool(&pools(c).await, "default"), PoolState::Draining);
    wait_seen(monitor, "PoolStateChanged for the drain", |m| {
        m.iter().any(|m| {
            is_signal(
                m,
                "PoolStateChanged",
                &["node-a", "default", "ready", "draining"],
            )
        }) && m
            .iter()
            .any(|m| is_signal(m, "PoolStateChanged", &["default", "ready", "draining"]))
    });
    orch(bus, &["ResumePool", "ss", "node-a", "default"]);
    assert_eq!(http_pool(&pools(c).await, "default"), PoolState::Ready);
    let unknown = bus.busctl(&orch_args(&["DrainPool", "ss", "", "nope"]));
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("pool \"nope\" is not known"),
        "{unknown:?}"
    );
}

async fn queue_changes_are_announced_at_a_bounded_rate(
    bus: &PrivateBus,
    c: &HttpClient,
    monitor: &Monitor,
) {
    // 200 short tasks wait behind the drained pool and fill the queue: the next two are
    // refused, and QueueSaturated says so once. Resumed, the tasks run: QueueDepth changes
    // 200 times, PropertiesChanged goes out at most four times a second (plus the edges).
    orch(bus, &["DrainPool", "ss", "", "default"]);
    let task = |id: String| TaskRequest {
        task_id: Some(id),
        model_ref: MODEL_ID.into(),
        prompt: Some("Hello".into()),
        max_tokens: Some(1),
        temperature: Some(0.0),
        ..TaskRequest::default()
    };
    for i in 0..200 {
        c.post_json::<_, TaskAccepted>("/v2/tasks", &task(format!("burst-{i}")))
            .await
            .expect("accepted");
    }
    for i in 0..2 {
        let refused = c
            .post_json::<_, TaskAccepted>("/v2/tasks", &task(format!("refused-{i}")))
            .await;
        assert!(refused.is_err(), "the full queue took another task");
    }
    wait_seen(monitor, "QueueSaturated", |m| {
        m.iter().any(|m| {
            m["type"] == "signal"
                && m["member"] == "QueueSaturated"
                && m["payload"]["data"][0] == 200
        })
    });
    let from = monitor.messages().len();
    let start = Instant::now();
    orch(bus, &["ResumePool", "ss", "", "default"]);
    // The last changes are announced within one period: the queue empty, nothing running.
    wait_seen(monitor, "QueueDepth and RunningTasks back to 0", |m| {
        let (mut depth, mut running) = (None, None);
        for m in &m[from..] {
            if is_signal(m, "PropertiesChanged", &[ORCH]) {
                let changed = &m["payload"]["data"][1];
                depth = changed["QueueDepth"]["data"].as_u64().or(depth);
                running = changed["RunningTasks"]["data"].as_u64().or(running);
            }
        }
        depth == Some(0) && running == Some(0)
    });
    let p = pools(c).await;
    assert_eq!((p.queue.depth, p.queue.running), (0, 0), "{p:?}");
    let window = start.elapsed();
    assert_eq!(
        monitor.signals("QueueSaturated").len(),
        1,
        "once per episode"
    );
    let depth_signals: Vec<u64> = monitor.messages()[from..]
        .iter()
        .filter(|m| is_signal(m, "PropertiesChanged", &[ORCH]))
        .filter_map(|m| m["payload"]["data"][1]["QueueDepth"]["data"].as_u64())
        .collect();
    let bound = (window.as_secs_f64() / 0.25).ceil() as usize + 2;
    eprintln!(
        "dbus: 200 tasks in {} ms: {} PropertiesChanged with QueueDepth (bound {bound}), highest depth {:?}",
        window.as_millis(),
        depth_signals.len(),
        depth_signals.iter().max()
    );
    assert!(depth_signals.len() >= 2, "{depth_signals:?}");
    assert!(
        depth_signals.len() <= bound,
        "{depth_signals:?} in {window:?}"
    );
    assert!(depth_signals.iter().any(|d| *d > 0), "{depth_signals:?}");
}

async fn cancel_task_ends_a_stream(bus: &PrivateBus, c: &HttpClient) {
    // CancelTask ends a running stream with CANCELED, whoever submitted it.
    let long = TaskRequest {
        task_id: Some("dbus-cancel".into()),
        model_ref: MODEL_ID.into(),
        prompt: Some("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,".into()),
        max_tokens: Some(400),
        temperature: Some(0.0),
        ..TaskRequest::default()
    };
    let accepted: TaskAccepted = c.post_json("/v2/tasks", &long).await.unwrap();
    let mut stream = c.events(&accepted.streams.sse).await.unwrap();
    let mut tokens = 0;
    while tokens < 3 {
        if stream.next_frame().await.unwrap().unwrap().event == "token" {
            tokens += 1;
        }
    }
    let canceled = orch(bus, &["CancelTask", "s", "dbus-cancel"]);
    assert_eq!(canceled.trim(), "b true");
    let rest = frames(stream).await;
    let last = rest.last().expect("the stream ends");
    assert_eq!(last.event, "error", "{rest:?}");
    let body: llorch_wire::ErrorBody = serde_json::from_str(&last.data).unwrap();
    assert_eq!(body.code, ErrorCode::Canceled, "{body:?}");
    let again = orch(bus, &["CancelTask", "s", "dbus-cancel"]);
    assert_eq!(again.trim(), "b false");
}

async fn an_on_demand_pool_loads_and_unloads(bus: &PrivateBus, c: &HttpClient, monitor: &Monitor) {
    // Load and Unload of the on-demand pool: its engine starts, and stops again.
    assert_eq!(
        property(bus, NODE, ON_DEMAND_PATH, POOL, "State"),
        "s \"standby\""
    );
    assert_eq!(
        property(bus, NODE, ON_DEMAND_PATH, POOL, "EnginePid"),
        "u 0"
    );
    bus.ok(&["call", NODE, ON_DEMAND_PATH, POOL, "Load"]);
    // pool-managerd says so at once; orchestratord with the node's next heartbeat.
    wait_seen(monitor, "the on-demand pool ready", |m| {
        m.iter()
            .any(|m| is_signal(m, "PoolStateChanged", &["ondemand", "loading", "ready"]))
            && m.iter().any(|m| {
                is_signal(
                    m,
                    "PoolStateChanged",
                    &["node-a", "ondemand", "loading", "ready"],
                )
            })
    });
    let pid: u32 = property(bus, NODE, ON_DEMAND_PATH, POOL, "EnginePid")
        .trim_start_matches("u ")
        .parse()
        .unwrap();
    assert!(pid > 0 && alive(pid));
    assert_eq!(http_pool(&pools(c).await, "ondemand"), PoolState::Ready);
    bus.ok(&["call", NODE, ON_DEMAND_PATH, POOL, "Unload"]);
    assert!(!alive(pid), "the engine {pid} still runs after Unload");
    assert_eq!(
        property(bus, NODE, ON_DEMAND_PATH, POOL, "EnginePid"),
        "u 0"
    );
    assert_eq!(
        property(bus, NODE, ON_DEMAND_PATH, POOL, "State"),
        "s \"standby\""
    );
    let not_on_demand = bus.busctl(&["call", NODE, DEFAULT_PATH, POOL, "Unload"]);
    assert!(!not_on_demand.status.success());
    assert!(
        String::from_utf8_lossy(&not_on_demand.stderr).contains("not on demand"),
        "{not_on_demand:?}"
    );
    assert_eq!(
        property(bus, NODE, DEFAULT_PATH, POOL, "State"),
        "s \"ready\""
    );
}

fn nodes_drain_and_keys_reload(bus: &PrivateBus, stack: &Stack) {
    // DrainNode and ResumeNode show in the Nodes property; ReloadKeys reads the key files.
    orch(bus, &["DrainNode", "s", "node-a"]);
    let nodes = property(bus, ORCH, ORCH_PATH, ORCH, "Nodes");
    assert!(nodes.ends_with("true"), "{nodes}");
    orch(bus, &["ResumeNode", "s", "node-a"]);
    let nodes = property(bus, ORCH, ORCH_PATH, ORCH, "Nodes");
    assert!(nodes.ends_with("false"), "{nodes}");
    orch(bus, &["ReloadKeys"]);
    assert!(
        stack.logs().contains("Reloaded the key files."),
        "{}",
        stack.logs()
    );
}

fn restart_starts_a_new_engine(bus: &PrivateBus, stack: &Stack, monitor: &Monitor) -> u32 {
    // Restart: a new engine serves the default pool.
    let old_engine = stack.handoff().expect("handoff").pid;
    bus.ok(&["call", NODE, DEFAULT_PATH, POOL, "Restart"]);
    assert!(!alive(old_engine), "the old engine {old_engine} still runs");
    wait_seen(monitor, "the default pool ready again", |m| {
        m.iter()
            .filter(|m| is_signal(m, "PoolStateChanged", &["default", "loading", "ready"]))
            .count()
            >= 1
    });
    let new_engine: u32 = property(bus, NODE, DEFAULT_PATH, POOL, "EnginePid")
        .trim_start_matches("u ")
        .parse()
        .unwrap();
    assert!(new_engine != old_engine && alive(new_engine));
    assert_eq!(property(bus, NODE, DEFAULT_PATH, POOL, "Restarts"), "u 0");
    new_engine
}

fn reload_checks_the_configuration_first(bus: &PrivateBus, stack: &Stack, monitor: &Monitor) {
    // Reload: a node.toml that fails its checks changes nothing; one without the on-demand
    // pool removes its object.
    let config = stack.dir.path().join("node.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("slots = 1", "slots = 0")).unwrap();
    let refused = bus.busctl(&["call", NODE, NODE_PATH, NODE, "Reload"]);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("slots"),
        "{refused:?}"
    );
    assert!(bus
        .ok(&["tree", "--no-pager", NODE])
        .contains(ON_DEMAND_PATH));
    std::fs::write(&config, good.replace(&on_demand_pool(), "")).unwrap();
    bus.ok(&["call", NODE, NODE_PATH, NODE, "Reload"]);
    wait_seen(monitor, "the on-demand pool removed", |m| {
        m.iter().any(|m| {
            is_signal(m, "PoolStateChanged", &["ondemand"]) && m["payload"]["data"][2] == ""
        })
    });
    let tree = bus.ok(&["tree", "--no-pager", NODE]);
    assert!(
        !tree.contains(ON_DEMAND_PATH) && tree.contains(DEFAULT_PATH),
        "{tree}"
    );
    std::fs::write(&config, &good).unwrap();
}

fn a_stopped_node_is_lost_and_joins_again(stack: &Stack, monitor: &Monitor) {
    // A node that stops answering is lost, and joins again when it is back.
    let node_pid = stack.node.as_ref().expect("pool-managerd").pid();
    signal(node_pid, libc::SIGSTOP);
    wait_seen(monitor, "NodeLost", |m| {
        m.iter()
            .any(|m| is_signal(m, "NodeLost", &["node-a", "missed its heartbeats"]))
    });
    let joined_before = monitor.signals("NodeJoined").len();
    signal(node_pid, libc::SIGCONT);
    wait_seen(monitor, "NodeJoined after the node came back", |m| {
        m.iter()
            .filter(|m| is_signal(m, "NodeJoined", &["node-a"]))
            .count()
            > joined_before
    });
}

async fn another_user_may_read_but_not_act(
    bus: &PrivateBus,
    stack: &Stack,
    c: &HttpClient,
    new_engine: u32,
) {
    // Another user: may read, may not act, may not own our names; the refusal is logged.
    if llorch_tests::rootfs::is_root() {
        let denied = bus.busctl_as(
            NOBODY,
            &[
                "call",
                ORCH,
                ORCH_PATH,
                ORCH,
                "DrainPool",
                "ss",
                "",
                "default",
            ],
        );
        assert!(!denied.status.success(), "{denied:?}");
        assert!(
            String::from_utf8_lossy(&denied.stderr).contains("Access denied"),
            "{denied:?}"
        );
        let denied = bus.busctl_as(NOBODY, &["call", NODE, DEFAULT_PATH, POOL, "Restart"]);
        assert!(
            String::from_utf8_lossy(&denied.stderr).contains("Access denied"),
            "{denied:?}"
        );
        let read = bus.busctl_as(NOBODY, &["get-property", ORCH, ORCH_PATH, ORCH, "Ready"]);
        assert!(read.status.success(), "{read:?}");
        assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "b true");
        let own = bus.busctl_as(
            NOBODY,
            &[
                "call",
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "RequestName",
                "su",
                ORCH,
                "0",
            ],
        );
        assert!(
            String::from_utf8_lossy(&own.stderr).contains("Access denied")
                || String::from_utf8_lossy(&own.stderr).contains("not allowed"),
            "{own:?}"
        );
        assert_eq!(http_pool(&pools(c).await, "default"), PoolState::Ready);
        assert_eq!(
            property(bus, NODE, DEFAULT_PATH, POOL, "EnginePid"),
            format!("u {new_engine}")
        );
        let logs = stack.logs();
        assert!(
            logs.lines().any(|l| l.contains("Refused a D-Bus call")
                && l.contains("uid=65534")
                && l.contains("method=\"DrainPool\"")),
            "{logs}"
        );
    } else {
        llorch_tests::skip("the unprivileged caller needs root (setpriv)");
    }
}
