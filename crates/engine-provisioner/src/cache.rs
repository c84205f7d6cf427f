//! The node's model cache, addressed by content:
//!
//! ```text
//! <cache>/blobs/sha256-<hex>.gguf     verified model files, named by their sha256
//! <cache>/manifests/<model id>.json   which blob a model id uses, and where it came from
//! <cache>/tmp/                        downloads and copies in progress (same filesystem)
//! ```
//!
//! A file reaches `blobs/` only by a rename after its sha256 and GGUF header were checked, so a
//! blob is whole and is what its name says. Two model ids with the same file share one blob.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use llorch_gguf::GgufInfo;
use llorch_wire::id::valid_model_id;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Progress, ProvisionError, Source};

const CHUNK: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
    downloads: Downloads,
}

/// What a download may be.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Downloads {
    /// Plain `http://` to another host (`--allow-http`): anyone on the path sees which model
    /// is fetched and can cut it off (the sha256 pin still decides what is staged). Loopback
    /// is always allowed.
    pub allow_http: bool,
    /// The most bytes a download may have (`--max-download-bytes`); None: the free space of
    /// the cache's file system when the download starts.
    pub max_bytes: Option<u64>,
}

/// Whether `url` (http or https) names a loopback host.
fn loopback_url(url: &str) -> bool {
    let Some(rest) = url.split_once("://").map(|(_, r)| r) else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = if authority.starts_with('[') {
        authority
            .split(']')
            .next()
            .unwrap_or("")
            .trim_start_matches('[')
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Bytes free for an unprivileged writer on the file system of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// A model file in the cache, verified.
#[derive(Debug, Clone)]
pub struct Staged {
    pub path: PathBuf,
    pub sha256: String,
    pub size_bytes: u64,
    pub info: GgufInfo,
    /// False when the blob was already in the cache and only re-verified.
    pub fetched: bool,
}

/// `manifests/<model id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub id: String,
    pub sha256: String,
    pub source: String,
    pub size_bytes: u64,
}

/// Removes a temporary file unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            downloads: Downloads::default(),
        }
    }

    /// The same cache, with what downloads may be.
    pub fn with_downloads(mut self, downloads: Downloads) -> Self {
        self.downloads = downloads;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root
            .join("blobs")
            .join(format!("sha256-{sha256}.gguf"))
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn manifest_path(&self, model_id: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{model_id}.json"))
    }

    pub fn manifest(&self, model_id: &str) -> Option<Manifest> {
        let text = std::fs::read(self.manifest_path(model_id)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn mkdirs(&self) -> Result<(), ProvisionError> {
        for d in [
            self.root.join("blobs"),
            self.tmp_dir(),
            self.root.join("locks"),
            self.root.join("manifests"),
        ] {
            std::fs::create_dir_all(&d).map_err(|source| ProvisionError::CacheWrite {
                path: d.clone(),
                source,
            })?;
        }
        // The engines run as another user in the provisioner's group: blobs are theirs to read.
        share_with_group(&self.root.join("blobs"), 0o750)
    }

    /// Stages `source` as `model_id`. With `expected` set, the file must have that sha256;
    /// downloads must be pinned. An existing blob with the expected hash is re-verified and
    /// reused without fetching.
    pub fn stage(
        &self,
        model_id: &str,
        source: &Source,
        expected: Option<&str>,
        progress: &mut dyn Progress,
    ) -> Result<Staged, ProvisionError> {
        if let Some(e) = expected {
            if !is_sha256_hex(e) {
                return Err(ProvisionError::Usage(format!(
                    "sha256 {e:?} is not 64 lowercase hex digits"
                )));
            }
        }
        if !valid_model_id(model_id) {
            return Err(ProvisionError::Usage(format!(
                "model id {model_id:?} is invalid; use 1 to 128 letters, digits, '-', '_', '.' or ':', not starting with '.'"
            )));
        }
        if matches!(source, Source::Http(_)) && expected.is_none() {
            return Err(ProvisionError::Usage(format!(
                "downloads must be pinned: give the sha256 of {source}"
            )));
        }
        if let Source::Http(url) = source {
            if url.starts_with("http://") && !self.downloads.allow_http && !loopback_url(url) {
                return Err(ProvisionError::Usage(format!(
                    "{url} is plain http://: anyone on the path sees which model is fetched and can cut it off; use https://, or allow it with --allow-http (the pool setting model.allow_http = true)"
                )));
            }
        }
        self.mkdirs()?;
        // One provisioner at a time stages a given model (two pools of one model start
        // together): the second waits, then finds the blob staged and only verifies it, instead
        // of copying it a second time beside the first (twice the disk, and a full cache).
        let key = expected.map_or_else(
            || hex::encode(Sha256::digest(source.to_string())),
            str::to_string,
        );
        let _lock = self.lock(&key)?;
        self.sweep_parts();
        if let Some(e) = expected {
            let blob = self.blob_path(e);
            if blob.exists() {
                match self.verify_existing(&blob, e, progress) {
                    Ok(staged) => {
                        share_with_group(&blob, 0o640)?;
                        self.write_manifest(model_id, source, &staged)?;
                        tracing::info!(model = model_id, path = %blob.display(), "Model already staged; verified.");
                        return Ok(staged);
                    }
                    Err(err) => {
                        tracing::warn!(path = %blob.display(), error = %err, "A cached blob failed verification; fetching it again.");
                    }
                }
            }
        }
        let tmp = self.new_temp();
        let mut guard = TempFile {
            path: tmp.clone(),
            keep: false,
        };
        let (sha256, size) = match source {
            Source::File(p) => copy_hashing(p, &tmp, progress)?,
            Source::Http(url) => {
                let limit = self
                    .downloads
                    .max_bytes
                    .or_else(|| free_bytes(&self.root))
                    .unwrap_or(u64::MAX);
                download_hashing(url, &tmp, progress, limit, self.downloads.allow_http)?
            }
        };
        progress.finish();
        if let Some(e) = expected {
            if e != sha256 {
                return Err(ProvisionError::Sha256Mismatch {
                    origin: source.to_string(),
                    expected: e.to_string(),
                    actual: sha256,
                });
            }
        }
        let info = llorch_gguf::inspect(&tmp).map_err(|e| rename_in_error(e, source))?;
        let blob = self.blob_path(&sha256);
        std::fs::rename(&tmp, &blob).map_err(|source| ProvisionError::CacheWrite {
            path: blob.clone(),
            source,
        })?;
        guard.keep = true;
        share_with_group(&blob, 0o640)?;
        let staged = Staged {
            path: blob,
            sha256,
            size_bytes: size,
            info,
            fetched: true,
        };
        self.write_manifest(model_id, source, &staged)?;
        tracing::info!(model = model_id, path = %staged.path.display(), bytes = size, "Model staged.");
        Ok(staged)
    }

    fn verify_existing(
        &self,
        blob: &Path,
        expected: &str,
        progress: &mut dyn Progress,
    ) -> Result<Staged, ProvisionError> {
        let (sha256, size) = hash_file(blob, progress)?;
        progress.finish();
        if sha256 != expected {
            return Err(ProvisionError::Sha256Mismatch {
                origin: blob.display().to_string(),
                expected: expected.into(),
                actual: sha256,
            });
        }
        let info = llorch_gguf::inspect(blob)?;
        Ok(Staged {
            path: blob.to_owned(),
            sha256,
            size_bytes: size,
            info,
            fetched: false,
        })
    }

    /// Holds `locks/<key>.lock` (flock, exclusive) until dropped, waiting for another holder.
    fn lock(&self, key: &str) -> Result<std::fs::File, ProvisionError> {
        use rustix::fs::{flock, FlockOperation};
        let path = self.root.join("locks").join(format!("{key}.lock"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| ProvisionError::CacheWrite {
                path: path.clone(),
                source,
            })?;
        if flock(&file, FlockOperation::NonBlockingLockExclusive).is_err() {
            tracing::info!(lock = %path.display(), "Another provisioner is staging this model; waiting for it.");
            flock(&file, FlockOperation::LockExclusive).map_err(|e| {
                ProvisionError::CacheWrite {
                    path: path.clone(),
                    source: e.into(),
                }
            })?;
        }
        Ok(file)
    }

    /// Removes partial files (`<pid>-<n>.part`) of provisioners that no longer run: one killed
    /// while it copied could not remove its own.
    fn sweep_parts(&self) {
        let Ok(entries) = std::fs::read_dir(self.tmp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".part"))
                .and_then(|n| n.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => {
                        tracing::info!(file = %e.path().display(), "Removed a partial file left by a provisioner that died.")
                    }
                    Err(err) => {
                        tracing::warn!(file = %e.path().display(), error = %err, "Cannot remove a stale partial file.")
                    }
                }
            }
        }
    }

    fn new_temp(&self) -> PathBuf {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir()
            .join(format!("{}-{n}.part", std::process::id()))
    }

    fn write_manifest(
        &self,
        model_id: &str,
        source: &Source,
        staged: &Staged,
    ) -> Result<(), ProvisionError> {
        let manifest = Manifest {
            id: model_id.into(),
            sha256: staged.sha256.clone(),
            source: source.to_string(),
            size_bytes: staged.size_bytes,
        };
        let path = self.manifest_path(model_id);
        llorch_os::fs::write_atomic(
            &path,
            &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"),
        )
        .map_err(|source| ProvisionError::CacheWrite { path, source })
    }
}

