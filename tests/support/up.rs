//! `llorch up` as a user starts it: the home stack on the default model, on a port the kernel
//! picks (`--listen 127.0.0.1:0`; `llorch up` prints the URL it got), with a runtime directory
//! the test can look into (node token files, handoff files, logs).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::stack::{terminate, MODEL_ID};
use crate::{bin, model_path};

pub struct Up {
    pub child: Child,
    /// `127.0.0.1:PORT`.
    pub listen: String,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub runtime: PathBuf,
    /// Lines `llorch up` printed after the endpoint and the curl hint.
    pub stdout: mpsc::Receiver<String>,
    stderr: Option<JoinHandle<Vec<String>>>,
}

impl Up {
    /// Starts `llorch up` with `slots` slots and waits until it prints the endpoint (a pool is
    /// ready). `runtime` must not be shared with another stack.
    pub fn start(runtime: &Path, slots: u32) -> Up {
        Self::start_with_env(runtime, slots, &[])
    }

    /// [`Up::start`] with environment variables for `llorch up` and the daemons it starts
    /// (orchestratord reads its flags from `LLORCH_*` variables too).
    pub fn start_with_env(runtime: &Path, slots: u32, env: &[(&str, &str)]) -> Up {
        let mut child = Command::new(bin("llorch"))
            .args([
                "up",
                "--listen",
                "127.0.0.1:0",
                "--slots",
                &slots.to_string(),
            ])
            .args(["--ctx", "1024", "--model-id", MODEL_ID])
            .arg("--model")
            .arg(model_path())
            .arg("--cache")
            .arg(std::env::temp_dir().join("llorch-test-cache"))
            .arg("--runtime-dir")
            .arg(runtime)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn llorch up");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr = std::thread::spawn(move || {
            BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        let mut up = Up {
            child,
            url: String::new(),
            listen: String::new(),
            runtime: runtime.to_owned(),
            stdout: rx,
            stderr: Some(stderr),
        };
        // `llorch up` prints the endpoint once a pool is ready (so pool-managerd registered at
        // the port the kernel chose), then a curl line to try, then where the console is.
        let first = up.stdout.recv_timeout(Duration::from_secs(120));
        let first = match first {
            Ok(line) => line,
            Err(_) => panic!("llorch up printed nothing:\n{}", up.stop_and_stderr()),
        };
        let listen = first
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .unwrap_or_else(|| panic!("no URL in {first:?}"))
            .to_string();
        assert!(
            listen.starts_with("127.0.0.1:") && !listen.ends_with(":0"),
            "{first}"
        );
        up.url = format!("http://{listen}");
        up.listen = listen;
        let curl = up.stdout.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(curl.starts_with("try: curl"), "{curl}");
        let console = up.stdout.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            console.starts_with(&format!("console: {}/ui/ ", up.url))
                && console.contains("admin token from /"),
            "{console}"
        );
        up
    }

    /// Whatever `llorch up` wrote to stderr, once it exited (stops it first if it runs).
    pub fn stop_and_stderr(&mut self) -> String {
        terminate(&mut self.child, Duration::from_secs(20));
        self.stderr_after_exit()
    }

    /// Its stderr, after the process exited.
    pub fn stderr_after_exit(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
            .join("\n")
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(20));
    }
}
