//! The appliance under a real systemd: a minimal Debian root filesystem (debootstrap, cached
//! outside the repository) boots in `systemd-nspawn` with systemd as PID 1; the binaries, the
//! units from `systemd/`, a node configuration and the default model are installed the way a
//! package would; and the test drives it only with what an operator has: `systemctl`,
//! `journalctl`, `busctl` (inside, through `nsenter`) and `curl` (from the host: the container
//! shares the host's network). The container is powered off at the end, also when a step fails.
//!
//! Needs root (or passwordless sudo), `systemd-nspawn` (systemd-container) and `debootstrap`;
//! `scripts/setup.sh` installs both. `make test-appliance` runs this test alone.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use llorch_tests::appliance::{boot, curl, default_pool, stage, MODEL_SHA256};
use llorch_tests::container::Container;
use llorch_tests::stack::{free_port, MODEL_ID};
use llorch_tests::{model_path, serial};
use serde_json::Value;

/// The appliance's pools: the default model always loaded, and the same file on demand.
fn pools() -> String {
    format!(
        r#"{}
# Loaded by its first request, unloaded after 5 s without one.
[[pools]]
id = "ondemand"
slots = 1
ctx = 1024
threads = 2
on_demand = true
keep_alive_secs = 5

[pools.model]
id = "{ON_DEMAND_MODEL}"
source = "/mnt/llorch/model.gguf"
sha256 = "{MODEL_SHA256}"
"#,
        default_pool()
    )
}

/// The on-demand pool's model id (the same file as the default pool's, served apart).
const ON_DEMAND_MODEL: &str = "smollm2-on-demand";

/// orchestratord's status line while the default pool serves and the on-demand one is
/// unloaded.
const SERVING: &str = "1 of 2 pools ready (1 on standby) on 1 nodes";

fn chat_body(question: &str, max_tokens: u32) -> String {
    chat_body_for(MODEL_ID, question, max_tokens)
}

fn chat_body_for(model: &str, question: &str, max_tokens: u32) -> String {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0
    })
    .to_string()
}

/// Asks the on-demand pool's model; returns the answer's text.
fn ask_on_demand(port: u16) -> String {
    let body = chat_body_for(ON_DEMAND_MODEL, "What city is the capital of France?", 16);
    let (status, body) = curl(
        port,
        &["-H", "content-type: application/json", "-d", &body],
        "/v1/chat/completions",
    );
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

const ORCH: [&str; 3] = [
    "org.llamaorch.Orchestrator1",
    "/org/llamaorch/Orchestrator1",
    "org.llamaorch.Orchestrator1",
];
const ON_DEMAND_POOL: [&str; 3] = [
    "org.llamaorch.PoolManager1",
    "/org/llamaorch/PoolManager1/pool/ondemand",
    "org.llamaorch.PoolManager1.Pool",
];

/// `busctl ARGS` inside the container as the unprivileged user `nobody`.
fn as_nobody(c: &Container, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "busctl",
    ];
    all.extend_from_slice(args);
    c.sh(&all)
}

/// A D-Bus property of `object` (service, path, interface), as busctl prints it.
fn bus_property(c: &Container, object: [&str; 3], name: &str) -> String {
    let mut args = vec!["busctl", "get-property"];
    args.extend_from_slice(&object);
    args.push(name);
    c.ok(&args).trim().to_string()
}

