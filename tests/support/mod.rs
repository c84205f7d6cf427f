//! Helpers for the end-to-end tests: find the built binaries and the default model, start an
//! engine and wait for its handoff file, stop it with SIGTERM.
//!
//! The binaries are the ones `cargo build --workspace` put next to the test executable;
//! `make test` builds them first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use llorch_client::UnixClient;

pub mod appliance;
pub mod bench;
pub mod bus;
pub mod container;
pub mod journal;
pub mod nix;
pub mod notify;
pub mod pki;
pub mod prom;
pub mod rootfs;
pub mod stack;
pub mod up;

/// llama-orch's cache (`$LLORCH_CACHE`, else `$XDG_CACHE_HOME/llama-orch`, else
/// `~/.cache/llama-orch`), as the Makefile sets it.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("LLORCH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|x| PathBuf::from(x).join("llama-orch")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/llama-orch")
        })
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the repository")
        .to_owned()
}

/// The default model, fetched and verified by `scripts/setup.sh`.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("LLORCH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("default-model/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.exists(),
        "the default model is not at {}; run scripts/setup.sh (make test does) or set LLORCH_TEST_MODEL",
        path.display()
    );
    path
}

/// The second real model (Gemma 3 270M, Q4_K_M), fetched from PyPI in parts and verified by
/// `scripts/setup.sh`, for the tests of several models on one box.
pub fn second_model_path() -> PathBuf {
    let path = std::env::var_os("LLORCH_TEST_SECOND_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("second-model/gemma-3-270m-q4_k_m.gguf"));
    assert!(
        path.exists(),
        "the second model is not at {}; run scripts/setup.sh (make test does) or set LLORCH_TEST_SECOND_MODEL",
        path.display()
    );
    path
}

/// The Python packages `scripts/setup.sh` installs for the tests (the official `openai`,
/// `anthropic` and `ollama` clients, `jsonschema` and `selenium`), for `PYTHONPATH`.
pub fn python_path() -> PathBuf {
    let dir = cache_dir().join("python");
    for package in ["openai", "anthropic", "ollama", "jsonschema", "selenium"] {
        assert!(
            dir.join(package).exists(),
            "the {package} Python package is not in {}; run scripts/setup.sh (make test does)",
            dir.display()
        );
    }
    dir
}

/// OpenAI's published OpenAPI document (the `/v1` contract), from the shared vendor folder next
/// to the repository (`../shared/vendor`, or `$LLORCH_OPENAI_SPEC`). `None` when this checkout
/// has no such folder.
pub fn openai_spec() -> Option<PathBuf> {
    std::env::var_os("LLORCH_OPENAI_SPEC")
        .map(PathBuf::from)
        .or_else(|| {
            Some(
                repo_root()
                    .parent()?
                    .join("shared/vendor/openai-openapi-f85dbe2.json.gz"),
            )
        })
        .filter(|p| p.exists())
}

/// Says that the calling test cannot run on this machine, and why; the caller then returns.
///
/// A skipped test must never read as a passed one: the line `SKIPPED: <test>: <why>` goes to
/// stderr, and the test's name is appended to `$LLORCH_SKIP_LOG` (set by `make test`), whose
/// summary counts it as skipped instead of passed. Under `CI=true` this panics: CI installs
/// everything a test needs (`scripts/setup.sh`), so a skip there is a missing install step.
pub fn skip(why: impl std::fmt::Display) {
    let thread = std::thread::current();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let log = std::env::var_os("LLORCH_SKIP_LOG").map(PathBuf::from);
    record_skip(thread.name().unwrap_or("a test"), &why, ci, log.as_deref());
}

fn record_skip(test: &str, why: &dyn std::fmt::Display, ci: bool, log: Option<&Path>) {
    if ci {
        panic!(
            "{test} cannot run here under CI=true, where every prerequisite is installed: {why}"
        );
    }
    eprintln!("SKIPPED: {test}: {why}");
    if let Some(log) = log {
        use std::io::Write;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| writeln!(f, "{test}"));
        if let Err(e) = written {
            panic!("cannot record the skip of {test} in {}: {e}", log.display());
        }
    }
}

