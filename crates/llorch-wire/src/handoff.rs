//! The handoff file: `<handoff dir>/<pool>.json`, written atomically by an engine once its model
//! is loaded and removed on a clean stop. pool-managerd watches the directory for it.

use serde::{Deserialize, Serialize};

/// Version of the handoff format; bumped when a field changes meaning.
pub const HANDOFF_VERSION: u32 = 1;

/// The largest handoff file a reader takes (a real one is a few hundred bytes): the engine that
/// writes it is less trusted than pool-managerd, which reads it.
pub const MAX_HANDOFF_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handoff {
    pub version: u32,
    pub pool_id: String,
    pub model_id: String,
    /// sha256 of the GGUF file the engine loaded, as lowercase hex.
    pub model_sha256: String,
    /// The Unix socket the engine serves on.
    pub socket: String,
    pub slots: u32,
    pub ctx_per_slot: u32,
    /// `cpu`, or `cuda:0,1` for the devices the model was offloaded to.
    pub device: String,
    pub engine_version: String,
    pub pid: u32,
}

impl Handoff {
    /// The handoff file name for a pool.
    pub fn file_name(pool_id: &str) -> String {
        format!("{pool_id}.json")
    }
}