/// The default pool's state, as the HTTP API says it.
fn default_pool_state(port: u16) -> String {
    let (status, body) = curl(port, &[], "/v2/pools");
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pool_id"] == "default")
        .unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The daemons on the real system bus with the shipped policy and real polkit: root may act,
/// `nobody` may read but is refused (and logged), and Load/Unload drive the on-demand pool's
/// engine unit through systemd.
fn dbus_on_the_system_bus(c: &Container, port: u16) {
    names_and_engine_units_belong_to_their_users(c);
    root_drains_and_resumes_on_the_bus(c, port);
    nobody_reads_and_is_refused_the_rest(c, port);
    an_admin_group_member_may_act(c, port);
    load_and_unload_drive_the_engine_unit(c);
}

fn names_and_engine_units_belong_to_their_users(c: &Container) {
    let tree = c.ok(&["busctl", "tree", "--no-pager", "org.llamaorch.PoolManager1"]);
    for pool in ["default", "ondemand"] {
        assert!(
            tree.contains(&format!("/org/llamaorch/PoolManager1/pool/{pool}")),
            "{tree}"
        );
    }
    assert_eq!(bus_property(c, ORCH, "Ready"), "b true");
    // Each name is owned by its daemon's user, as the policy wants.
    for (name, user) in [
        ("org.llamaorch.Orchestrator1", "llama-orch-api"),
        ("org.llamaorch.PoolManager1", "llama-orch"),
    ] {
        let uid = c.ok(&["id", "-u", user]).trim().to_string();
        let owner = c.ok(&["busctl", "status", "--no-pager", name]);
        assert!(owner.lines().any(|l| l == format!("EUID={uid}")), "{owner}");
    }
    // Only pool-managerd's user may drive the engine units; orchestratord's, which faces the
    // network, may not (the polkit rule).
    let start_engine = |user: &str| {
        c.sh(&[
            "setpriv",
            &format!("--reuid={user}"),
            &format!("--regid={user}"),
            "--clear-groups",
            "busctl",
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "StartUnit",
            "ss",
            "llorch-engine@default.service",
            "replace",
        ])
    };
    // (systemd answers "interactive authentication required": only an admin could.)
    let refused = start_engine("llama-orch-api");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && (why.contains("Access denied") || why.contains("Interactive authentication")),
        "{refused:?}"
    );
    let allowed = start_engine("llama-orch");
    assert!(allowed.status.success(), "{allowed:?}");
}

fn root_drains_and_resumes_on_the_bus(c: &Container, port: u16) {
    // Root drains and resumes the default pool; the HTTP API agrees.
    let drain = |c: &Container, method: &str| {
        let mut args = vec!["busctl", "call"];
        args.extend_from_slice(&ORCH);
        args.extend_from_slice(&[method, "ss", "", "default"]);
        c.ok(&args);
    };
    drain(c, "DrainPool");
    assert_eq!(default_pool_state(port), "draining");
    drain(c, "ResumePool");
    assert_eq!(default_pool_state(port), "ready");
}

fn nobody_reads_and_is_refused_the_rest(c: &Container, port: u16) {
    // nobody reads, and is refused a mutating call by polkit; the refusal is in the journal
    // with its uid, and nothing changed.
    let read = as_nobody(c, &["get-property", ORCH[0], ORCH[1], ORCH[2], "Ready"]);
    assert!(read.status.success(), "{read:?}");
    assert_eq!(String::from_utf8_lossy(&read.stdout).trim(), "b true");
    let denied = as_nobody(
        c,
        &[
            "call",
            ORCH[0],
            ORCH[1],
            ORCH[2],
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
    let denied = as_nobody(
        c,
        &[
            "call",
            ON_DEMAND_POOL[0],
            ON_DEMAND_POOL[1],
            ON_DEMAND_POOL[2],
            "Load",
        ],
    );
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Access denied"),
        "{denied:?}"
    );
    assert_eq!(default_pool_state(port), "ready");
}

fn an_admin_group_member_may_act(c: &Container, port: u16) {
    // A member of llama-orch-admin is allowed by polkit itself (the shipped rule), no password.
    c.ok(&[
        "useradd",
        "--no-create-home",
        "--groups",
        "llama-orch-admin",
        "operator1",
    ]);
    let as_operator = |c: &Container, method: &str| {
        c.sh(&[
            "setpriv",
            "--reuid=operator1",
            "--regid=operator1",
            "--init-groups",
            "busctl",
            "call",
            ORCH[0],
            ORCH[1],
            ORCH[2],
            method,
            "ss",
            "",
            "default",
        ])
    };
    let allowed = as_operator(c, "DrainPool");
    assert!(
        allowed.status.success(),
        "{allowed:?}\n{:?}",
        c.journal(&[
            "-u",
            "orchestratord",
            "MESSAGE_ID=e4b3e844652a43f981c68f4663a5e12e"
        ])
    );
    assert_eq!(default_pool_state(port), "draining");
    let allowed = as_operator(c, "ResumePool");
    assert!(allowed.status.success(), "{allowed:?}");
    assert_eq!(default_pool_state(port), "ready");
    let refused = c.journal(&[
        "-u",
        "orchestratord",
        &format!("MESSAGE_ID={}", "e4b3e844652a43f981c68f4663a5e12e"),
    ]);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["UID"], "65534", "{}", refused[0]);
    assert_eq!(refused[0]["METHOD"], "DrainPool", "{}", refused[0]);
}

