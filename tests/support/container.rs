//! A booted systemd container for the tests that need a real systemd: `systemd-nspawn -b`
//! over the cached root filesystem (`rootfs`), under a throwaway overlay, driven from outside
//! with `nsenter` (systemctl, journalctl, busctl as an operator would), powered off on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::notify::NotifySocket;
use crate::rootfs::privileged;

/// A booted container; powered off on drop.
pub struct Container {
    pub prefix: Vec<String>,
    /// None once powered off.
    nspawn: Option<Child>,
    pub leader: u32,
    log: PathBuf,
}

impl Container {
    /// Boots `root` (read-only, under a throwaway overlay) with `stage` at `/mnt/llorch`, as
    /// machine `llorch-<name>-<pid>`; `extra` are more nspawn options (a network namespace,
    /// say). Returns once the container's systemd finished booting.
    pub fn boot(
        prefix: Vec<String>,
        root: &Path,
        stage: &Path,
        log: PathBuf,
        name: &str,
        extra: &[String],
    ) -> Self {
        let name = format!("llorch-{name}-{}", std::process::id());
        // nspawn reports to a notify socket like any service: the container's leader pid at
        // once (X_NSPAWN_LEADER_PID=), and READY=1 when the container's systemd finished
        // booting (--notify-ready). The test waits for those events. `env` passes the socket
        // through sudo, which would drop it from the environment.
        let mut notify = NotifySocket::bind(stage);
        let nspawn = privileged(&prefix, "env")
            .arg(format!("NOTIFY_SOCKET={}", notify.path.display()))
            .arg("systemd-nspawn")
            .arg("-D")
            .arg(root)
            .args([
                "--volatile=overlay",
                "-b",
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "--notify-ready=yes",
            ])
            .args(["-M", &name])
            .args(extra)
            .arg(format!("--bind-ro={}:/mnt/llorch", stage.display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::options().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .expect("systemd-nspawn is missing: install systemd-container (scripts/setup.sh does)");
        let mut c = Self {
            prefix,
            nspawn: Some(nspawn),
            leader: 0,
            log,
        };
        let leader = notify.wait_for("X_NSPAWN_LEADER_PID=", Duration::from_secs(30));
        c.leader = leader
            .lines()
            .find_map(|l| l.strip_prefix("X_NSPAWN_LEADER_PID="))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no leader pid in {leader:?}:\n{}", c.log_text()));
        notify.wait_for("READY=1", Duration::from_secs(60));
        let out = c.sh(&["systemctl", "is-system-running"]);
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            state == "running" || state == "degraded",
            "the container's systemd is {state:?}:\n{}",
            c.log_text()
        );
        c
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a command inside the container, in all its namespaces.
    pub fn sh(&self, args: &[&str]) -> Output {
        privileged(&self.prefix, "nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args(args)
            .output()
            .expect("nsenter")
    }

    /// Runs a command inside; panics with its output unless it succeeds.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.sh(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{args:?} failed:\n{text}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn show(&self, unit: &str, property: &str) -> String {
        self.ok(&["systemctl", "show", "-p", property, "--value", unit])
            .trim()
            .to_string()
    }

    /// The unit's main process id, asked of systemd over D-Bus with busctl.
    pub fn main_pid(&self, unit: &str) -> u32 {
        // systemd's object paths escape every byte but [A-Za-z0-9] as _xx.
        let label: String = unit
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    char::from(b).to_string()
                } else {
                    format!("_{b:02x}")
                }
            })
            .collect();
        let path = format!("/org/freedesktop/systemd1/unit/{label}");
        let out = self.ok(&[
            "busctl",
            "get-property",
            "org.freedesktop.systemd1",
            &path,
            "org.freedesktop.systemd1.Service",
            "MainPID",
        ]);
        // "u 80"
        out.split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("MainPID")
    }

    /// `journalctl -o json` entries matching `filters`, waiting up to 10 s for at least one.
    pub fn journal(&self, filters: &[&str]) -> Vec<Value> {
        self.journal_n(filters, 1, Duration::from_secs(10))
    }

    /// Waits (following the journal, up to `limit`, at most 30 s) for `n` entries matching
    /// `filters`, and returns them.
    pub fn journal_n(&self, filters: &[&str], n: usize, limit: Duration) -> Vec<Value> {
        let journalctl = || {
            let mut cmd = privileged(&self.prefix, "nsenter");
            // `timeout` ends a follower inside when the test is done with it (killing nsenter
            // outside does not reach it).
            cmd.args([
                "-t",
                &self.leader.to_string(),
                "-a",
                "timeout",
                "30",
                "journalctl",
            ]);
            cmd
        };
        crate::journal::wait(journalctl, filters, n, limit)
    }

    pub fn wait_until(&self, what: &str, limit: Duration, mut cond: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}\n{}",
                self.ok(&["journalctl", "--no-pager", "-n", "60"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `systemctl poweroff`, then waits for nspawn to exit; true when it exited cleanly.
    pub fn poweroff(&mut self) -> bool {
        let Some(mut nspawn) = self.nspawn.take() else {
            return true;
        };
        if let Ok(Some(s)) = nspawn.try_wait() {
            return s.success();
        }
        let nspawn_pid = nspawn.id();
        let (tx, exited) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(nspawn.wait());
        });
        let _ = self.sh(&["systemctl", "poweroff"]);
        if let Ok(Ok(status)) = exited.recv_timeout(Duration::from_secs(60)) {
            return status.success();
        }
        // Last resort for a container that does not stop: its init, by pid (never pid 0,
        // which would be our own process group), else nspawn.
        let target = if self.leader != 0 {
            self.leader
        } else {
            nspawn_pid
        };
        let _ = privileged(&self.prefix, "kill")
            .args(["-KILL", &target.to_string()])
            .status();
        let _ = exited.recv_timeout(Duration::from_secs(10));
        false
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        self.poweroff();
    }
}
