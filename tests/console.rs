//! The web console (`/ui/`) and the fleet event stream it follows (`GET /v2/events`), on the
//! real stack and the real model:
//!
//! - the stream shows each caller what the API would show it (nodes and other clients' tasks
//!   only to the admin credential), reports operator events as they happen, and is bounded (a
//!   flood of streams from a client cannot lock the operator out);
//! - the pages carry a strict Content-Security-Policy, refuse to be framed, and sit behind the
//!   API's Host check (DNS rebinding);
//! - headless Chromium drives the pages (`tests/python/console_browser.py`): the overview, a
//!   streamed request in the queue and the task list, the playground, operator actions with and
//!   without the admin credential (drain, resume, load, unload, cancel), a hostile string from
//!   a node, a phone-sized screen. Its
//!   screenshots are saved under `target/console-screenshots/`.
//!
//! Holds `serial()` for its whole run (see engine.rs).
// The serial guard is a std mutex held for the whole test, awaits included, on purpose.
#![allow(clippy::await_holding_lock)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use llorch_client::HttpClient;
use llorch_tests::stack::{Stack, StackOptions, MODEL_ID, OTHER_KEY, TEST_KEY};
use llorch_tests::{raw, serial, skip};
use serde_json::{json, Value};

/// The stream's limits (api/watch.rs): all streams, and those kept for the admin credential.
const MAX_WATCHERS: usize = 32;
const ADMIN_RESERVED: usize = 8;

fn client(stack: &Stack, key: Option<&str>) -> HttpClient {
    HttpClient::new(&stack.url())
        .unwrap()
        .with_token(key.map(str::to_string))
}

/// The error of a stream that must be refused.
async fn refusal(c: &HttpClient, path: &str) -> String {
    match c.events(path).await {
        Ok(_) => panic!("{path} was not refused"),
        Err(e) => e.to_string(),
    }
}

/// The next `snapshot` of a fleet stream (skipping notices), as JSON.
async fn next_snapshot(s: &mut llorch_client::EventStream) -> Value {
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), s.next_frame())
            .await
            .expect("a snapshot within 10 s")
            .expect("the stream goes on")
            .expect("a frame");
        if f.event == "snapshot" {
            return serde_json::from_str(&f.data).unwrap();
        }
    }
}

/// The first snapshot of `key`'s stream that satisfies `cond`.
async fn snapshot_where(key: Option<&str>, stack: &Stack, cond: impl Fn(&Value) -> bool) -> Value {
    let mut s = client(stack, key)
        .events("/v2/events?interval_ms=250")
        .await
        .expect("open the fleet stream");
    for _ in 0..200 {
        let snap = next_snapshot(&mut s).await;
        if cond(&snap) {
            return snap;
        }
    }
    panic!("no snapshot of the condition within 200 snapshots");
}