fn load_and_unload_drive_the_engine_unit(c: &Container) {
    // Load starts the on-demand engine unit through systemd; Unload stops it, and the pool is
    // on standby with its socket listening.
    let ondemand = "llorch-engine@ondemand.service";
    assert_eq!(bus_property(c, ON_DEMAND_POOL, "State"), "s \"standby\"");
    let mut load = vec!["busctl", "call"];
    load.extend_from_slice(&ON_DEMAND_POOL);
    load.push("Load");
    c.ok(&load);
    c.wait_until(
        "the on-demand pool loaded over D-Bus",
        Duration::from_secs(60),
        |c| bus_property(c, ON_DEMAND_POOL, "State") == "s \"ready\"",
    );
    let engine = c.main_pid(ondemand);
    assert_ne!(engine, 0);
    assert_eq!(
        bus_property(c, ON_DEMAND_POOL, "EnginePid"),
        format!("u {engine}")
    );
    let mut unload = vec!["busctl", "call"];
    unload.extend_from_slice(&ON_DEMAND_POOL);
    unload.push("Unload");
    c.ok(&unload);
    assert_eq!(c.show(ondemand, "ActiveState"), "inactive");
    assert_eq!(
        c.show("llorch-engine@ondemand.socket", "ActiveState"),
        "active"
    );
    c.wait_until(
        "the on-demand pool on standby",
        Duration::from_secs(30),
        |c| bus_property(c, ON_DEMAND_POOL, "State") == "s \"standby\"",
    );
}

fn chat(port: u16, extra: &[&str]) -> (u16, String) {
    let body = chat_body("What city is the capital of France?", 16);
    let mut args = vec!["-H", "content-type: application/json", "-d", &body];
    args.extend_from_slice(extra);
    curl(port, &args, "/v1/chat/completions")
}

#[test]
fn the_appliance_boots_serves_restarts_and_recovers_under_systemd() {
    let _guard = serial();
    let stage_dir = tempfile::Builder::new()
        .prefix("llorch-appliance-")
        .tempdir()
        .unwrap();
    let port = free_port();
    stage(stage_dir.path(), port, &pools(), "");
    let mut c = boot(stage_dir.path(), "test");

    socket_activation_starts_orchestratord(&c, port);
    the_target_brings_the_pool_up(&c, port);
    the_node_token_is_roots_alone(&c);
    the_local_socket_is_for_the_node_agent(&c, port);
    an_idle_node_agent_uses_no_cpu(&c);
    status_shows_what_each_daemon_said(&c, port);
    the_requests_journal_record_is_structured(&c);
    an_on_demand_pool_loads_unloads_and_loads_again(&c, port);
    no_connection_is_refused_across_a_restart(&c, port);
    a_stuck_orchestratord_is_restarted_by_its_watchdog(&c, port);
    the_engine_runs_confined_in_its_own_unit(&c);
    a_killed_engine_is_restarted_and_serves(&c, port);
    removed_keys_are_refused_after_a_reload(&c, port);
    a_rotated_node_token_takes_the_node_offline(&c, port);
    // A clean poweroff.
    assert!(
        c.poweroff(),
        "the container did not power off cleanly:\n{}",
        c.log_text()
    );
}

fn socket_activation_starts_orchestratord(c: &Container, port: u16) {
    // Socket activation: with only the sockets started (as sockets.target does at boot; a
    // socket whose service already runs refuses to start), the first request starts
    // orchestratord.
    c.ok(&[
        "systemctl",
        "start",
        "orchestratord.socket",
        "orchestratord-local.socket",
    ]);
    assert_eq!(c.show("orchestratord.service", "ActiveState"), "inactive");
    let (status, body) = curl(port, &[], "/health/live");
    assert_eq!(status, 200, "{body}");
    assert_eq!(c.show("orchestratord.service", "ActiveState"), "active");
}

fn the_target_brings_the_pool_up(c: &Container, port: u16) {
    // The target brings up the rest; the pool becomes ready and answers in English.
    c.ok(&["systemctl", "start", "llama-orch.target"]);
    c.wait_until("a ready pool", Duration::from_secs(120), |c| {
        c.show("orchestratord.service", "StatusText")
            .starts_with(SERVING)
    });
    let (status, body) = chat(port, &["-H", "x-correlation-id: appliance-first"]);
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
}

