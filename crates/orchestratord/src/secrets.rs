//! `orchestratord --stage-secrets`: what the unit runs as root (`ExecStartPre=+`,
//! `ExecReload=+`) to hand the daemon its key files in a way a reload refreshes.
//!
//! systemd before 259 does not refresh `LoadCredential=` on reload, so a key or node token
//! removed from its file would keep working until a restart. Instead, before each start and
//! each reload, the files under `/etc/llama-orch` (root's, mode 0600) are copied into the
//! unit's runtime directory (`$RUNTIME_DIRECTORY`, which systemd creates for the service's
//! user), owned by that directory's owner, mode 0600, each replaced whole by a rename; the copy
//! of a file that is gone is removed. orchestratord finds them there (`LLORCH_SECRETS_DIR`)
//! and reads them again on SIGHUP. No shell tool is needed, so it works where `cp` and `chown`
//! are not on systemd's PATH (NixOS).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use std::path::Path;

/// The secrets staged, by file name.
pub const STAGED: [&str; 3] = ["node-tokens", "api-keys", "admin-token"];

/// Copies each of [`STAGED`] from `from` into `to`, owned by `to`'s owner; returns how many
/// were staged. An error names the file.
///
/// It runs as root while the service's user (who owns `to`) may be running: nothing here
/// follows a link in `to` or changes the owner of a path. A copy is created with `O_EXCL` and
/// `O_NOFOLLOW` and given its owner through its open descriptor, then renamed into place; a
/// source must be a regular file readable by its owner alone, as the daemon would demand.
pub fn stage(from: &Path, to: &Path) -> Result<usize, String> {
    let owner = std::fs::symlink_metadata(to).map_err(|e| format!("{}: {e}", to.display()))?;
    if !owner.is_dir() {
        return Err(format!("{} is not a directory", to.display()));
    }
    let mut staged = 0;
    for name in STAGED {
        let src = from.join(name);
        let dst = to.join(name);
        let Some(text) = read_source(&src)? else {
            // Unlinking never follows a link: a planted one goes, its target stays.
            match std::fs::remove_file(&dst) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("{}: {e}", dst.display()))
                }
                _ => {}
            }
            continue;
        };
        let tmp = to.join(format!(".{name}.new"));
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::os::unix::fs::fchown(&f, Some(owner.uid()), Some(owner.gid()))?;
            std::fs::rename(&tmp, &dst)
        };
        write().map_err(|e| format!("{}: {e}", dst.display()))?;
        staged += 1;
    }
    Ok(staged)
}

/// A source file's bytes; None when it does not exist. A link, a non-regular file, or one
/// that users other than its owner may read is refused.
fn read_source(src: &Path) -> Result<Option<Vec<u8>>, String> {
    let meta = match std::fs::symlink_metadata(src) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", src.display())),
    };
    if !meta.is_file() {
        return Err(format!(
            "{} is not a regular file (a link or something else); place the file itself",
            src.display()
        ));
    }
    if let Some(mode) =
        llorch_os::fs::exposed_secret(src).map_err(|e| format!("{}: {e}", src.display()))?
    {
        return Err(format!(
            "{} can be read by other users (mode {mode:o}); it holds secrets: chmod 600 it",
            src.display()
        ));
    }
    llorch_os::fs::read_untrusted(src, 1 << 20)
        .map(Some)
        .map_err(|e| format!("{}: {e}", src.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_copied_owner_only_and_a_removed_one_goes() {
        use std::os::unix::fs::PermissionsExt;
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let secret = |name: &str, text: &str| {
            let p = from.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        };
        secret("node-tokens", "* token-0123456789abcdef\n");
        secret("api-keys", "a key-0123456789abcdef\n");
        assert_eq!(stage(from.path(), to.path()), Ok(2));
        let copy = to.path().join("api-keys");
        let text = std::fs::read_to_string(&copy).unwrap();
        assert_eq!(text, "a key-0123456789abcdef\n");
        let mode = std::fs::metadata(&copy).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A key removed from its file, the file of API keys removed: the copies follow.
        secret("node-tokens", "* other-0123456789abcdef\n");
        std::fs::remove_file(from.path().join("api-keys")).unwrap();
        assert_eq!(stage(from.path(), to.path()), Ok(1));
        assert!(!copy.exists());
        let tokens = std::fs::read_to_string(to.path().join("node-tokens")).unwrap();
        assert_eq!(tokens, "* other-0123456789abcdef\n");
        assert!(stage(from.path(), &to.path().join("missing")).is_err());
        // A source others may read, or a link, is refused; links planted among the copies
        // are replaced or removed, their target untouched.
        let tokens = from.path().join("node-tokens");
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(stage(from.path(), to.path())
            .unwrap_err()
            .contains("chmod 600"));
        std::fs::remove_file(&tokens).unwrap();
        let target = from.path().join("elsewhere");
        secret("elsewhere", "x\n");
        std::os::unix::fs::symlink(&target, &tokens).unwrap();
        let err = stage(from.path(), to.path()).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        std::fs::remove_file(&tokens).unwrap();
        secret("node-tokens", "* again-0123456789abcdef\n");
        std::os::unix::fs::symlink(&target, to.path().join(".node-tokens.new")).unwrap();
        std::os::unix::fs::symlink(&target, to.path().join("admin-token")).unwrap();
        assert_eq!(stage(from.path(), to.path()), Ok(1));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "x\n");
        assert!(std::fs::symlink_metadata(to.path().join("admin-token")).is_err());
    }
}