/// Submits a native task and returns its id.
async fn submit(c: &HttpClient, tokens: u32) -> String {
    let (status, _, body) = llorch_tests::post(
        c,
        "/v2/tasks",
        &json!({
            "model_ref": MODEL_ID,
            "prompt": "Count from 1 to 1000, one per line.",
            "max_tokens": tokens, "temperature": 0, "ignore_eos": true
        }),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    body["task_id"].as_str().unwrap().to_string()
}

fn tasks_of(snap: &Value) -> &Vec<Value> {
    snap["tasks"].as_array().expect("tasks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_stream_shows_each_caller_what_the_api_would() {
    let _g = serial();
    let stack = tokio::task::block_in_place(|| {
        Stack::start(StackOptions {
            slots: 1,
            ..Default::default()
        })
    });
    let admin = client(&stack, Some(TEST_KEY));
    let other = client(&stack, Some(OTHER_KEY));

    // Credentials and input are checked before a stream opens.
    let refused = refusal(&client(&stack, None), "/v2/events").await;
    assert!(refused.contains("401"), "{refused}");
    let bad = refusal(&admin, "/v2/events?interval_ms=5").await;
    assert!(bad.contains("400") && bad.contains("interval_ms"), "{bad}");

    // One task of each client: the admin's runs on the one slot, the other's waits.
    let mine = submit(&admin, 200).await;
    let theirs = submit(&other, 8).await;
    let seen = snapshot_where(Some(OTHER_KEY), &stack, |s| {
        tasks_of(s).iter().any(|t| t["state"] == "queued")
    })
    .await;
    assert!(
        seen.get("nodes").is_none(),
        "nodes are for the admin: {seen}"
    );
    assert_eq!(seen["viewer"], json!({"name": "other", "admin": false}));
    let listed: Vec<&str> = tasks_of(&seen)
        .iter()
        .filter_map(|t| t["task_id"].as_str())
        .collect();
    assert_eq!(listed, [theirs.as_str()], "only its own task: {seen}");
    let waiting = &seen["queue"]["waiting"][0];
    assert_eq!(waiting["task_id"], theirs.as_str(), "{seen}");
    assert_eq!(waiting["position"], 1);
    assert!(waiting["predicted_start_ms"].is_u64(), "{waiting}");
    assert!(waiting.get("client").is_none(), "{waiting}");
    assert!(!seen.to_string().contains("Count from"), "no prompt text");

    let seen = snapshot_where(Some(TEST_KEY), &stack, |s| {
        tasks_of(s).iter().any(|t| t["state"] == "running")
    })
    .await;
    assert_eq!(seen["nodes"][0]["node_id"], "node-a", "{seen}");
    let running = tasks_of(&seen)
        .iter()
        .find(|t| t["task_id"] == mine.as_str())
        .expect("the admin's task");
    assert_eq!(running["client"], "tester");
    assert_eq!(running["pool_id"], "default");
    let placement = running["placement"].to_string();
    assert!(placement.contains("default"), "{placement}");
    assert!(tasks_of(&seen).iter().any(|t| t["client"] == "other"));
    let pool = &seen["pools"][0];
    assert_eq!(
        (pool["slots_busy"].as_u64(), pool["slots_total"].as_u64()),
        (Some(1), Some(1))
    );

    // The operator cancels another client's task over HTTP; a client cannot cancel the
    // admin's (it is not there, in its namespace).
    let (status, _, body) =
        llorch_tests::post(&admin, &format!("/v2/tasks/{theirs}/cancel"), &json!({})).await;
    assert_eq!(
        (status.as_u16(), &body["canceled"]),
        (200, &json!(true)),
        "{body}"
    );
    let (status, _, body) =
        llorch_tests::post(&other, &format!("/v2/tasks/{mine}/cancel"), &json!({})).await;
    assert_eq!(status, 404, "{body}");

    // The pool's speed while it generates, then its tally once the task ended.
    let seen = snapshot_where(Some(TEST_KEY), &stack, |s| {
        s["pools"][0]["tokens_per_second"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    })
    .await;
    assert!(seen["pools"][0]["tokens_out_total"].as_u64().unwrap() > 0);
    let seen = snapshot_where(Some(TEST_KEY), &stack, |s| {
        tasks_of(s)
            .iter()
            .any(|t| t["task_id"] == mine.as_str() && t["state"] == "done")
    })
    .await;
    let done = tasks_of(&seen)
        .iter()
        .find(|t| t["task_id"] == mine.as_str())
        .unwrap();
    assert_eq!(done["outcome"], "length", "{done}");
    assert_eq!(done["tokens_out"], 200, "{done}");
    assert!(
        done["ttft_ms"].is_u64() && done["tokens_per_second"].is_f64(),
        "{done}"
    );
    let canceled = tasks_of(&seen)
        .iter()
        .find(|t| t["task_id"] == theirs.as_str())
        .unwrap();
    assert_eq!(canceled["outcome"], "CANCELED", "{canceled}");
    assert_eq!(seen["pools"][0]["tasks_finished"], 1, "{seen}");
    assert!(seen["pools"][0]["prefix_cache_hit_rate"].is_f64(), "{seen}");

    a_flood_of_streams_cannot_lock_the_operator_out(&other, &admin).await;
    an_operator_event_arrives_as_it_happens(&admin).await;
}

async fn an_operator_event_arrives_as_it_happens(admin: &HttpClient) {
    // The longest interval: the notice, and the snapshot after it, come at once.
    let mut s = admin.events("/v2/events?interval_ms=10000").await.unwrap();
    next_snapshot(&mut s).await;
    let (status, _, body) = llorch_tests::post(admin, "/v2/pools/default/drain", &json!({})).await;
    assert_eq!(status, 200, "{body}");
    let f = tokio::time::timeout(Duration::from_secs(10), s.next_frame())
        .await
        .expect("the notice at once")
        .unwrap()
        .unwrap();
    assert_eq!(f.event, "notice", "{f:?}");
    let notice: Value = serde_json::from_str(&f.data).unwrap();
    assert_eq!(notice["kind"], "pool_state_changed");
    assert_eq!(notice["new"], "draining", "{notice}");
    let snap = next_snapshot(&mut s).await;
    assert_eq!(snap["pools"][0]["state"], "draining");
    let (status, _, _) = llorch_tests::post(admin, "/v2/pools/default/resume", &json!({})).await;
    assert_eq!(status, 200);
}

async fn a_flood_of_streams_cannot_lock_the_operator_out(other: &HttpClient, admin: &HttpClient) {
    // Opens a stream of `c`, retrying for up to 10 s while earlier streams are still closing
    // (a stream gives its place back once a write finds its client gone: within two of its
    // intervals).
    async fn open_one(c: &HttpClient) -> llorch_client::EventStream {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match c.events("/v2/events?interval_ms=250").await {
                Ok(s) => return s,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut open = Vec::new();
    for _ in 0..MAX_WATCHERS - ADMIN_RESERVED {
        open.push(open_one(other).await);
    }
    let refused = refusal(other, "/v2/events").await;
    assert!(
        refused.contains("429") && refused.contains("RATE_LIMITED"),
        "{refused}"
    );
    // A stream that closes gives its place back.
    drop(open.pop());
    open.push(open_one(other).await);
    // The operator still gets in, up to the reserve; clients still do not.
    let mut mine = Vec::new();
    for _ in 0..ADMIN_RESERVED {
        mine.push(open_one(admin).await);
    }
    assert!(
        refusal(admin, "/v2/events").await.contains("429"),
        "the reserve is bounded"
    );
    assert!(refusal(other, "/v2/events").await.contains("429"));
}

#[test]
fn the_console_pages_are_locked_down() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let listen = format!("127.0.0.1:{}", stack.port);
    let csp = "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
    for (path, kind) in [
        ("/ui/", "text/html"),
        ("/ui/playground", "text/html"),
        ("/ui/assets/common.js", "text/javascript"),
        ("/ui/assets/overview.js", "text/javascript"),
        ("/ui/assets/playground.js", "text/javascript"),
        ("/ui/assets/console.css", "text/css"),
    ] {
        let (status, head, body) = raw(&listen, "GET", path, &[], "");
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            head.contains(&format!("content-type: {kind}")),
            "{path}: {head}"
        );
        for h in [
            csp,
            "x-content-type-options: nosniff",
            "x-frame-options: deny",
            "referrer-policy: no-referrer",
        ] {
            assert!(head.contains(h), "{path} lacks {h}: {head}");
        }
        // Nothing inline that the policy would have to allow, and nothing from elsewhere.
        if kind == "text/html" {
            assert!(
                !body.contains("<script>") && !body.contains(" style="),
                "{path}"
            );
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{path}"
            );
        }
    }
    // A browser asking for / goes to the console; an API client still gets the 404.
    let (status, head, _) = raw(&listen, "GET", "/", &[("accept", "text/html")], "");
    assert_eq!(status, 303);
    assert!(head.contains("location: /ui/"), "{head}");
    let (status, _, body) = raw(&listen, "GET", "/", &[("accept", "application/json")], "");
    assert_eq!(status, 404, "{body}");
    // A cookie is not a credential: what a browser would attach to another site's request.
    let (status, head, _) = raw(
        &listen,
        "GET",
        "/v2/events",
        &[("cookie", &format!("llorch-credential={TEST_KEY}"))],
        "",
    );
    assert_eq!(status, 401);
    assert!(!head.contains("set-cookie"), "{head}");
    // DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own name as Host.
    let (status, _, _) = raw(&listen, "GET", "/ui/", &[("host", "evil.example")], "");
    assert_eq!(status, 421);
    let (status, _, _) = raw(
        &listen,
        "GET",
        "/v2/events",
        &[
            ("host", "evil.example"),
            ("authorization", &format!("Bearer {TEST_KEY}")),
        ],
        "",
    );
    assert_eq!(status, 421);
}

/// Chromium and its driver (Debian's `chromium` and `chromium-driver`), when installed.
fn browser() -> Option<(PathBuf, PathBuf)> {
    let chromium = std::env::var_os("LLORCH_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    let driver = std::env::var_os("LLORCH_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromedriver".into());
    (chromium.exists() && driver.exists()).then_some((chromium, driver))
}

fn screenshots() -> PathBuf {
    let dir = llorch_tests::repo_root().join("target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_browser() {
    let Some((chromium, driver)) = browser() else {
        skip("no /usr/bin/chromium and /usr/bin/chromedriver (scripts/setup.sh installs chromium-driver)");
        return;
    };
    let _g = serial();
    // One slot (a second request waits), and an on-demand pool of the same model to load and
    // unload from the page.
    let extra = format!(
        "\n[[pools]]\nid = \"extra\"\nslots = 1\nctx = 512\nthreads = 1\non_demand = true\nprefix_cache_mib = 0\n\n[pools.model]\nid = \"smollm2-extra\"\nsource = \"{}\"\n",
        llorch_tests::model_path().display()
    );
    let stack = tokio::task::block_in_place(|| {
        Stack::start(StackOptions {
            slots: 1,
            extra_node_toml: extra,
            ..Default::default()
        })
    });
    // A node that says hostile things: its pool's last error is markup. Its model is its own,
    // so nothing is placed on it.
    let hostile = "<img src=x onerror=\"document.title='pwned'\">";
    let mut pool = json!({
        "pool_id": "evil", "model_id": "evil-model", "state": "failed", "slots_total": 1,
        "slots_busy": 0, "ctx_per_slot": 1024, "device": "cpu", "last_error": hostile
    });
    pool["restarts"] = json!(3);
    let (status, _, body) = llorch_tests::post(
        &client(&stack, None),
        "/v2/nodes/register",
        &json!({
            "node_id": "evil", "address": "unix:/nonexistent/evil.sock", "version": "0.0.0",
            "heartbeat_secs": 60, "pools": [pool]
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let shots = screenshots();
    for name in ["overview.png", "playground.png", "overview-phone.png"] {
        let _ = std::fs::remove_file(shots.join(name));
    }
    let script = llorch_tests::repo_root().join("tests/python/console_browser.py");
    let url = stack.url();
    let shots_arg = shots.display().to_string();
    let out = tokio::task::block_in_place(|| {
        Command::new("python3")
            .arg(&script)
            .args([
                url.as_str(),
                TEST_KEY,
                MODEL_ID,
                OTHER_KEY,
                shots_arg.as_str(),
            ])
            .env("PYTHONPATH", llorch_tests::python_path())
            .env("LLORCH_CHROMIUM", &chromium)
            .env("LLORCH_CHROMEDRIVER", &driver)
            .output()
            .expect("run python3")
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("console ok"),
        "the browser run failed\n{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );
    for name in ["overview.png", "playground.png", "overview-phone.png"] {
        assert!(is_png(&shots.join(name)), "no screenshot {name}");
    }
    eprintln!("{stdout}screenshots in {}", shots.display());
}