fn the_node_token_is_roots_alone(c: &Container) {
    // The node token was generated once, before the daemons started, readable by root alone;
    // the node registered with it, and a local process without it cannot register.
    assert_eq!(c.show("llama-orch-node-token.service", "Result"), "success");
    let modes = c.ok(&[
        "stat",
        "-c",
        "%a %U",
        "/etc/llama-orch/node-token",
        "/etc/llama-orch/node-tokens",
    ]);
    assert_eq!(modes.trim(), "600 root\n600 root", "{modes}");
}

fn the_local_socket_is_for_the_node_agent(c: &Container, port: u16) {
    // orchestratord's local socket (plain HTTP for this machine's node agent): its group and
    // the API's user only.
    let local = c.ok(&[
        "stat",
        "-c",
        "%a %U %G",
        "/run/llama-orch/orchestratord.sock",
    ]);
    assert_eq!(local.trim(), "660 llama-orch-api llama-orch", "{local}");
    let bogus = r#"{"node_id":"intruder","address":"http://bad host:1","version":"0","heartbeat_secs":5,"pools":[]}"#;
    let (status, body) = curl(
        port,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            bogus,
        ],
        "/v2/nodes/register",
    );
    assert_eq!(status, 401, "{body}");
}

fn an_idle_node_agent_uses_no_cpu(c: &Container) {
    // Idle, pool-managerd (which follows its engine unit over D-Bus) uses next to no CPU:
    // utime + stime of its main process, in clock ticks (1/100 s), over two seconds.
    let node_pid = c.main_pid("pool-managerd.service");
    let ticks = |c: &Container| -> u64 {
        let stat = c.ok(&["cat", &format!("/proc/{node_pid}/stat")]);
        let after_comm = stat.rsplit_once(')').expect("stat").1;
        let f: Vec<&str> = after_comm.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let before = ticks(c);
    std::thread::sleep(Duration::from_secs(2));
    let used = ticks(c) - before;
    eprintln!("appliance: idle pool-managerd used {used} CPU ticks (1/100 s) in 2 s");
    assert!(used < 20, "idle pool-managerd used {used}/200 CPU ticks");
}

fn status_shows_what_each_daemon_said(c: &Container, port: u16) {
    // systemctl status shows what each daemon said in STATUS=.
    let orch = c.ok(&["systemctl", "status", "--no-pager", "orchestratord"]);
    assert!(orch.contains(&format!("Status: \"{SERVING}")), "{orch}");
    let node = c.ok(&["systemctl", "status", "--no-pager", "pool-managerd"]);
    assert!(
        node.contains(&format!(
            "Status: \"registered with http://127.0.0.1:{port}; pools: default ready"
        )),
        "{node}"
    );
}

fn the_requests_journal_record_is_structured(c: &Container) {
    // The request's journal record has the structured fields.
    let records = c.journal(&[
        "-u",
        "orchestratord",
        "CORRELATION_ID=appliance-first",
        "MESSAGE=Task finished.",
    ]);
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    for (k, v) in [
        ("POOL_ID", "default"),
        ("MODEL", MODEL_ID),
        ("NODE_ID", "appliance"),
        ("OUTCOME", "ok"),
    ] {
        assert_eq!(r[k], v, "{k} in {r}");
    }
    assert!(
        r["TASK_ID"]
            .as_str()
            .is_some_and(|t| t.starts_with("task-")),
        "{r}"
    );
    assert_eq!(r["_SYSTEMD_UNIT"], "orchestratord.service");
}

fn an_on_demand_pool_loads_unloads_and_loads_again(c: &Container, port: u16) {
    // The on-demand pool: its socket listens and no engine runs, until the first request
    // starts the engine through the socket; the request waits for the model and is answered.
    let ondemand = "llorch-engine@ondemand.service";
    assert_eq!(
        c.show("llorch-engine@ondemand.socket", "ActiveState"),
        "active"
    );
    assert_eq!(c.show(ondemand, "ActiveState"), "inactive");
    let cold = Instant::now();
    let text = ask_on_demand(port);
    eprintln!(
        "appliance: the first request to the on-demand pool was answered in {} ms",
        cold.elapsed().as_millis()
    );
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(c.show(ondemand, "ActiveState"), "active");
    let first_engine = c.main_pid(ondemand);
    let inherited = c.journal(&["-u", ondemand, "MESSAGE=Serving on the inherited socket."]);
    assert_eq!(inherited.len(), 1, "{inherited:?}");
    // Five seconds without a request: the engine exits cleanly and the pool is on standby.
    let unloaded = |what: &str, c: &Container| {
        c.wait_until(what, Duration::from_secs(30), |c| {
            c.show(ondemand, "ActiveState") == "inactive"
                && c.show("orchestratord.service", "StatusText")
                    .starts_with(SERVING)
        });
        assert_eq!(c.show(ondemand, "Result"), "success");
        assert_eq!(c.show(ondemand, "NRestarts"), "0");
        assert_eq!(
            c.show("llorch-engine@ondemand.socket", "ActiveState"),
            "active"
        );
        assert!(
            !c.sh(&[
                "test",
                "-e",
                "/run/llama-orch/handoff/ondemand/ondemand.json"
            ])
            .status
            .success(),
            "the unloaded engine left its handoff file"
        );
    };
    unloaded("the on-demand engine to unload", c);
    let unloads = c.journal(&["-u", ondemand, "MESSAGE=Unloaded."]);
    assert_eq!(unloads.len(), 1, "{unloads:?}");
    // The next request loads it again.
    let text = ask_on_demand(port);
    assert!(text.contains("Paris"), "{text}");
    let second_engine = c.main_pid(ondemand);
    assert!(second_engine != 0 && second_engine != first_engine);
    unloaded("the on-demand engine to unload again", c);

    dbus_on_the_system_bus(c, port);
}

fn no_connection_is_refused_across_a_restart(c: &Container, port: u16) {
    // Restart orchestratord while a client keeps asking: the socket stays with systemd, so no
    // connection is refused, and every request is answered 200: one that arrives before the
    // node registered again with the new process waits in its queue for it.
    let before = c.main_pid("orchestratord.service");
    let (answered, first_answers) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        let start = Instant::now();
        let mut answers = Vec::new();
        while start.elapsed() < Duration::from_secs(8) {
            answers.push(chat(port, &["-D", "-"]));
            let _ = answered.send(());
        }
        answers
    });
    // The restart comes once the loop is under way (three answers in).
    for _ in 0..3 {
        first_answers
            .recv_timeout(Duration::from_secs(30))
            .expect("the client loop answers");
    }
    c.ok(&["systemctl", "restart", "orchestratord"]);
    let answers = client.join().unwrap();
    assert_ne!(
        c.main_pid("orchestratord.service"),
        before,
        "orchestratord did not restart"
    );
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    eprintln!(
        "appliance: {} requests across the restart: {ok} answered 200, {} answered 503 + Retry-After",
        answers.len(),
        answers.iter().filter(|a| a.0 == 503).count()
    );
    if let Some(a) = answers.iter().find(|a| a.0 == 503) {
        eprintln!(
            "appliance: a 503 during the restart: {}",
            a.1.replace("\r\n", " | ")
        );
    }
    assert!(answers.len() >= 5, "{} requests", answers.len());
    for (status, body) in &answers {
        assert_eq!(
            *status, 200,
            "a request failed across the restart: {status} {body}"
        );
    }
}

