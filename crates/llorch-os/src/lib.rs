//! The one crate that touches the service manager's interfaces: listening sockets inherited
//! through `LISTEN_FDS` (socket activation) with direct binding as the fallback, and in
//! [`service`] sd_notify (readiness, status, start-timeout extension, stopping, watchdog),
//! credentials and journald logging, with the stable journald [`message_id`]s.
//!
//! [`fs`] holds the workspace's one atomic file write (fsync of the file and its directory);
//! [`sync`] its lock policy (locks that outlive a panic).
//!
//! [`process`] holds what a parent sets up for a child between fork and exec (parent-death
//! signal, a passed listener), the stop signal, and the readiness check of a held socket.
//!
//! Nothing else in the workspace reads `LISTEN_FDS`, `NOTIFY_SOCKET`, `WATCHDOG_USEC` or
//! `JOURNAL_STREAM`, handles raw file descriptors or sends signals; no other crate of the
//! daemons has an `unsafe` block (tests that signal their own children aside).

pub mod fs;
pub mod mem;
pub mod message_id;
pub mod process;
pub mod service;
pub mod sync;

use std::io;
use std::path::{Path, PathBuf};

use std::net::{SocketAddr, UdpSocket};
use std::sync::{Mutex, MutexGuard, OnceLock};

use tokio::net::{TcpListener, UnixListener};

/// Where a listener came from, for the log line that says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerOrigin {
    /// Passed in by the service manager (socket activation).
    Inherited,
    /// Bound by this process at the given path; the process removes the file when it stops.
    Bound(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot take the inherited socket (LISTEN_FDS): {0}")]
    Inherited(io::Error),
    #[error("cannot bind the Unix socket {path}: {source} (check that its directory exists and is writable, and that no other process serves it)")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr}: {source} (is another process using the port? choose another address)")]
    BindTcp { addr: SocketAddr, source: io::Error },
    #[error("cannot bind UDP {addr}: {source} (is another process using the port? choose another address)")]
    BindUdp { addr: SocketAddr, source: io::Error },
}

/// The sockets the service manager passed, read from the environment once per process:
/// listenfd clears `LISTEN_FDS` as it reads it, and a daemon may take several (orchestratord's
/// API and beats).
fn inherited() -> MutexGuard<'static, listenfd::ListenFd> {
    static FDS: OnceLock<Mutex<listenfd::ListenFd>> = OnceLock::new();
    sync::lock(FDS.get_or_init(|| Mutex::new(listenfd::ListenFd::from_env())))
}

/// Which inherited socket is `name`'s: the one whose `FileDescriptorName=` (`LISTEN_FDNAMES`)
/// is `name`, or the only one when just one was passed (systemd-socket-activate without
/// names). `None` when nothing was inherited.
fn inherited_index(fds: &listenfd::ListenFd, name: &str) -> Result<Option<usize>, ListenError> {
    let n = fds.len();
    if n == 0 {
        return Ok(None);
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    if let Some(i) = names.split(':').position(|x| x == name) {
        return Ok(Some(i));
    }
    if n == 1 {
        return Ok(Some(0));
    }
    Err(ListenError::Inherited(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{n} sockets were passed ({names:?}) and none is named {name:?}; set FileDescriptorName={name} in the socket unit"),
    )))
}

/// Takes the inherited Unix listener named `name` when the process was socket activated, and
/// binds `path` otherwise. A stale socket file at `path` (nobody accepting on it) is replaced;
/// a live one is an error, so two engines never fight over one socket.
pub fn unix_listener(
    name: &str,
    path: &Path,
) -> Result<(UnixListener, ListenerOrigin), ListenError> {
    let mut fds = inherited();
    let index = inherited_index(&fds, name)?;
    if let Some(std_listener) = index
        .map(|i| fds.take_unix_listener(i))
        .transpose()
        .map_err(ListenError::Inherited)?
        .flatten()
    {
        std_listener
            .set_nonblocking(true)
            .map_err(ListenError::Inherited)?;
        let listener = UnixListener::from_std(std_listener).map_err(ListenError::Inherited)?;
        return Ok((listener, ListenerOrigin::Inherited));
    }
    bind_unix_nonblocking(path)
}

