//! A service manager's notify socket, for tests: daemons started with `NOTIFY_SOCKET` pointing
//! here send their sd_notify messages (`READY=1`, `STATUS=…`, `WATCHDOG=1`, …), one datagram
//! each, and a test waits for them as events.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A notify socket and the messages sent to it, one datagram each.
pub struct NotifySocket {
    pub path: std::path::PathBuf,
    rx: mpsc::Receiver<String>,
    /// Every message received so far, in order.
    pub seen: Vec<String>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        Self {
            path,
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for the next message, whatever it says.
    pub fn next(&mut self, limit: Duration) -> Option<String> {
        let m = self.rx.recv_timeout(limit).ok()?;
        self.seen.push(m.clone());
        Some(m)
    }

    /// Waits for a message containing `needle`; returns it.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(m) => {
                    self.seen.push(m.clone());
                    if m.contains(needle) {
                        return m;
                    }
                }
                Err(_) => panic!("no {needle:?} within {limit:?}; got {:?}", self.seen),
            }
        }
    }

    /// Watches for `within`; asserts `WATCHDOG=1` came at least 3 times and never more than
    /// `limit` apart (what systemd would enforce with `WatchdogSec=limit`).
    pub fn assert_watchdog(&mut self, within: Duration, limit: Duration) {
        let deadline = Instant::now() + within;
        let mut times = Vec::new();
        while let Ok(m) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if m.contains("WATCHDOG=1") {
                times.push(Instant::now());
            }
            self.seen.push(m);
        }
        assert!(
            times.len() >= 3,
            "{} watchdog feeds: {:?}",
            times.len(),
            self.seen
        );
        for w in times.windows(2) {
            let gap = w[1] - w[0];
            assert!(gap < limit, "a {gap:?} gap between watchdog feeds");
        }
    }
}