fn a_stuck_orchestratord_is_restarted_by_its_watchdog(c: &Container, port: u16) {
    // A stuck orchestratord (SIGSTOP) stops feeding its watchdog: systemd restarts it.
    c.wait_until("the node to register again", Duration::from_secs(30), |c| {
        c.show("orchestratord.service", "StatusText")
            .starts_with(SERVING)
    });
    let stuck = c.main_pid("orchestratord.service");
    c.ok(&[
        "systemctl",
        "kill",
        "--kill-who=main",
        "-s",
        "SIGSTOP",
        "orchestratord.service",
    ]);
    c.wait_until("the watchdog restart", Duration::from_secs(30), |c| {
        let pid = c.main_pid("orchestratord.service");
        pid != 0 && pid != stuck && c.show("orchestratord.service", "ActiveState") == "active"
    });
    let logged = c.journal(&["-u", "orchestratord.service", "_PID=1"]);
    assert!(
        logged.iter().any(|e| e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains("Watchdog timeout"))),
        "systemd did not log the watchdog timeout: {logged:?}"
    );
    c.wait_until("the node to register again", Duration::from_secs(30), |c| {
        c.show("orchestratord.service", "StatusText")
            .starts_with(SERVING)
    });
    assert_eq!(chat(port, &[]).0, 200);
}