/// [`bind_unix`], as a Tokio listener.
fn bind_unix_nonblocking(path: &Path) -> Result<(UnixListener, ListenerOrigin), ListenError> {
    let std_listener = bind_unix(path)?;
    std_listener
        .set_nonblocking(true)
        .map_err(|source| ListenError::Bind {
            path: path.to_owned(),
            source,
        })?;
    UnixListener::from_std(std_listener)
        .map(|l| (l, ListenerOrigin::Bound(path.to_owned())))
        .map_err(|source| ListenError::Bind {
            path: path.to_owned(),
            source,
        })
}

/// An optional Unix listener: the inherited one named `name` (by `FileDescriptorName=` only:
/// an optional socket is never guessed), else `path` bound here when one is given; None when
/// neither.
pub fn optional_unix_listener(
    name: &str,
    path: Option<&Path>,
) -> Result<Option<(UnixListener, ListenerOrigin)>, ListenError> {
    let named = {
        let fds = inherited();
        let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
        names
            .split(':')
            .position(|x| x == name)
            .filter(|i| *i < fds.len())
            .is_some()
    };
    match (named, path) {
        (true, _) => unix_listener(name, path.unwrap_or(Path::new(""))).map(Some),
        (false, Some(p)) => bind_unix_nonblocking(p).map(Some),
        (false, None) => Ok(None),
    }
}

/// Takes the inherited TCP listener named `name` when the process was socket activated, and
/// binds `addr` otherwise.
pub async fn tcp_listener(
    name: &str,
    addr: SocketAddr,
) -> Result<(TcpListener, ListenerOrigin), ListenError> {
    let taken = {
        let mut fds = inherited();
        let index = inherited_index(&fds, name)?;
        index
            .map(|i| fds.take_tcp_listener(i))
            .transpose()
            .map_err(ListenError::Inherited)?
            .flatten()
    };
    if let Some(std_listener) = taken {
        std_listener
            .set_nonblocking(true)
            .map_err(ListenError::Inherited)?;
        let listener = TcpListener::from_std(std_listener).map_err(ListenError::Inherited)?;
        return Ok((listener, ListenerOrigin::Inherited));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::BindTcp { addr, source })?;
    Ok((
        listener,
        ListenerOrigin::Bound(PathBuf::from(addr.to_string())),
    ))
}

/// Takes the inherited UDP socket named `name` (by `FileDescriptorName=` only: an optional
/// socket is never guessed), else binds `addr` when one is given; None when neither.
pub fn udp_socket(
    name: &str,
    addr: Option<SocketAddr>,
) -> Result<Option<(UdpSocket, ListenerOrigin)>, ListenError> {
    let mut fds = inherited();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let index = names
        .split(':')
        .position(|x| x == name)
        .filter(|i| *i < fds.len());
    if let Some(socket) = index
        .map(|i| fds.take_udp_socket(i))
        .transpose()
        .map_err(ListenError::Inherited)?
        .flatten()
    {
        return Ok(Some((socket, ListenerOrigin::Inherited)));
    }
    let Some(addr) = addr else {
        return Ok(None);
    };
    let socket = UdpSocket::bind(addr).map_err(|source| ListenError::BindUdp { addr, source })?;
    Ok(Some((
        socket,
        ListenerOrigin::Bound(PathBuf::from(addr.to_string())),
    )))
}

/// Binds a Unix listener at `path`, replacing a stale socket file (nobody accepting on it) and
/// refusing a live one, so two processes never fight over one socket.
pub fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, ListenError> {
    let bind_err = |source| ListenError::Bind {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(bind_err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is accepting connections on it",
                )))
            }
            Err(_) => {
                tracing::info!(socket = %path.display(), "Replacing a stale socket file.");
                std::fs::remove_file(path).map_err(bind_err)?;
            }
        }
    }
    std::os::unix::net::UnixListener::bind(path).map_err(bind_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn binds_replaces_stale_files_and_refuses_live_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.sock");
        let (first, origin) = unix_listener("engine", &path).unwrap();
        assert_eq!(origin, ListenerOrigin::Bound(path.clone()));
        let err = unix_listener("engine", &path).unwrap_err();
        assert!(err.to_string().contains("e.sock"), "{err}");
        drop(first);
        // The file is left behind by the dropped listener: a stale socket.
        assert!(path.exists());
        let (_second, _) = unix_listener("engine", &path).unwrap();
    }
}