/// The header check ran on the temporary file; report the source the operator named.
fn rename_in_error(e: llorch_gguf::GgufError, source: &Source) -> ProvisionError {
    use llorch_gguf::GgufError as G;
    let path = PathBuf::from(source.to_string());
    ProvisionError::Gguf(match e {
        G::NotGguf { magic, .. } => G::NotGguf { path, magic },
        G::Truncated { needed, actual, .. } => G::Truncated {
            path,
            needed,
            actual,
        },
        G::Malformed { reason, .. } => G::Malformed { path, reason },
        G::UnsupportedVersion { version, .. } => G::UnsupportedVersion { path, version },
        other => other,
    })
}

fn hash_file(path: &Path, progress: &mut dyn Progress) -> Result<(String, u64), ProvisionError> {
    let io = |source| ProvisionError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let total = f.metadata().map_err(io)?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress.update(done, Some(total));
    }
    Ok((hex::encode(hasher.finalize()), done))
}

/// Gives `path` the mode `mode`: the engines (another user, the provisioner's group) read the
/// blobs and traverse their folder, whatever the umask or the source file's mode, also for
/// blobs staged before the engines had a user of their own.
fn share_with_group(path: &Path, mode: u32) -> Result<(), ProvisionError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        ProvisionError::CacheWrite {
            path: path.to_owned(),
            source,
        }
    })
}