fn the_engine_runs_confined_in_its_own_unit(c: &Container) {
    // pool-managerd runs its engine as a unit of its own, started over D-Bus as the
    // unprivileged llama-orch user (the polkit rule).
    let engine = c.main_pid("llorch-engine@default.service");
    assert_ne!(engine, 0, "the engine is not a unit");
    // The engine runs as a user of its own: it cannot read pool-managerd's node token.
    assert_eq!(
        c.show("llorch-engine@default.service", "User"),
        "llama-orch-engine"
    );
    let token = c.sh(&[
        "setpriv",
        "--reuid=llama-orch-engine",
        "--regid=llama-orch",
        "--clear-groups",
        "cat",
        "/run/credentials/pool-managerd.service/node-token",
    ]);
    assert!(
        !token.status.success(),
        "the engine's user read the node token"
    );
    let token = c.sh(&[
        "setpriv",
        "--reuid=llama-orch",
        "--regid=llama-orch",
        "--clear-groups",
        "cat",
        "/run/credentials/pool-managerd.service/node-token",
    ]);
    assert!(token.status.success(), "{token:?}");
    assert_eq!(
        c.show("engine-provisioner@default.service", "ActiveState"),
        "active"
    );
    let handoff: Value =
        serde_json::from_str(&c.ok(&["cat", "/run/llama-orch/handoff/default/default.json"]))
            .unwrap();
    assert_eq!(handoff["pid"].as_u64(), Some(u64::from(engine)));
    // The engine cannot reach the system bus (it parses untrusted files); pool-managerd can.
    let bus_socket = |pid: u32| {
        c.sh(&[
            "nsenter",
            "-t",
            &pid.to_string(),
            "-m",
            "test",
            "-S",
            "/run/dbus/system_bus_socket",
        ])
        .status
        .success()
    };
    assert!(!bus_socket(engine), "the engine sees the system bus");
    // Only pool-managerd's user reaches an engine's socket: not another engine, not a
    // provisioner, not orchestratord, though all share the group llama-orch.
    let engine_health = |user: &str| {
        c.sh(&[
            "setpriv",
            &format!("--reuid={user}"),
            "--regid=llama-orch",
            "--init-groups",
            "curl",
            "-sf",
            "-m",
            "5",
            "--unix-socket",
            "/run/llama-orch/engines/default.sock",
            "http://engine/health",
        ])
        .status
        .success()
    };
    assert!(
        engine_health("llama-orch"),
        "pool-managerd's user cannot reach its engine"
    );
    for other in [
        "llama-orch-engine",
        "llama-orch-provisioner",
        "llama-orch-api",
    ] {
        assert!(
            !engine_health(other),
            "{other} reached the default pool's engine"
        );
    }
    assert!(bus_socket(c.main_pid("pool-managerd.service")));
    // Its memory is bounded, sized from the model and its KV cache (2 slots of 1024 tokens
    // here), and pool-managerd said so; its tasks too.
    let bound: u64 = c
        .show("llorch-engine@default.service", "MemoryMax")
        .parse()
        .unwrap_or_else(|e| panic!("MemoryMax is not a number: {e}"));
    let model = std::fs::metadata(model_path()).unwrap().len();
    assert!(
        bound > model + (45 << 20) + (512 << 20) && bound < 2 << 30,
        "MemoryMax={bound}"
    );
    let said = c.journal(&[
        "-u",
        "pool-managerd",
        "MESSAGE=Engine memory bound set.",
        "POOL_ID=default",
    ]);
    assert!(
        said.iter()
            .any(|r| r["BYTES"].as_str().and_then(|b| b.parse::<u64>().ok()) == Some(bound)),
        "{said:?}"
    );
    assert_eq!(c.show("llorch-engine@default.service", "TasksMax"), "1024");
}

