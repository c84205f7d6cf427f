//! The files a node keeps under its runtime directory (engine sockets, handoff files, plans,
//! logs). The launchers, the supervisor and the handoff watcher derive every path from here,
//! never from a file another role can write.

use std::path::{Path, PathBuf};

/// The files a node keeps under its runtime directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeLayout {
    pub root: PathBuf,
}

impl RuntimeLayout {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    pub fn engines_dir(&self) -> PathBuf {
        self.root.join("engines")
    }

    pub fn handoff_dir(&self) -> PathBuf {
        self.root.join("handoff")
    }

    pub fn plans_dir(&self) -> PathBuf {
        self.root.join("plans")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn engine_socket(&self, pool: &str) -> PathBuf {
        self.engines_dir().join(format!("{pool}.sock"))
    }

    /// The pool's own handoff directory: under systemd its engine may write there and in no
    /// other pool's (the unit's `ReadWritePaths=`).
    pub fn pool_handoff_dir(&self, pool: &str) -> PathBuf {
        self.handoff_dir().join(pool)
    }

    pub fn handoff_file(&self, pool: &str) -> PathBuf {
        self.pool_handoff_dir(pool)
            .join(llorch_wire::handoff::Handoff::file_name(pool))
    }

    /// Makes the pool's handoff directory (0770: the engines, in group llama-orch, write
    /// there) when it is missing.
    pub fn create_pool_handoff_dir(&self, pool: &str) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = self.pool_handoff_dir(pool);
        match std::fs::DirBuilder::new().mode(0o770).create(&dir) {
            Ok(()) => std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn plan_file(&self, pool: &str) -> PathBuf {
        self.plans_dir().join(format!("{pool}.json"))
    }

    pub fn provision_log(&self, pool: &str) -> PathBuf {
        self.logs_dir().join(format!("{pool}.provision.log"))
    }

    pub fn engine_log(&self, pool: &str) -> PathBuf {
        self.logs_dir().join(format!("{pool}.engine.log"))
    }

    /// Creates every directory.
    pub fn create(&self) -> std::io::Result<()> {
        for d in [
            self.engines_dir(),
            self.handoff_dir(),
            self.plans_dir(),
            self.logs_dir(),
        ] {
            std::fs::create_dir_all(d)?;
        }
        Ok(())
    }
}
