//! Child processes and raw descriptors: what a parent must set up between fork and exec, and
//! the one readiness check on a listening socket. Every `unsafe` block of the workspace that
//! touches a file descriptor or a signal lives here, each with the reason it is sound; plain
//! system calls go through rustix, without `unsafe`.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::process::Command;

/// Makes the child receive `signal` when the thread that started it dies, so a child never
/// outlives a parent that was killed without a chance to stop it. Spawn such children only
/// from threads that live as long as the parent (tokio's worker threads, the main thread).
pub fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory shared with the parent.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Keeps the parent's service-manager interfaces from a child (its sockets, its notify
/// socket): the child is the parent's business, not systemd's.
pub fn without_service_manager(cmd: &mut Command) {
    for var in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(var);
    }
}

/// Gives the child `listener` as its socket-activated listener, as systemd would pass it:
/// fd 3, `LISTEN_FDS=1`, `LISTEN_FDNAMES=name`. The caller keeps `listener` open until the
/// spawn returned.
pub fn pass_listener(cmd: &mut Command, listener: &impl AsRawFd, name: &str) {
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    cmd.env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", name)
        .env_remove("LISTEN_PID");
    // SAFETY: the closure runs in the forked child before exec and only calls dup2(2) and
    // fcntl(2), which are async-signal-safe; `fd` stays open in the parent (the caller holds
    // the listener) until the spawn returned.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                // dup2 onto itself keeps close-on-exec; clear it instead.
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends SIGTERM to a child the caller started and has not reaped (so its pid cannot have been
/// recycled): the polite stop every daemon here answers by draining.
pub fn terminate_child(pid: u32) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        // A child that already exited (ESRCH) needs no signal.
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Whether a connection waits on `listener` now (poll(2) without waiting).
pub fn connection_waiting(listener: &UnixListener) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let now = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(n) if n > 0)
        && fds[0].revents().contains(PollFlags::IN)
}

/// Waits until a connection waits on `listener`, without accepting it (the child that will
/// accept it is started meanwhile). Watches a duplicate of the descriptor of its own, so the
/// caller's listener stays untouched for the child.
pub async fn wait_for_connection(listener: &UnixListener) -> std::io::Result<()> {
    let dup = listener.try_clone()?;
    // SAFETY: `dup` owns its descriptor, which nothing replaces or closes while the AsyncFd
    // owns it.
    #[allow(unsafe_code)]
    let watched = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)
    }?;
    loop {
        let mut ready = watched.readable().await?;
        if connection_waiting(listener) {
            return Ok(());
        }
        ready.clear_ready();
    }
}

/// This process's effective user id (a D-Bus caller with the same uid is its own operator).
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiting_connection_is_seen_without_being_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        assert!(!connection_waiting(&listener));
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        assert!(connection_waiting(&listener));
        assert!(connection_waiting(&listener), "seeing it does not take it");
        listener.accept().unwrap();
        assert!(!connection_waiting(&listener));
    }

    #[test]
    fn terminate_child_sends_sigterm() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        terminate_child(child.id());
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn euid_is_the_processes_effective_uid() {
        let out = Command::new("id").arg("-u").output().unwrap();
        let id: u32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(euid(), id);
    }
}
