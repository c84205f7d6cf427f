//! The trust boundary of the home stack as `llorch up` starts it, tried as a web page in the
//! user's browser would (docs/SECURITY.md, "A web page in the user's browser"): cross-origin
//! simple requests, DNS rebinding (a foreign `Host`), unlisted origins and their preflights,
//! and operator endpoints without the operator's credential. Each check is also tried from
//! the side that must keep working: the listed origin, the listed host, `llorch` itself.
//!
//! Holds `serial()` for its whole run (see engine.rs).

use std::process::Command;

use llorch_tests::stack::MODEL_ID;
use llorch_tests::up::Up;
use llorch_tests::{bin, raw, serial};

fn pool_state(listen: &str) -> String {
    let (status, _, body) = raw(listen, "GET", "/v2/pools", &[], "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["pools"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_web_page_cannot_drive_the_home_stack() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start_with_env(
        &dir.path().join("run"),
        1,
        &[
            ("LLORCH_CORS_ORIGINS", "http://app.example:3000"),
            ("LLORCH_ALLOWED_HOSTS", "box.lan"),
        ],
    );
    let l = up.listen.as_str();
    let chat = format!(
        r#"{{"model":"{MODEL_ID}","max_tokens":2,"temperature":0,"messages":[{{"role":"user","content":"Hi"}}]}}"#
    );
    simple_cross_origin_requests_are_refused(l, &chat);
    bodies_that_are_not_json_are_refused(l, &chat);
    a_foreign_host_is_refused_and_listed_hosts_are_served(l, &chat);
    unlisted_origins_are_refused_on_every_surface(l, &chat);
    the_listed_origin_and_the_apis_own_are_served(l, &chat);
    let token_file = operator_endpoints_need_the_operators_token(&up);
    task_ids_are_unguessable(l);
    drop(up);
    assert!(
        !token_file.exists(),
        "the token outlives its stack: {}",
        token_file.display()
    );
}

const JSON: (&str, &str) = ("content-type", "application/json");
const EVIL: (&str, &str) = ("origin", "http://evil.example");

fn simple_cross_origin_requests_are_refused(l: &str, chat: &str) {
    // A "simple" cross-origin POST (text/plain: no preflight in a browser) to an operator
    // endpoint and to generation: refused, and the pool keeps serving.
    let (status, _, body) = raw(
        l,
        "POST",
        "/v2/pools/default/drain",
        &[EVIL, ("content-type", "text/plain")],
        "{}",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--cors-origins"), "{body}");
    let (status, _, body) = raw(
        l,
        "POST",
        "/v1/chat/completions",
        &[EVIL, ("content-type", "text/plain")],
        chat,
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(pool_state(l), "ready");
}

fn bodies_that_are_not_json_are_refused(l: &str, chat: &str) {
    // The same body without an Origin (a form or a script that strips it): not JSON, so 415.
    let (status, _, body) = raw(
        l,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "text/plain")],
        chat,
    );
    assert_eq!(status, 415, "{body}");
    assert!(body.to_ascii_lowercase().contains("content-type"), "{body}");
    let (status, _, body) = raw(
        l,
        "POST",
        "/v2/tasks",
        &[("content-type", "application/x-www-form-urlencoded")],
        "{}",
    );
    assert_eq!(status, 415, "{body}");
}

