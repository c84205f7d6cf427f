//! The handoff watcher: learns of ready and vanished engines from `<runtime>/handoff/` through
//! inotify (`notify`), without polling.
//!
//! Each pool has a directory of its own, `handoff/<pool>/`, where its engine writes
//! `<pool>.json`; under systemd an engine may write in its own pool's directory and nowhere
//! else (the unit's `ReadWritePaths=`), so a compromised engine cannot touch another pool's
//! file. The watch is recursive. Every event for a pool's file is handled the same way: read
//! the file again. A valid file is
//! recorded as the pool's handoff; a missing or unreadable one clears it. Whether the pool is
//! ready then depends on the file's pid being the engine this node started
//! ([`crate::state::derive_state`]). Engines write a temporary file (`.<pool>.json.tmp`) and
//! rename it into place; temporary names are ignored, the rename shows up as an event for the
//! final name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use llorch_wire::handoff::Handoff;

use crate::config::RuntimeLayout;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::state::Node;

/// Events waiting for the watcher task. When it is full the notify thread waits, so no event
/// is lost; a burst of handoff events is at most a few per pool.
const EVENT_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
#[error("cannot watch the handoff directory {}: {source}", dir.display())]
pub struct WatchError {
    pub dir: PathBuf,
    #[source]
    pub source: notify::Error,
}

/// Starts watching the layout's handoff directory (which must exist) and reads it once;
/// returns the task that applies events until `shutdown`.
pub fn spawn(
    node: Arc<Node>,
    layout: RuntimeLayout,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, WatchError> {
    let dir = layout.handoff_dir();
    let (tx, mut rx) = mpsc::channel::<notify::Result<notify::Event>>(EVENT_QUEUE);
    let mut watcher = notify::recommended_watcher(move |res| {
        // Runs on notify's own thread, never inside the runtime, so blocking is allowed. An
        // error means the watcher task ended (shutdown): nothing to deliver to.
        let _ = tx.blocking_send(res);
    })
    .map_err(|source| WatchError {
        dir: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|source| WatchError {
            dir: dir.clone(),
            source,
        })?;
    // A file may exist already; the watch is in place first, so nothing falls in between.
    for pool in node.pool_ids() {
        refresh(&node, &layout, &pool);
    }
    Ok(tokio::spawn(async move {
        // The watcher lives as long as this task.
        let mut watcher = watcher;
        loop {
            let res = tokio::select! {
                r = rx.recv() => r,
                () = shutdown.cancelled() => break,
            };
            match res {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "Handoff watcher error; reading every pool's handoff file again.");
                    for pool in node.pool_ids() {
                        refresh(&node, &layout, &pool);
                    }
                }
                // Reading a handoff file raises open/close-nowrite (access) events of its own;
                // reacting to them would read the file again, forever.
                Some(Ok(event)) if event.kind.is_access() => {}
                Some(Ok(event)) => {
                    if event.need_rescan() {
                        for pool in node.pool_ids() {
                            refresh(&node, &layout, &pool);
                        }
                    }
                    for path in &event.paths {
                        if let Some(pool) = pool_of(path) {
                            refresh(&node, &layout, pool);
                        }
                    }
                }
            }
            if !dir.exists() {
                restore(&node, &layout, &mut watcher);
            }
        }
    }))
}