fn a_killed_engine_is_restarted_and_serves(c: &Container, port: u16) {
    let engine = c.main_pid("llorch-engine@default.service");
    // The engine is killed mid-stream: the client gets ENGINE_FAILED, systemd restarts the
    // engine, and the pool serves again.
    let long = serde_json::json!({
        "model": MODEL_ID, "stream": true, "max_tokens": 400, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    })
    .to_string();
    let mut stream = Command::new("curl")
        .args([
            "-sN",
            "-m",
            "60",
            "-H",
            "content-type: application/json",
            "-d",
            &long,
        ])
        .arg(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(stream.stdout.take().unwrap()).lines();
    let mut seen = 0;
    while seen < 5 {
        let line = lines.next().expect("stream open").unwrap();
        if line.contains("\"content\"") {
            seen += 1;
        }
    }
    c.ok(&[
        "systemctl",
        "kill",
        "-s",
        "KILL",
        "llorch-engine@default.service",
    ]);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let _ = stream.wait();
    assert!(
        rest.iter()
            .any(|l| l.contains("ENGINE_FAILED") || l.contains("engine_failed")),
        "no ENGINE_FAILED in the stream's end: {rest:?}"
    );
    let crash = c.journal(&[
        "-u",
        "pool-managerd",
        "MESSAGE_ID=9e28f6f50b014cb5817eb2a796f3069d",
    ]);
    assert_eq!(crash.len(), 1, "{crash:?}");
    c.wait_until(
        "systemd to restart the engine, and the pool to be ready",
        Duration::from_secs(60),
        |c| {
            let pid = c.main_pid("llorch-engine@default.service");
            pid != 0
                && pid != engine
                && c.show("llorch-engine@default.service", "ActiveState") == "active"
                && c.show("pool-managerd.service", "StatusText")
                    .contains("default ready")
        },
    );
    assert_eq!(c.show("llorch-engine@default.service", "NRestarts"), "1");
    let (status, body) = chat(port, &[]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Paris"), "{body}");
}

/// The admin key the revocation step installs, used by the steps after it.
const OPS_KEY: &str = "ops-key-0123456789abcdef";

fn removed_keys_are_refused_after_a_reload(c: &Container, port: u16) {
    // Revocation by reload. systemd 252 does not refresh LoadCredential= on reload, so the
    // unit copies the secrets itself on every start and reload. API keys where there were
    // none take a restart; then a key removed from its file and a reload: 401 at once.
    let (ops, bob) = (OPS_KEY, "bob-key-0123456789abcdef");
    let write_secret = |path: &str, text: &str| {
        c.ok(&["sh", "-c", &format!("umask 077; printf '{text}' > {path}")]);
    };
    write_secret(
        "/etc/llama-orch/api-keys",
        &format!("ops {ops} admin\\nbob {bob}\\n"),
    );
    c.ok(&["systemctl", "restart", "orchestratord.service"]);
    c.wait_until("the node to register again", Duration::from_secs(30), |c| {
        c.show("orchestratord.service", "StatusText")
            .starts_with(SERVING)
    });
    let with_key =
        |key: &str, path: &str| curl(port, &["-H", &format!("authorization: Bearer {key}")], path);
    assert_eq!(with_key(bob, "/v1/models").0, 200);
    assert_eq!(curl(port, &[], "/v1/models").0, 401);
    write_secret("/etc/llama-orch/api-keys", &format!("ops {ops} admin\\n"));
    c.ok(&["systemctl", "reload", "orchestratord.service"]);
    let (status, body) = with_key(bob, "/v1/models");
    assert_eq!(
        status, 401,
        "a removed key still works after the reload: {body}"
    );
    assert_eq!(with_key(ops, "/v1/models").0, 200);
}

fn a_rotated_node_token_takes_the_node_offline(c: &Container, port: u16) {
    let ops = OPS_KEY;
    let write_secret = |path: &str, text: &str| {
        c.ok(&["sh", "-c", &format!("umask 077; printf '{text}' > {path}")]);
    };
    let with_key =
        |key: &str, path: &str| curl(port, &["-H", &format!("authorization: Bearer {key}")], path);
    // The node token rotated in node-tokens (the node still holds the old one) and a reload:
    // the node's next beat asks for its report, whose old token is refused, and the node
    // goes offline.
    write_secret(
        "/etc/llama-orch/node-tokens",
        "* rotated-token-0123456789abcdef\\n",
    );
    c.ok(&["systemctl", "reload", "orchestratord.service"]);
    c.wait_until(
        "the node's old token refused",
        Duration::from_secs(30),
        |c| {
            !c.journal(&[
                "-u",
                "orchestratord.service",
                // llorch_os::message_id::NODE_REFUSED
                "MESSAGE_ID=93706c9873b647948d70f1c152461b28",
            ])
            .is_empty()
        },
    );
    c.wait_until("the node offline", Duration::from_secs(30), |_| {
        let (status, body) = with_key(ops, "/v2/nodes");
        status == 200 && body.contains("\"offline\"")
    });
}
