//! `engine-provisioner`: stages a model into the node's content-addressed cache, verifies it
//! (sha256 and GGUF header), and writes the engine plan for a pool.
//!
//! Code map: [`source`] parses where a model comes from; [`cache`] owns the cache layout and
//! the verify-then-rename staging; [`plan`] builds and writes the engine plan. Exit codes for
//! the binary are in [`exit`].

pub mod cache;
pub mod plan;
pub mod source;

use std::path::PathBuf;

pub use cache::{Cache, Staged};
pub use source::Source;

/// Exit codes of `engine-provisioner`, one per kind of failure so scripts and systemd can tell
/// them apart (docs/CONFIGURATION.md): the workspace's shared codes, under the names of what
/// they mean here.
pub mod exit {
    pub use llorch_wire::exit::{MALFORMED, NOT_GGUF, SHA256_MISMATCH, TRUNCATED, USAGE};
    /// The model source does not exist.
    pub const SOURCE_MISSING: i32 = llorch_wire::exit::NOINPUT;
    /// A download failed or stalled.
    pub const DOWNLOAD_FAILED: i32 = llorch_wire::exit::UNAVAILABLE;
    /// The cache cannot be written.
    pub const CACHE_WRITE: i32 = llorch_wire::exit::CANTCREAT;
    /// Reading the model failed.
    pub const IO: i32 = llorch_wire::exit::IOERR;
    /// A GPU pool with `gpu_only` whose model does not fit its GPUs' free memory.
    pub const DOES_NOT_FIT: i32 = llorch_wire::exit::CONFIG;
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Usage(String),
    #[error("model source {0} does not exist")]
    SourceMissing(PathBuf),
    #[error("sha256 mismatch for {origin}: expected {expected}, got {actual} (the file is corrupt or not the pinned model; nothing was staged)")]
    Sha256Mismatch {
        origin: String,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Gguf(#[from] llorch_gguf::GgufError),
    #[error("download of {url} failed: {reason} (nothing was staged)")]
    Download { url: String, reason: String },
    #[error("cannot write to the model cache {path}: {source}")]
    CacheWrite {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    DoesNotFit(String),
}

impl ProvisionError {
    pub fn exit_code(&self) -> i32 {
        use llorch_gguf::GgufError as G;
        match self {
            Self::Usage(_) => exit::USAGE,
            Self::SourceMissing(_) | Self::Gguf(G::NotFound { .. }) => exit::SOURCE_MISSING,
            Self::Sha256Mismatch { .. } => exit::SHA256_MISMATCH,
            Self::Gguf(G::NotGguf { .. }) => exit::NOT_GGUF,
            Self::Gguf(G::Truncated { .. }) => exit::TRUNCATED,
            Self::Gguf(G::Malformed { .. } | G::UnsupportedVersion { .. }) => exit::MALFORMED,
            Self::Gguf(G::Io { .. }) | Self::Io { .. } => exit::IO,
            Self::Download { .. } => exit::DOWNLOAD_FAILED,
            Self::CacheWrite { .. } => exit::CACHE_WRITE,
            Self::DoesNotFit(_) => exit::DOES_NOT_FIT,
        }
    }
}

/// Receives download or copy progress: bytes done and, when known, the total.
pub trait Progress {
    fn update(&mut self, done: u64, total: Option<u64>);
    fn finish(&mut self) {}
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&mut self, _: u64, _: Option<u64>) {}
}
