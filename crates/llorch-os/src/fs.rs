//! The one way the workspace replaces a file that another process reads (handoff files, engine
//! plans, cache manifests): readers see the old file or the new one whole, never a part, and
//! after a crash or power loss the rename has not outrun the data it names.

use std::io::{self, Read, Write};
use std::path::Path;

/// The mode of a secrets file (keys, tokens) when users other than its owner may read it; None
/// when only its owner may. Files systemd passes as credentials (`$CREDENTIALS_DIRECTORY`)
/// are not judged: systemd grants them to the unit alone (its ACL can show as group bits).
pub fn exposed_secret(path: &Path) -> io::Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    let credential = std::env::var_os("CREDENTIALS_DIRECTORY")
        .is_some_and(|d| !d.is_empty() && path.starts_with(d));
    Ok((mode & 0o077 != 0 && !credential).then_some(mode))
}

/// Reads a small file that a less trusted process writes (an engine's handoff file, a
/// provisioner's plan): a symlink is refused (`O_NOFOLLOW`), a FIFO or device does not block
/// the reader (`O_NONBLOCK`, then only regular files are read), and more than `limit` bytes is
/// an error instead of memory spent. A FIFO or `/dev/zero` planted under the name costs the
/// reader one `open` and one `fstat`.
pub fn read_untrusted(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    if meta.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {limit} bytes", path.display()),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {limit} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically: into `.<name>.tmp` in the same directory (created if
/// missing), fsynced, renamed over `path`, and the directory fsynced so the rename is durable.
///
/// Readers that watch the directory should ignore names that start with a dot. Two writers of
/// the same path at once share the temporary name; the workspace has one writer per file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no file", path.display()),
        )
    })?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::{read_untrusted, write_atomic};

    #[test]
    fn untrusted_reads_refuse_links_fifos_devices_and_big_files() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.json");
        std::fs::write(&ok, b"{}").unwrap();
        assert_eq!(read_untrusted(&ok, 16).unwrap(), b"{}");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; 17]).unwrap();
        assert!(read_untrusted(&big, 16).is_err());
        let link = dir.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(read_untrusted(&link, 16).is_err());
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let start = std::time::Instant::now();
        assert!(read_untrusted(&fifo, 16).is_err());
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        assert!(read_untrusted(std::path::Path::new("/dev/zero"), 16).is_err());
    }

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/plan.json");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["plan.json"]);
    }

    #[test]
    fn a_path_without_a_file_name_is_refused() {
        let e = write_atomic(std::path::Path::new("/"), b"x").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }
}