/// The handoff directory is gone (removed by hand, a cleanup script): make it again (0770:
/// the engines, in group llama-orch, write their files there), watch it again, and write back
/// the handoff files of the engines that still run, so their pools stay ready. An engine whose
/// file was forgotten before the directory went is restarted: its next start writes one.
fn restore(node: &Node, layout: &RuntimeLayout, watcher: &mut notify::RecommendedWatcher) {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = layout.handoff_dir();
    let made = std::fs::DirBuilder::new()
        .mode(0o770)
        .create(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)));
    if let Err(e) = made {
        tracing::error!(dir = %dir.display(), error = %e, "The handoff directory was removed and cannot be made again: engines cannot report ready.");
        return;
    }
    for pool in node.pool_ids() {
        if let Err(e) = layout.create_pool_handoff_dir(&pool) {
            tracing::error!(dir = %layout.pool_handoff_dir(&pool).display(), error = %e, "Cannot make a pool's handoff directory again.");
        }
    }
    if let Err(e) = watcher.watch(&dir, RecursiveMode::Recursive) {
        tracing::error!(dir = %dir.display(), error = %e, "Cannot watch the handoff directory again.");
    }
    let mut restored = Vec::new();
    for pool in node.pool_ids() {
        let (handoff, running, commands) = node
            .read(&pool, |p| {
                (
                    p.handoff.clone(),
                    p.phase == crate::state::Phase::Running,
                    p.commands.clone(),
                )
            })
            .unwrap_or_default();
        match handoff {
            Some(h) => {
                let path = layout.handoff_file(&pool);
                let tmp = layout
                    .pool_handoff_dir(&pool)
                    .join(format!(".{pool}.json.tmp"));
                let written = serde_json::to_vec(&h)
                    .map_err(std::io::Error::other)
                    .and_then(|bytes| std::fs::write(&tmp, bytes))
                    .and_then(|()| std::fs::rename(&tmp, &path));
                match written {
                    Ok(()) => restored.push(pool),
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "Cannot write a handoff file back.")
                    }
                }
            }
            None if running => {
                let (reply, _) = tokio::sync::oneshot::channel();
                let asked = commands.is_some_and(|c| {
                    c.try_send(crate::state::Request {
                        command: crate::state::Command::Restart,
                        by: "pool-managerd (its handoff file was removed with the directory)"
                            .into(),
                        reply,
                    })
                    .is_ok()
                });
                tracing::warn!(pool_id = %pool, asked, "Restarting an engine whose handoff file was removed with the directory.");
            }
            None => {}
        }
    }
    tracing::warn!(dir = %dir.display(), restored = ?restored, "The handoff directory was removed; it is back, with the handoff files of the running engines.");
}

/// The pool a handoff file belongs to: `<pool>/<pool>.json`, not a hidden temporary file, and
/// not a file named for one pool in another pool's directory.
pub fn pool_of(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with('.') {
        return None;
    }
    let pool = name.strip_suffix(".json").filter(|p| !p.is_empty())?;
    let dir = path.parent()?.file_name()?.to_str()?;
    (dir == pool).then_some(pool)
}

