//! Talking to the service manager: readiness, status lines, start-timeout extensions, stopping,
//! the watchdog (sd_notify), and credentials (`$CREDENTIALS_DIRECTORY`).
//!
//! Every call is a no-op when the process was not started by a service manager
//! (`NOTIFY_SOCKET` unset), so daemons call them unconditionally. Failures to notify are
//! logged at debug and otherwise ignored: a daemon must not stop serving because the manager's
//! socket hiccuped. The process environment is never changed (children started by a daemon
//! must not inherit `NOTIFY_SOCKET`; launchers remove it from the child's environment).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "Cannot notify the service manager.");
    }
}

/// `READY=1`: the daemon can serve.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// `STATUS=…`: one line an operator can act on (shown by `systemctl status`).
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

/// `READY=1` with a status line, in one message.
pub fn ready_with_status(line: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(line)]);
}

/// `EXTEND_TIMEOUT_USEC=…`: still starting (a long model load), give it `by` more.
pub fn extend_timeout(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// `RELOADING=1` with `MONOTONIC_USEC=`: the daemon re-reads its configuration; send
/// [`ready`] when done.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Feeds the service manager's watchdog from the loop that does the work: a loop that stops
/// turning stops feeding it, and the manager restarts the daemon. `WATCHDOG=1` goes out at most
/// every half `WatchdogSec`; the loop must turn at least every quarter ([`Watchdog::period`]),
/// so no gap between two feeds reaches `WatchdogSec`. Without a watchdog (`WATCHDOG_USEC`
/// unset) feeding does nothing.
#[derive(Debug)]
pub struct Watchdog {
    interval: Option<Duration>,
    last: Option<Instant>,
}

impl Watchdog {
    pub fn from_env() -> Self {
        Self {
            interval: sd_notify::watchdog_enabled(),
            last: None,
        }
    }

    /// How often the work loop must turn at least (a quarter of `WatchdogSec`), if a watchdog
    /// is on.
    pub fn period(&self) -> Option<Duration> {
        self.interval.map(|i| i / 4)
    }

    /// How long the loop may wait for work before it must turn again: `otherwise` without a
    /// watchdog, else the shorter of the two.
    pub fn wait(&self, otherwise: Duration) -> Duration {
        self.period().map_or(otherwise, |p| p.min(otherwise))
    }

    /// Sends `WATCHDOG=1` when half of `WatchdogSec` passed since the last one.
    pub fn feed(&mut self) {
        let Some(interval) = self.interval else {
            return;
        };
        if self.last.is_none_or(|l| l.elapsed() >= interval / 2) {
            send(&[NotifyState::Watchdog]);
            self.last = Some(Instant::now());
        }
    }
}

/// Where a secret named `name` was passed to this service: `$LLORCH_SECRETS_DIR/<name>` (a
/// directory the unit refreshes on every reload, see orchestratord.service), else
/// `$CREDENTIALS_DIRECTORY/<name>` (`LoadCredential=`, which systemd before 259 does not
/// refresh on reload); None when neither holds it.
pub fn credential(name: &str) -> Option<PathBuf> {
    ["LLORCH_SECRETS_DIR", "CREDENTIALS_DIRECTORY"]
        .into_iter()
        .filter_map(std::env::var_os)
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(name))
        .find(|p| p.exists())
}

/// A fresh secret for a token file: 32 bytes from the kernel's random source, as 64 hex digits.
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a secret to a new file only its owner can read (mode 0600 from the start, so no
/// other user can open it in between). The file must not exist yet.
pub fn write_secret(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Cancels `stop` on SIGTERM (the service manager's stop) or SIGINT (Ctrl-C). The handlers are
/// installed before this returns, so a signal that arrives early is not lost.
pub fn cancel_on_stop_signal(stop: tokio_util::sync::CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received."),
            _ = int.recv() => tracing::info!("SIGINT received."),
        }
        stop.cancel();
    });
    Ok(())
}

static TO_JOURNAL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Reports a configuration the daemon refuses to run with: to the journal with
/// [`crate::message_id::CONFIG_REJECTED`] when logging goes there, else as one line on stderr
/// (`<daemon>: <error>`), for a person at a terminal.
pub fn config_rejected(daemon: &str, error: &dyn std::fmt::Display) {
    if TO_JOURNAL.load(std::sync::atomic::Ordering::Relaxed) {
        tracing::error!(
            message_id = crate::message_id::CONFIG_REJECTED,
            error = %error,
            "Configuration rejected."
        );
    } else {
        eprintln!("{daemon}: {error}");
    }
}

/// Logging: to journald with structured fields when the service manager connected stderr to
/// the journal (`JOURNAL_STREAM`), else human-readable lines on stderr. `LLORCH_LOG` sets the
/// filter (`default` otherwise).
pub fn init_logging(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LLORCH_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            // Fields under their own names (TASK_ID, MESSAGE_ID, ...), not the default `F_`
            // prefix, so `journalctl TASK_ID=...` and MESSAGE_ID catalogs work.
            let journald = journald.with_field_prefix(None);
            tracing_subscriber::registry()
                .with(filter)
                .with(journald)
                .init();
            TO_JOURNAL.store(true, std::sync::atomic::Ordering::Relaxed);
            return;
        }
    }
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
}