/// Writes a key or token file as an operator must: readable by its owner alone (the daemons
/// refuse key files other users can read).
pub fn write_secret(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A workspace binary built next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (make test does; make bench builds --release)",
        path.display()
    );
    path
}

/// Waits for `cond`, checking every few milliseconds, up to `limit`.
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `probe` every few milliseconds until it says `Ok`, and returns how long that took;
/// fails after `limit`, naming `what` and the last state the probe described in its `Err`.
/// The one async wait of the tests (a slot freed, a pool idle, a node back): each waits for
/// the state it needs, never for a fixed time.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        let last = match probe().await {
            Ok(()) => return start.elapsed(),
            Err(state) => state,
        };
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Serializes the tests that run engines: on a two-core machine, parallel engines would turn
/// latency checks into measurements of each other.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `llorch-engine`.
pub struct Engine {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub handoff: PathBuf,
    pub log: PathBuf,
}

impl Engine {
    /// Starts the engine on the default model with `extra` flags and waits for its handoff file.
    pub fn start(extra: &[&str]) -> Self {
        let mut engine = Self::spawn(&model_path(), extra);
        engine.wait_ready();
        engine
    }

    /// Starts the engine without waiting.
    pub fn spawn(model: &Path, extra: &[&str]) -> Self {
        Self::spawn_logging(model, extra, "info,llama-cpp-2=warn")
    }

    /// Starts the engine without waiting, logging with `filter` (`LLORCH_LOG`).
    pub fn spawn_logging(model: &Path, extra: &[&str], filter: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("engine.sock");
        let handoff_dir = dir.path().join("handoff");
        let log = dir.path().join("engine.log");
        let child = Command::new(bin("llorch-engine"))
            .arg("--model")
            .arg(model)
            .arg("--socket")
            .arg(&socket)
            .arg("--handoff-dir")
            .arg(&handoff_dir)
            .args(["--pool", "p0", "--threads", "2"])
            .args(extra)
            .env("LLORCH_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn llorch-engine");
        Self {
            child,
            socket,
            handoff: handoff_dir.join("p0.json"),
            log,
            dir,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the handoff file, failing with the engine's log if the process exits first.
    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        while !self.handoff.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "engine exited with {status} before it was ready; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "engine not ready after 60 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn client(&self) -> UnixClient {
        UnixClient::new(&self.socket)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.terminate();
        self.child.wait().expect("wait for the engine")
    }

    pub fn terminate(&self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the pid of a child this struct owns and has not reaped.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request on its own connection, written byte for byte as given: the status, the
/// headers (lower-case names) and the body.
pub fn raw(
    listen: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(listen).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("host: {listen}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    ));
    use std::io::{Read, Write};
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// POSTs JSON and returns status, headers and the decoded body.
pub async fn post(
    client: &llorch_client::HttpClient,
    path: &str,
    body: &serde_json::Value,
) -> (hyper::StatusCode, hyper::HeaderMap, serde_json::Value) {
    let resp = client
        .post_raw(path, serde_json::to_vec(body).unwrap(), &[])
        .await
        .expect("request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
        String::from_utf8_lossy(&bytes).into(),
    ));
    (status, headers, value)
}

/// Reads an SSE stream to its end.
pub async fn frames(mut s: llorch_client::EventStream) -> Vec<llorch_wire::sse::Frame> {
    let mut out = Vec::new();
    while let Some(f) = s.next_frame().await {
        out.push(f.expect("frame"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::record_skip;

    #[test]
    fn a_skip_is_recorded_for_the_summary_and_fails_under_ci() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skipped.log");
        record_skip("a::one", &"no root", false, Some(&log));
        record_skip("b::two", &"no nix", false, Some(&log));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "a::one\nb::two\n");
        let under_ci = std::panic::catch_unwind(|| record_skip("c", &"no root", true, Some(&log)));
        let message = *under_ci.unwrap_err().downcast::<String>().unwrap();
        assert!(
            message.contains("CI=true") && message.contains("no root"),
            "{message}"
        );
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 2);
    }
}