/// Reads the pool's handoff file again and records what it says. The engine's socket is the
/// one the runtime layout gives the pool, never a path the file names: an engine (which parses
/// untrusted model files) that writes another pool's handoff file must not be able to redirect
/// that pool's requests to itself, so a file naming another socket is refused.
fn refresh(node: &Node, layout: &RuntimeLayout, pool: &str) {
    let path = layout.handoff_file(pool);
    let expected = layout.engine_socket(pool);
    let handoff = match llorch_os::fs::read_untrusted(
        &path,
        llorch_wire::handoff::MAX_HANDOFF_BYTES,
    ) {
        Ok(bytes) => match serde_json::from_slice::<Handoff>(&bytes) {
            Ok(h) if h.pool_id == pool && Path::new(&h.socket) == expected => Some(h),
            Ok(h) if h.pool_id == pool => {
                node.metrics.handoff("invalid");
                tracing::warn!(file = %path.display(), socket = %h.socket, expected = %expected.display(), "Ignoring a handoff file that names another socket than the pool's.");
                None
            }
            Ok(h) => {
                tracing::warn!(file = %path.display(), pool_id = %h.pool_id, "Ignoring a handoff file whose pool_id does not match its name.");
                None
            }
            Err(e) => {
                node.metrics.handoff("invalid");
                tracing::warn!(file = %path.display(), error = %e, "Ignoring a handoff file that does not parse.");
                None
            }
        },
        // The directory itself went, not the engine's file: the engine still runs and
        // `restore` writes its file back.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && !layout.pool_handoff_dir(pool).exists() =>
        {
            return;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "Cannot read a handoff file.");
            None
        }
    };
    let known = node.update(pool, |p| {
        if p.handoff != handoff {
            node.metrics.handoff(if handoff.is_some() {
                "written"
            } else {
                "removed"
            });
            tracing::debug!(
                pool_id = pool,
                present = handoff.is_some(),
                pid = handoff.as_ref().map(|h| h.pid),
                "Handoff file changed."
            );
            p.handoff = handoff;
        }
    });
    if known.is_none() {
        tracing::debug!(file = %path.display(), "Ignoring the handoff file of a pool this node does not run.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llorch_wire::node::PoolState;
    use std::time::Duration;

    #[test]
    fn temporary_and_foreign_names_are_ignored() {
        assert_eq!(
            pool_of(Path::new("/h/default/default.json")),
            Some("default")
        );
        assert_eq!(pool_of(Path::new("/h/default/.default.json.tmp")), None);
        assert_eq!(pool_of(Path::new("/h/default/default.json.tmp")), None);
        assert_eq!(pool_of(Path::new("/h/default/.json")), None);
        assert_eq!(pool_of(Path::new("/h/default/notes.txt")), None);
        // Another pool's name in this pool's directory, or a file at the top: not a handoff.
        assert_eq!(pool_of(Path::new("/h/other/default.json")), None);
        assert_eq!(pool_of(Path::new("/h/default.json")), None);
    }

    fn write_atomically(layout: &RuntimeLayout, pool: &str, pid: u32) {
        write_naming(layout, pool, pid, &layout.engine_socket(pool));
    }

    fn write_naming(layout: &RuntimeLayout, pool: &str, pid: u32, socket: &Path) {
        let dir = layout.pool_handoff_dir(pool);
        std::fs::create_dir_all(&dir).unwrap();
        let h = Handoff {
            version: 1,
            pool_id: pool.into(),
            model_id: "m".into(),
            model_sha256: "0".repeat(64),
            socket: socket.display().to_string(),
            slots: 1,
            ctx_per_slot: 64,
            device: "cpu".into(),
            engine_version: "9.9.9".into(),
            pid,
        };
        let tmp = dir.join(format!(".{pool}.json.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&h).unwrap()).unwrap();
        std::fs::rename(tmp, dir.join(format!("{pool}.json"))).unwrap();
    }

    async fn wait_state(node: &Node, want: PoolState) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let st = node.status("default").unwrap().state;
            if st == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "state stayed {st}, wanted {want}"
            );
            tokio::time::timeout(Duration::from_millis(200), node.changed.notified())
                .await
                .ok();
        }
    }

    /// The example node with pool `default`'s engine (pid 42) started, and an empty handoff
    /// directory.
    fn running_engine_42() -> (Arc<Node>, tempfile::TempDir, RuntimeLayout) {
        let cfg = crate::config::parse(Path::new("t.toml"), include_str!("../examples/node.toml"))
            .unwrap();
        let node = Node::new(cfg.pools());
        node.update("default", |p| {
            p.phase = crate::state::Phase::Running;
            p.engine_pid = Some(42);
        });
        let dir = tempfile::tempdir().unwrap();
        let layout = RuntimeLayout::new(dir.path());
        std::fs::create_dir_all(layout.pool_handoff_dir("default")).unwrap();
        (node, dir, layout)
    }

    #[tokio::test]
    async fn files_make_the_started_engine_ready_and_removal_unready() {
        let (node, _dir, layout) = running_engine_42();
        // Present before the watcher starts, written by another engine: not ready.
        write_atomically(&layout, "default", 41);
        let stop = CancellationToken::new();
        let task = spawn(node.clone(), layout.clone(), stop.clone()).unwrap();
        assert_eq!(
            node.read("default", |p| p.handoff.as_ref().map(|h| h.pid))
                .unwrap(),
            Some(41)
        );
        assert_eq!(node.status("default").unwrap().state, PoolState::Loading);
        // The right pid but another socket (a forged file): refused, not ready.
        write_naming(&layout, "default", 42, &layout.engine_socket("other"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while node.read("default", |p| p.handoff.is_some()).unwrap() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the forged file was kept"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(node.status("default").unwrap().state, PoolState::Loading);
        write_atomically(&layout, "default", 42);
        wait_state(&node, PoolState::Ready).await;
        assert_eq!(
            node.status("default").unwrap().engine_version.as_deref(),
            Some("9.9.9")
        );
        std::fs::remove_file(layout.handoff_file("default")).unwrap();
        wait_state(&node, PoolState::Loading).await;
        // Other pools' files are ignored.
        write_atomically(&layout, "other", 42);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn a_removed_directory_comes_back_with_the_running_engines_files() {
        let (node, dir, layout) = running_engine_42();
        let stop = CancellationToken::new();
        let task = spawn(node.clone(), layout.clone(), stop.clone()).unwrap();
        write_atomically(&layout, "default", 42);
        wait_state(&node, PoolState::Ready).await;
        // Moved away whole (no file event comes first, so this is deterministic; `rm -rf` is
        // the fault test's, tests/faults.rs).
        std::fs::rename(layout.handoff_dir(), dir.path().join("gone")).unwrap();
        // Back, with the engine's file, and the pool never stopped being ready.
        let file = layout.handoff_file("default");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !file.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the handoff file was not written back"
            );
            assert_eq!(node.status("default").unwrap().state, PoolState::Ready);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(layout.handoff_dir())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o770);
        let h: Handoff = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(h.pid, 42);
        // Watched again: the engine removing its file makes the pool unready.
        std::fs::remove_file(&file).unwrap();
        wait_state(&node, PoolState::Loading).await;
        stop.cancel();
        task.await.unwrap();
    }
}
