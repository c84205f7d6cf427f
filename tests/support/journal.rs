//! Reading the journal from tests without polling it: `journalctl --follow` tells when a
//! matching record arrives; once enough did, one snapshot returns every matching record.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `journalctl -o json` records matching `filters`, once at least `n` of them exist, or what
/// exists when `limit` has passed. `journalctl()` makes a command that runs `journalctl` with
/// the arguments added to it (directly, or inside a container).
pub fn wait(
    journalctl: impl Fn() -> Command,
    filters: &[&str],
    n: usize,
    limit: Duration,
) -> Vec<Value> {
    let snapshot = || -> Vec<Value> {
        let out = journalctl()
            .args(["-o", "json", "--no-pager"])
            .args(filters)
            .output()
            .expect("journalctl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let now = snapshot();
    if now.len() >= n {
        return now;
    }
    // Every matching record from the start, then each new one as the journal gets it.
    let mut follow = journalctl()
        .args(["-o", "json", "--no-pager", "--follow", "--lines=all"])
        .args(filters)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("journalctl --follow");
    let stdout = follow.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut seen = 0;
    while seen < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if serde_json::from_str::<Value>(&line).is_ok() => seen += 1,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    snapshot()
}