fn copy_hashing(
    src: &Path,
    dst: &Path,
    progress: &mut dyn Progress,
) -> Result<(String, u64), ProvisionError> {
    let mut input = File::open(src).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ProvisionError::SourceMissing(src.to_owned()),
        _ => ProvisionError::Io {
            path: src.to_owned(),
            source,
        },
    })?;
    let total = input.metadata().ok().map(|m| m.len());
    pump(&mut input, dst, total, progress, |source| {
        ProvisionError::Io {
            path: src.to_owned(),
            source,
        }
    })
}

/// Downloads `url` into `dst`, hashing as it goes; at most `limit` bytes (a larger announced
/// length is refused before any byte is written, a longer body when it passes the limit).
fn download_hashing(
    url: &str,
    dst: &Path,
    progress: &mut dyn Progress,
    limit: u64,
    allow_http: bool,
) -> Result<(String, u64), ProvisionError> {
    let fail = |reason: String| ProvisionError::Download {
        url: url.to_string(),
        reason,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        // A large model takes as long as it takes: the body has no total bound, only the
        // stall bound below (no byte for that long ends the download).
        .timeout_recv_body(None)
        .timeout_recv_response(Some(Duration::from_secs(60)))
        // An https:// source is not redirected to plain http://, nor a loopback http://
        // source to another host, unless plain http is allowed.
        .https_only(url.starts_with("https://") && !allow_http)
        .max_redirects(if url.starts_with("http://") && !allow_http {
            0
        } else {
            10
        })
        .build()
        .into();
    let resp = agent.get(url).call().map_err(|e| fail(e.to_string()))?;
    let total = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(t) = total.filter(|t| *t > limit) {
        return Err(fail(format!(
            "it is {t} bytes, more than the {limit} allowed (--max-download-bytes, else the cache's free space)"
        )));
    }
    let body = resp.into_body().into_with_config().limit(limit).reader();
    let mut reader = StallReader::new(body, stall_timeout());
    let (sha, size) = pump(&mut reader, dst, total, progress, |e| fail(e.to_string()))?;
    if let Some(t) = total {
        if size != t {
            return Err(fail(format!(
                "the transfer ended after {size} of {t} bytes"
            )));
        }
    }
    Ok((sha, size))
}

/// Copies `input` to a new file at `dst`, hashing as it goes.
fn pump(
    input: &mut dyn Read,
    dst: &Path,
    total: Option<u64>,
    progress: &mut dyn Progress,
    read_err: impl Fn(std::io::Error) -> ProvisionError,
) -> Result<(String, u64), ProvisionError> {
    let write_err = |source| ProvisionError::CacheWrite {
        path: dst.to_owned(),
        source,
    };
    let mut out = File::create(dst).map_err(write_err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(read_err(e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(write_err)?;
        done += n as u64;
        progress.update(done, total);
    }
    out.sync_all().map_err(write_err)?;
    Ok((hex::encode(hasher.finalize()), done))
}

/// How long a download may receive nothing before it fails: `LLORCH_DOWNLOAD_STALL_SECS`
/// (1 to 3600), default 60. A stalled server or a dead route must not hang a pool forever;
/// a slow one that keeps sending is never cut off.
pub fn stall_timeout() -> Duration {
    std::env::var("LLORCH_DOWNLOAD_STALL_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| (1..=3600).contains(s))
        .map_or(DEFAULT_STALL, Duration::from_secs)
}

/// The default of [`stall_timeout`].
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);

/// A reader that fails with `TimedOut` when its source gives no byte for `stall`. The source
/// is read on a thread of its own (a blocking socket read cannot be interrupted); on a stall
/// that thread is left blocked, and ends with the process.
struct StallReader {
    chunks: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
    stall: Duration,
}

impl StallReader {
    fn new(mut source: impl Read + Send + 'static, stall: Duration) -> Self {
        let (tx, chunks) = std::sync::mpsc::sync_channel(4);
        std::thread::spawn(move || loop {
            let mut buf = vec![0u8; CHUNK];
            let sent = match source.read(&mut buf) {
                Ok(0) => tx.send(Ok(Vec::new())),
                Ok(n) => {
                    buf.truncate(n);
                    tx.send(Ok(buf))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => tx.send(Err(e)),
            };
            if sent.is_err() {
                return;
            }
        });
        Self {
            chunks,
            current: Vec::new(),
            at: 0,
            stall,
        }
    }
}

impl Read for StallReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.current.len() {
            match self.chunks.recv_timeout(self.stall) {
                Ok(Ok(chunk)) if chunk.is_empty() => return Ok(0),
                Ok(Ok(chunk)) => {
                    self.current = chunk;
                    self.at = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no data for {} s (the server stalled; LLORCH_DOWNLOAD_STALL_SECS sets the bound)",
                            self.stall.as_secs()
                        ),
                    ))
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len() - self.at);
        out[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A small valid GGUF file, `m.gguf` in `dir`.
    fn test_model(dir: &Path) -> PathBuf {
        let src = dir.join("m.gguf");
        llorch_gguf::write::TestModel::default()
            .write(&src)
            .unwrap();
        src
    }

    #[test]
    fn one_model_staged_by_two_at_once_is_copied_once_and_dead_parts_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let src = test_model(dir.path());
        let sha = hex::encode(Sha256::digest(std::fs::read(&src).unwrap()));
        let cache = Cache::new(dir.path().join("cache"));
        cache.mkdirs().unwrap();
        // A partial file of a provisioner that died (no such pid: above any pid_max).
        let dead = cache.tmp_dir().join("4194305-0.part");
        std::fs::write(&dead, b"half a model").unwrap();
        let fetched: Vec<bool> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        cache
                            .stage(
                                "m",
                                &Source::File(src.clone()),
                                Some(&sha),
                                &mut crate::NoProgress,
                            )
                            .unwrap()
                            .fetched
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(fetched.iter().filter(|f| **f).count(), 1, "{fetched:?}");
        assert!(!dead.exists(), "the dead provisioner's part is gone");
        assert_eq!(std::fs::read_dir(cache.tmp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn staged_blobs_are_readable_by_the_engines_group_whatever_the_source_mode() {
        let dir = tempfile::tempdir().unwrap();
        let src = test_model(dir.path());
        std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cache = Cache::new(dir.path().join("cache"));
        let staged = cache
            .stage(
                "m",
                &Source::File(src.clone()),
                None,
                &mut crate::NoProgress,
            )
            .unwrap();
        assert_eq!(mode(&staged.path), 0o640);
        assert_eq!(mode(&dir.path().join("cache/blobs")), 0o750);
        // A blob staged before (0600, as the old umask left it) is opened up when verified.
        std::fs::set_permissions(&staged.path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let again = cache
            .stage(
                "m",
                &Source::File(src),
                Some(&staged.sha256),
                &mut crate::NoProgress,
            )
            .unwrap();
        assert_eq!(again.path, staged.path);
        assert_eq!(mode(&again.path), 0o640);
    }
}
