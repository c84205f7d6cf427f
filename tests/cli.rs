//! End-to-end tests of what a user types: `llorch up` with `llorch generate`, `status` and
//! `pools`, and the official OpenAI Python library against the stack.
//!
//! Each test holds `serial()` for its whole run (see engine.rs).

use std::process::{Command, Stdio};
use std::time::Duration;

use llorch_tests::stack::{alive, signal, Stack, StackOptions, MODEL_ID, TEST_KEY};
use llorch_tests::up::Up;
use llorch_tests::{bin, python_path, serial, wait_for};

fn llorch(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("llorch"))
        .args(args)
        .env("LLORCH_URL", url)
        .env_remove("LLORCH_API_KEY")
        .output()
        .expect("run llorch");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A script tells what failed by the exit code (docs/CONFIGURATION.md, `llorch`): nothing
/// listening is 69 (retry later), an address that is no URL is 64 (fix the command).
#[test]
fn the_cli_exits_with_the_code_of_what_failed() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let code = |url: &str| {
        Command::new(bin("llorch"))
            .args(["status", "--dbus", "off"])
            .env("LLORCH_URL", url)
            .env_remove("LLORCH_API_KEY")
            .output()
            .expect("run llorch")
            .status
            .code()
    };
    assert_eq!(code(&url), Some(llorch_wire::exit::UNAVAILABLE), "{url}");
    assert_eq!(code("ftp://nowhere"), Some(llorch_wire::exit::USAGE));
}

#[test]
fn llorch_up_serves_the_cli_and_stops_cleanly_on_ctrl_c() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    let mut up = Up::start(&runtime, 2);
    let listen = up.listen.clone();

    let url = format!("http://{listen}");
    let (ok, out, err) = llorch(
        &url,
        &[
            "generate",
            "--temperature",
            "0",
            "--max-tokens",
            "16",
            "What city is the capital of France?",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("Paris"), "{out}");
    assert!(err.contains("tokens/s"), "{err}");

    a_two_turn_chat_on_the_terminal(&url);
    status_shows_the_node_and_its_pool(&url);
    pools_and_nodes_drain_and_resume(&url);
    // Ctrl-C: everything stops, no engine is left, no handoff file stays behind.
    let handoff = runtime.join("handoff/default/default.json");
    let engine: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&handoff).unwrap()).unwrap();
    let engine_pid = engine["pid"].as_u64().unwrap() as u32;
    assert!(alive(engine_pid));
    signal(up.child.id(), libc::SIGINT);
    let status = up.child.wait().unwrap();
    let stderr = up.stderr_after_exit();
    assert!(status.success(), "{status}\n{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    wait_for("the engine to exit", Duration::from_secs(5), || {
        !alive(engine_pid)
    });
    assert!(!handoff.exists());
    assert!(
        std::net::TcpStream::connect(&listen).is_err(),
        "orchestratord still listens"
    );
}

fn a_two_turn_chat_on_the_terminal(url: &str) {
    // A two-turn chat on the terminal: the second turn relies on the first.
    let mut chat = Command::new(bin("llorch"))
        .args(["chat", "--temperature", "0", "--max-tokens", "24"])
        .env("LLORCH_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = chat.stdin.take().unwrap();
        stdin
            .write_all(b"What city is the capital of France?\nAnd of Italy?\n\n")
            .unwrap();
    }
    let out = chat.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains("Paris") && stdout.contains("Rome"),
        "{stdout}"
    );
    assert_eq!(stderr.matches("tokens/s").count(), 2, "{stderr}");
}

/// `llorch status`: the node online, its ready pool, its load time, the queue, a CPU node.
fn status_shows_the_node_and_its_pool(url: &str) {
    let (ok, out, err) = llorch(url, &["status"]);
    assert!(ok, "{err}");
    assert!(out.contains("home") && out.contains("online"), "{out}");
    let pool_line = out
        .lines()
        .find(|l| l.starts_with("default"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        pool_line.contains("ready") && pool_line.contains("0/2") && pool_line.contains(MODEL_ID),
        "{out}"
    );
    assert!(out.contains("LOAD"), "{out}");
    assert!(
        pool_line
            .split_whitespace()
            .any(|w| w.parse::<f64>().is_ok_and(|s| s > 0.0)),
        "the pool's load time in seconds: {out}"
    );
    assert!(out.contains("queue: 0 waiting"), "{out}");
    // No NVIDIA driver here: the node says it is a CPU node.
    assert!(
        out.lines()
            .any(|l| l.starts_with("home") && l.contains("CPU only (no NVIDIA driver)")),
        "{out}"
    );
}

fn pools_and_nodes_drain_and_resume(url: &str) {
    let (ok, out, err) = llorch(url, &["pools", "drain", "default"]);
    assert!(ok, "{err}");
    assert!(out.contains("draining"), "{out}");
    let (ok, out, _) = llorch(url, &["status"]);
    assert!(
        ok && out
            .lines()
            .any(|l| l.starts_with("default") && l.contains("draining")),
        "{out}"
    );
    let (ok, out, err) = llorch(url, &["pools", "resume", "default"]);
    assert!(ok, "{err}");
    assert!(out.contains("ready"), "{out}");
    let (ok, _, err) = llorch(url, &["pools", "drain", "nope"]);
    assert!(!ok && err.contains("nope"), "{err}");
    // A whole node: drained (nothing runs, so it is empty at once), shown, resumed.
    let (ok, out, err) = llorch(url, &["nodes", "drain", "home", "--wait", "10"]);
    assert!(ok, "{err}");
    assert!(out.contains("node home: drained"), "{out}");
    let (ok, out, err) = llorch(url, &["nodes", "resume", "home"]);
    assert!(ok && out.contains("placing work again"), "{out}{err}");
    let (ok, _, err) = llorch(url, &["nodes", "drain", "nope"]);
    assert!(!ok && err.contains("nope"), "{err}");
}

/// The Python `openai` package that scripts/setup.sh installs into `$LLORCH_CACHE/python`.
const SDK_SCRIPT: &str = r#"
import sys, openai
url, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
assert [m.id for m in client.models.list().data] == [model]
q = [{"role": "user", "content": "What city is the capital of France?"}]
r = client.chat.completions.create(model=model, messages=q, max_tokens=16, temperature=0)
text = r.choices[0].message.content
assert "Paris" in text, text
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens > 0
streamed, usage = "", None
for chunk in client.chat.completions.create(model=model, messages=q, max_tokens=16, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        streamed += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
assert streamed == text, (streamed, text)
assert usage.completion_tokens == r.usage.completion_tokens, usage
c = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0)
assert "5" in c.choices[0].text, c
try:
    client.chat.completions.create(model="gpt-9", messages=q)
    raise SystemExit("unknown model accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e
try:
    client.chat.completions.create(model=model, messages=q, n=17)
    raise SystemExit("n=17 accepted")
except openai.BadRequestError as e:
    assert e.param == "n", e
try:
    openai.OpenAI(base_url=url + "/v1", api_key="not-a-key-0123456789", max_retries=0).models.list()
    raise SystemExit("bad key accepted")
except openai.AuthenticationError:
    pass
print("sdk ok")
"#;

#[test]
fn the_official_openai_python_library_works_unchanged() {
    let _g = serial();
    let pythonpath = python_path();
    let stack = Stack::start(StackOptions::default());
    let out = Command::new("python3")
        .args(["-c", SDK_SCRIPT, &stack.url(), TEST_KEY, MODEL_ID])
        .env("PYTHONPATH", &pythonpath)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("sdk ok"),
        "{stdout}\n{stderr}\n{}",
        stack.logs()
    );
}
