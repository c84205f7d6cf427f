//! Writing and removing the handoff file. The file appears whole or not at all: it is written
//! to a temporary name in the same directory, flushed, and renamed into place.

use std::io::Write;
use std::path::{Path, PathBuf};

use llorch_wire::handoff::Handoff;

/// Writes `handoff` into `dir` atomically and returns the file's path.
pub fn write(dir: &Path, handoff: &Handoff) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(Handoff::file_name(&handoff.pool_id));
    let tmp = dir.join(format!(".{}.tmp", Handoff::file_name(&handoff.pool_id)));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(handoff).expect("handoff serializes"))?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Removes the handoff file if it is still this process's: an engine that outlived its node
/// agent must not delete the file of the engine that replaced it. A file already gone is fine.
pub fn remove(path: &Path) -> std::io::Result<()> {
    let ours = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Handoff>(&b).ok())
        .is_none_or(|h| h.pid == std::process::id());
    if !ours {
        tracing::info!(file = %path.display(), "The handoff file belongs to another engine now; leaving it.");
        return Ok(());
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
