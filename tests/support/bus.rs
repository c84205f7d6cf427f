//! A private D-Bus daemon for the D-Bus tests, and `busctl` to drive it as an operator would.
//!
//! Its policy is the shipped one (`systemd/org.llamaorch.conf`, included as is but for the
//! service users, which become the test's own user) on top of a default that lets anyone
//! connect, call and monitor, and no one else own `org.llamaorch.*`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::repo_root;

pub struct PrivateBus {
    pub dir: tempfile::TempDir,
    pub address: String,
    child: Child,
}

/// The test's own user name (it owns the names on the private bus).
fn user_name() -> String {
    let out = Command::new("id").arg("-un").output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl PrivateBus {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("llorch-bus-")
            .tempdir()
            .expect("temp dir");
        // Another uid (the unprivileged caller) must reach the socket.
        Command::new("chmod")
            .args(["0755"])
            .arg(dir.path())
            .status()
            .expect("chmod");
        let shipped = std::fs::read_to_string(repo_root().join("systemd/org.llamaorch.conf"))
            .expect("systemd/org.llamaorch.conf");
        assert!(shipped.contains("user=\"llama-orch\""), "{shipped}");
        let policy = dir.path().join("org.llamaorch.conf");
        let me = format!("user=\"{}\"", user_name());
        std::fs::write(
            &policy,
            shipped
                .replace("user=\"llama-orch-api\"", &me)
                .replace("user=\"llama-orch\"", &me),
        )
        .expect("write policy");
        let socket = dir.path().join("bus.sock");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <deny own="org.llamaorch.Orchestrator1"/>
    <deny own="org.llamaorch.PoolManager1"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
  <include>{policy}</include>
</busconfig>
"#,
                socket = socket.display(),
                policy = policy.display()
            ),
        )
        .expect("write bus config");
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .args(["--nofork", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon is missing: install dbus-daemon (scripts/setup.sh does)");
        // The address is printed once the bus listens.
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the bus address");
        assert!(line.starts_with("unix:"), "dbus-daemon said {line:?}");
        Self {
            dir,
            address: format!("unix:path={}", socket.display()),
            child,
        }
    }

    /// The environment that points a daemon at this bus as its session bus.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.address.clone()),
            ("LLORCH_DBUS".into(), "session".into()),
        ]
    }

    fn command(&self, uid: Option<u32>, args: &[&str]) -> Command {
        let mut cmd = match uid {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={uid}"),
                    "--clear-groups",
                    "busctl",
                ]);
                c
            }
            None => Command::new("busctl"),
        };
        cmd.arg(format!("--address={}", self.address)).args(args);
        cmd
    }

    /// `busctl --address=… ARGS`, as the test's user.
    pub fn busctl(&self, args: &[&str]) -> Output {
        self.command(None, args).output().expect("busctl")
    }

    /// `busctl ARGS`, as the test's user, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.busctl(args);
        assert!(
            out.status.success(),
            "busctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `busctl ARGS` as another user (`setpriv`; needs root).
    pub fn busctl_as(&self, uid: u32, args: &[&str]) -> Output {
        self.command(Some(uid), args)
            .output()
            .expect("setpriv busctl")
    }

    /// `busctl monitor --json=short SERVICES…`, once it monitors.
    pub fn monitor(&self, services: &[&str]) -> Monitor {
        let mut args = vec!["monitor", "--json=short"];
        args.extend_from_slice(services);
        let mut child = self
            .command(None, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("busctl monitor");
        let mut err = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        err.read_line(&mut line)
            .expect("busctl monitor's first line");
        assert!(line.contains("Monitoring"), "busctl monitor said {line:?}");
        let seen = Arc::new(Seen::default());
        let out = BufReader::new(child.stdout.take().expect("stdout"));
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    sink.messages.lock().unwrap().push(v);
                    sink.arrived.notify_all();
                }
            }
        });
        Monitor { child, seen }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The messages a monitor has seen, and a wake-up for each new one.
#[derive(Default)]
struct Seen {
    messages: Mutex<Vec<serde_json::Value>>,
    arrived: Condvar,
}

/// A running `busctl monitor`: the messages seen so far, one JSON value each.
pub struct Monitor {
    child: Child,
    seen: Arc<Seen>,
}

impl Monitor {
    pub fn messages(&self) -> Vec<serde_json::Value> {
        self.seen.messages.lock().unwrap().clone()
    }

    /// Waits until `cond` holds for the messages seen so far (checked at each new message),
    /// at most `limit`; false when it did not.
    pub fn wait_for(&self, limit: Duration, cond: impl Fn(&[serde_json::Value]) -> bool) -> bool {
        let seen = self.seen.messages.lock().unwrap();
        let (_seen, timeout) = self
            .seen
            .arrived
            .wait_timeout_while(seen, limit, |m| !cond(m))
            .unwrap();
        !timeout.timed_out()
    }

    /// The signals named `member` seen so far, with their payload's data.
    pub fn signals(&self, member: &str) -> Vec<serde_json::Value> {
        self.messages()
            .into_iter()
            .filter(|m| m["type"] == "signal" && m["member"] == member)
            .map(|m| m["payload"]["data"].clone())
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