fn a_foreign_host_is_refused_and_listed_hosts_are_served(l: &str, chat: &str) {
    let port = l.rsplit(':').next().unwrap();
    // DNS rebinding: the page's own name resolved to 127.0.0.1; the browser sends that name.
    let foreign = format!("evil.example:{port}");
    let (status, _, body) = raw(l, "GET", "/v1/models", &[("host", &foreign)], "");
    assert_eq!(status, 421, "{body}");
    assert!(body.contains("--allowed-hosts"), "{body}");
    let (status, _, body) = raw(l, "POST", "/v2/tasks", &[("host", &foreign), JSON], chat);
    assert_eq!(status, 421, "{body}");
    // Ollama's listing and chat too (a page must not read the models or generate), refused in
    // Ollama's envelope.
    let (status, _, body) = raw(l, "GET", "/api/tags", &[("host", &foreign)], "");
    assert_eq!(status, 421, "{body}");
    assert!(body.starts_with(r#"{"error":"#), "{body}");
    let (status, _, body) = raw(l, "POST", "/api/chat", &[EVIL, JSON], chat);
    assert_eq!(status, 403, "{body}");
    assert!(body.starts_with(r#"{"error":"#), "{body}");
    let (status, _, body) = raw(
        l,
        "POST",
        "/api/generate",
        &[EVIL, ("content-type", "text/plain")],
        "{}",
    );
    assert_eq!(status, 403, "{body}");
    // Probes name hosts as they like: liveness answers whatever the Host.
    let (status, _, body) = raw(l, "GET", "/health/live", &[("host", &foreign)], "");
    assert_eq!(status, 200, "{body}");
    // A listed name and loopback names are served.
    for host in [
        format!("box.lan:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (status, _, body) = raw(l, "GET", "/v1/models", &[("host", &host)], "");
        assert_eq!(status, 200, "{host}: {body}");
    }
}

fn unlisted_origins_are_refused_on_every_surface(l: &str, chat: &str) {
    // An unlisted origin, with a JSON body and after a preflight: both refused.
    let (status, _, body) = raw(
        l,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            EVIL,
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "content-type"),
        ],
        "",
    );
    assert_eq!(status, 403, "{body}");
    let (status, head, body) = raw(l, "POST", "/v1/chat/completions", &[EVIL, JSON], chat);
    assert_eq!(status, 403, "{body}");
    assert!(!head.contains("access-control-allow-origin"), "{head}");
    // Anthropic's surface is behind the same check, and refuses in its own envelope.
    let (status, _, body) = raw(l, "POST", "/v1/messages", &[EVIL, JSON], chat);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(r#""type":"error""#) && body.contains("permission_error"),
        "{body}"
    );
    // So are the Responses API and its stored answers (a page can neither make one nor read
    // or delete what a client stored) and embeddings.
    for (method, path, body) in [
        ("POST", "/v1/responses", chat),
        ("GET", "/v1/responses/resp_0123", ""),
        ("DELETE", "/v1/responses/resp_0123", ""),
        (
            "POST",
            "/v1/embeddings",
            r#"{"model":"smollm2-135m","input":"Hi"}"#,
        ),
    ] {
        let (status, _, answer) = raw(l, method, path, &[EVIL, JSON], body);
        assert_eq!(status, 403, "{method} {path}: {answer}");
    }
}

fn the_listed_origin_and_the_apis_own_are_served(l: &str, chat: &str) {
    // The listed origin gets its preflight and its answer, with CORS headers naming it.
    let app = ("origin", "http://app.example:3000");
    let (status, head, _) = raw(
        l,
        "OPTIONS",
        "/v1/chat/completions",
        &[
            app,
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "content-type, authorization",
            ),
        ],
        "",
    );
    assert_eq!(status, 204, "{head}");
    assert!(
        head.contains("access-control-allow-origin: http://app.example:3000"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers:") && head.contains("authorization"),
        "{head}"
    );
    let (status, head, body) = raw(l, "POST", "/v1/chat/completions", &[app, JSON], chat);
    assert_eq!(status, 200, "{body}");
    assert!(
        head.contains("access-control-allow-origin: http://app.example:3000"),
        "{head}"
    );
    // A page served by the API's own origin is not cross-origin.
    let own = format!("http://{l}");
    let (status, _, body) = raw(
        l,
        "POST",
        "/v1/chat/completions",
        &[("origin", &own), JSON],
        chat,
    );
    assert_eq!(status, 200, "{body}");
}

fn operator_endpoints_need_the_operators_token(up: &Up) -> std::path::PathBuf {
    // Operator endpoints need the operator's credential even on loopback.
    let l = up.listen.as_str();
    let port = l.rsplit(':').next().unwrap();
    let (status, _, body) = raw(l, "POST", "/v2/pools/default/drain", &[JSON], "{}");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("admin credential"), "{body}");
    let (status, _, body) = raw(l, "GET", "/v2/nodes", &[], "");
    assert_eq!(status, 403, "{body}");
    assert_eq!(pool_state(l), "ready");
    // `llorch` finds the token `llorch up` wrote for this port (mode 0600), and may.
    let token_file = llorch::up::admin_token_path(port.parse().unwrap());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o077, 0, "{}: {mode:o}", token_file.display());
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let bearer = format!("Bearer {token}");
    let (status, _, body) = raw(l, "GET", "/v2/nodes", &[("authorization", &bearer)], "");
    assert_eq!(status, 200, "{body}");
    let out = Command::new(bin("llorch"))
        .args(["pools", "drain", "default", "--dbus", "off"])
        .env("LLORCH_URL", &up.url)
        .env_remove("LLORCH_API_KEY")
        .env_remove("LLORCH_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pool_state(l), "draining");
    let (status, _, body) = raw(
        l,
        "POST",
        "/v2/pools/default/resume",
        &[("authorization", &bearer)],
        "",
    );
    assert_eq!(status, 200, "{body}");
    token_file
}

fn task_ids_are_unguessable(l: &str) {
    // Task ids carry 128 random bits: knowing one is the only way to read another client's
    // task on a stack without keys.
    let task = format!(r#"{{"model_ref":"{MODEL_ID}","prompt":"Hi","max_tokens":1}}"#);
    let (status, _, body) = raw(l, "POST", "/v2/tasks", &[JSON], &task);
    assert_eq!(status, 202, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = v["task_id"].as_str().unwrap();
    let hex = id.strip_prefix("task-").unwrap_or_else(|| panic!("{id}"));
    assert!(
        hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    // The fleet stream (the web console's) lists tasks, but never their ids to anonymous
    // callers, who share one namespace: it would hand out what the ids keep unguessable.
    let out = Command::new("curl")
        .args(["-sN", "--max-time", "2"])
        .arg(format!("http://{l}/v2/events?interval_ms=250"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("event: snapshot"), "{text}");
    assert!(
        text.contains(r#""model":"smollm2-135m""#),
        "the task is listed: {text}"
    );
    assert!(!text.contains(id) && !text.contains("task_id"), "{text}");
    assert!(
        !text.contains(r#""nodes""#),
        "nodes are for the operator: {text}"
    );
    // A page elsewhere cannot read the stream.
    let (status, _, _) = raw(
        l,
        "GET",
        "/v2/events",
        &[("origin", "http://evil.example")],
        "",
    );
    assert_eq!(status, 403);
}
