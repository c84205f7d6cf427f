//! Nix for the offline checks of `nix/` (tests/nix.rs, tests/cloud.rs): Debian's `nix-bin`
//! (Nix 2.8, installed by `scripts/setup.sh`) evaluating with nixpkgs' `lib/` from
//! `../shared/vendor` (or `$LLORCH_NIXPKGS_LIB`, a tarball or an unpacked `lib/`). There is no
//! nixpkgs here: `nix/tests/offline/` declares the NixOS options the module sets and stands in
//! for the packages.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The vendored lib's tarball and its top folder.
const LIB_TARBALL: &str = "nixpkgs-lib-656a641.tar.gz";
const LIB_TOP: &str = "nixpkgs-lib-656a641";

pub struct Nix {
    /// nixpkgs' `lib/`, unpacked.
    pub lib: PathBuf,
}

/// Nix and the vendored lib, or why not (print it as the reason a test skips).
pub fn nix() -> Result<&'static Nix, String> {
    static NIX: OnceLock<Result<Nix, String>> = OnceLock::new();
    NIX.get_or_init(|| {
        let version = Command::new("nix-instantiate").arg("--version").output();
        if !version.map(|o| o.status.success()).unwrap_or(false) {
            return Err("nix-instantiate is not installed (scripts/setup.sh installs nix-bin)".into());
        }
        let source = std::env::var_os("LLORCH_NIXPKGS_LIB")
            .map(PathBuf::from)
            .or_else(|| Some(crate::repo_root().parent()?.join("shared/vendor").join(LIB_TARBALL)))
            .filter(|p| p.exists())
            .ok_or_else(|| {
                format!("nixpkgs' lib is not at ../shared/vendor/{LIB_TARBALL} (set LLORCH_NIXPKGS_LIB)")
            })?;
        if source.is_dir() {
            return Ok(Nix { lib: source });
        }
        // Unpacked once into the cache, outside the repository (`deadnix .` and
        // `nixpkgs-fmt .` there see only our files), whole or not at all (test binaries run in
        // parallel).
        let cache = crate::cache_dir();
        let into = cache.join(LIB_TOP);
        if !into.join("lib/default.nix").exists() {
            std::fs::create_dir_all(&cache).map_err(|e| format!("{}: {e}", cache.display()))?;
            let tmp = tempfile::Builder::new()
                .prefix(".nixpkgs-lib-")
                .tempdir_in(&cache)
                .map_err(|e| e.to_string())?;
            let out = Command::new("tar")
                .arg("xzf")
                .arg(&source)
                .arg("-C")
                .arg(tmp.path())
                .output()
                .map_err(|e| format!("tar: {e}"))?;
            if !out.status.success() {
                return Err(format!("cannot unpack {}: {}", source.display(), text(&out)));
            }
            let _ = std::fs::rename(tmp.path().join(LIB_TOP), &into);
        }
        Ok(Nix { lib: into.join("lib") })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// stdout and stderr of a finished command, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Nix {
    /// `nix-instantiate --eval --strict --json FILE` with `lib` and the given `--arg`s (Nix
    /// expressions), in the repository root; Err(stderr) when evaluation fails. The dummy
    /// store: evaluation writes nothing and needs no privileges.
    pub fn eval(&self, file: &str, args: &[(&str, &str)]) -> Result<Value, String> {
        let mut c = Command::new("nix-instantiate");
        c.current_dir(crate::repo_root())
            .args(["--store", "dummy://", "--eval", "--strict", "--json", file])
            .arg("--arg")
            .arg("lib")
            .arg(format!("import {}", self.lib.display()));
        for (k, v) in args {
            c.arg("--arg").arg(k).arg(v);
        }
        let out = c.output().map_err(|e| format!("nix-instantiate: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", text(&out)))
    }

    /// What the hosts of nix/examples/cloud.nix get on disk, through the cluster library and
    /// the module: host name -> `{ files, start, firewall, users, groups }`.
    pub fn cloud_hosts(&self) -> Value {
        self.eval("nix/tests/offline/cluster-eval.nix", &[])
            .unwrap_or_else(|e| panic!("nix/examples/cloud.nix does not evaluate:\n{e}"))
    }
}

/// One host's rendered files, as a NixOS activation would place them: `(absolute path, Some(text))`
/// for a file, `(path, None)` for a mask (a link to /dev/null).
pub fn files(host: &Value) -> Vec<(String, Option<String>)> {
    host["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().expect("path").to_owned(),
                f["text"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// The units a host enables (their `wantedBy`), which boot would start.
pub fn start_units(host: &Value) -> Vec<String> {
    host["start"]
        .as_array()
        .expect("start")
        .iter()
        .map(|u| u.as_str().expect("unit").to_owned())
        .collect()
}

/// A rendered drop-in's `Key=value` lines for one key, in order.
pub fn values(text: &str, key: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .collect()
}

/// Write a host's files under `root` (its `/`), masks as links to /dev/null.
pub fn write_files(root: &Path, host: &Value) {
    for (path, text) in files(host) {
        let to = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
        match text {
            Some(t) => std::fs::write(&to, t).expect("write"),
            None => std::os::unix::fs::symlink("/dev/null", &to).expect("symlink"),
        }
    }
}
