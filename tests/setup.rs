//! `scripts/setup.sh` on a machine where nothing is installed: the appliance tests' minimal
//! Debian root filesystem (debootstrap, cached), run in a throwaway overlay with
//! `systemd-nspawn --volatile=overlay` (no boot). `--check` must name every package the build
//! and the tests need that the root lacks (asked of that root's dpkg), also after
//! `libclang-cpp` alone was installed there (the trap that once made setup skip libclang-dev);
//! a user who cannot install is told so in one line, before anything is built. On this
//! machine, after `make test`'s setup, nothing is missing and bindgen's libclang is there.
//!
//! Needs root or passwordless sudo (systemd-nspawn, debootstrap); without either the nspawn
//! tests say they were skipped and why.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use llorch_tests::rootfs::{privileged, rootfs, try_root_prefix};
use llorch_tests::{cache_dir, repo_root};

/// Every Debian package the build and `make test` need (scripts/setup.sh's list).
const REQUIRED: [&str; 16] = [
    "cmake",
    "libclang-dev",
    "g++",
    "make",
    "python3-pip",
    "curl",
    "systemd",
    "prometheus",
    "systemd-container",
    "debootstrap",
    "iproute2",
    "dbus-daemon",
    "nix-bin",
    "lintian",
    "help2man",
    "chromium-driver",
];

/// Root privileges and the cached root filesystem, made once per test binary; None where this
/// machine cannot run containers, after the calling test was counted as skipped.
fn bare_root() -> Option<&'static (Vec<String>, PathBuf)> {
    static ROOT: OnceLock<Option<(Vec<String>, PathBuf)>> = OnceLock::new();
    let root = ROOT
        .get_or_init(|| {
            let prefix = try_root_prefix()?;
            let root = rootfs(&prefix);
            Some((prefix, root))
        })
        .as_ref();
    if root.is_none() {
        llorch_tests::skip(
            "the setup tests run setup.sh in a systemd-nspawn container, which needs root or passwordless sudo",
        );
    }
    root
}

/// Runs `script` with bash in a throwaway overlay of `root`, with scripts/ at /mnt/scripts and
/// `extra` (host folder, container folder) pairs bound read-only.
fn run_in(prefix: &[String], root: &Path, extra: &[(&Path, &str)], script: &str) -> Output {
    // Each container its own machine name: nspawn keeps per-machine state under /run named
    // after it (by default the folder's name), and the tests of this file run at once.
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut cmd = privileged(prefix, "systemd-nspawn");
    cmd.args([
        "--register=no",
        "--keep-unit",
        "--volatile=overlay",
        "--quiet",
    ])
    .arg(format!("--machine=llorch-setup-{}-{n}", std::process::id()))
    .arg("-D")
    .arg(root)
    .arg(format!(
        "--bind-ro={}:/mnt/scripts",
        repo_root().join("scripts").display()
    ))
    .args([
        "--setenv=HOME=/root",
        "--setenv=LLORCH_CACHE=/root/.cache/llama-orch",
    ]);
    for (host, inside) in extra {
        cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
    }
    let out = cmd
        .args(["/bin/bash", "-c", script])
        .output()
        .expect("systemd-nspawn is missing: install systemd-container (scripts/setup.sh does)");
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("Failed to"),
        "systemd-nspawn failed:\n{}",
        text(&out)
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The packages named on --check's `missing packages:` line.
fn named(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("missing packages:"))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether `root`'s own package database has `pkg` installed.
fn installed_in(prefix: &[String], root: &Path, pkg: &str) -> bool {
    let out = privileged(prefix, "dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .expect("dpkg-query");
    String::from_utf8_lossy(&out.stdout).ends_with(" installed")
}

/// The exit status the script printed as its last line (`exit=N`).
fn exit_of(out: &Output) -> i32 {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("exit="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit= line:\n{}", text(out)))
}

/// --check names exactly the required packages this root lacks.
fn assert_names_what_is_missing(prefix: &[String], root: &Path, out: &Output) {
    assert_eq!(exit_of(out), 3, "--check exits 3 when something is missing");
    let named = named(out);
    for pkg in REQUIRED {
        let missing = !installed_in(prefix, root, pkg);
        assert_eq!(
            named.iter().any(|n| n == pkg),
            missing,
            "{pkg} is {} in the bare root, so --check must {}name it:\n{}",
            if missing { "missing" } else { "installed" },
            if missing { "" } else { "not " },
            text(out)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("missing model:"), "{}", text(out));
    assert!(
        stdout.contains("missing python: openai==") && stdout.contains("anthropic=="),
        "{}",
        text(out)
    );
    assert!(
        stdout.contains("missing nix tools: deadnix@"),
        "{}",
        text(out)
    );
}

#[test]
fn check_names_every_package_a_bare_debian_lacks() {
    let Some((prefix, root)) = bare_root() else {
        return;
    };
    let out = run_in(
        prefix,
        root,
        &[],
        "bash /mnt/scripts/setup.sh --check; echo exit=$?",
    );
    assert_names_what_is_missing(prefix, root, &out);
    // A minbase root has none of the build's packages: these at least must be named.
    let named = named(&out);
    for pkg in [
        "cmake",
        "libclang-dev",
        "g++",
        "make",
        "python3-pip",
        "prometheus",
        "systemd-container",
        "debootstrap",
    ] {
        assert!(named.iter().any(|n| n == pkg), "{pkg}:\n{}", text(&out));
    }
    // --check changed nothing: no model folder, no cache.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("installing"));
}

/// The libclang-cpp package of the release's default LLVM (libclang-cpp14 on Debian 12), as
/// a .deb in the cache: `apt-cache depends libclang-dev` names `libclang-<N>-dev`.
fn libclang_cpp_deb(prefix: &[String]) -> PathBuf {
    let depends = Command::new("apt-cache")
        .args(["depends", "libclang-dev"])
        .output()
        .expect("apt-cache");
    let depends = String::from_utf8_lossy(&depends.stdout);
    let version = depends
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Depends: libclang-")?
                .strip_suffix("-dev")
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            panic!("no libclang-<N>-dev in `apt-cache depends libclang-dev`:\n{depends}")
        });
    let pkg = format!("libclang-cpp{version}");
    let dir = cache_dir().join("appliance/debs");
    std::fs::create_dir_all(&dir).unwrap();
    let find = || {
        std::fs::read_dir(&dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with(&format!("{pkg}_")) && name.ends_with(".deb")).then(|| e.path())
        })
    };
    if let Some(deb) = find() {
        return deb;
    }
    let download = || {
        privileged(prefix, "apt-get")
            // Into the cache as root: apt's sandbox user could not write there.
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root", &pkg])
            .current_dir(&dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        // The package lists may be missing or stale on a machine that installed nothing.
        let _ = privileged(prefix, "apt-get")
            .args(["update", "-qq"])
            .status();
        assert!(download(), "apt-get download {pkg} failed");
    }
    find().unwrap_or_else(|| panic!("apt-get download {pkg} left no .deb in {}", dir.display()))
}

#[test]
fn libclang_cpp_alone_does_not_pass_for_libclang() {
    let Some((prefix, root)) = bare_root() else {
        return;
    };
    let deb = libclang_cpp_deb(prefix);
    let debs = deb.parent().unwrap();
    // dpkg without its dependencies: what matters is that the package and its
    // libclang-cpp.so.<N> are there, as on the image where the trap was found.
    let out = run_in(
        prefix,
        root,
        &[(debs, "/mnt/debs")],
        &format!(
            "dpkg --force-depends -i /mnt/debs/{} >/dev/null 2>&1; \
             echo glob: $(ls /usr/lib/llvm-*/lib/libclang*.so* 2>/dev/null); \
             bash /mnt/scripts/setup.sh --check; echo exit=$?",
            deb.file_name().unwrap().to_string_lossy()
        ),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let glob = stdout
        .lines()
        .find(|l| l.starts_with("glob:"))
        .unwrap_or("");
    assert!(
        glob.contains("libclang-cpp.so"),
        "the trap is set: the old glob matches libclang-cpp's library:\n{}",
        text(&out)
    );
    assert_names_what_is_missing(prefix, root, &out);
    assert!(
        named(&out).iter().any(|n| n == "libclang-dev"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_user_who_cannot_install_is_told_in_one_line_before_any_build() {
    let Some((prefix, root)) = bare_root() else {
        return;
    };
    // Not root, and no sudo in a minbase root. The script's stderr goes through a file: nspawn
    // itself may write to stderr as the container ends.
    let out = run_in(
        prefix,
        root,
        &[],
        "setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/tmp LLORCH_CACHE=/tmp/cache \
         bash /mnt/scripts/setup.sh >/tmp/out 2>/tmp/err; echo exit=$?; \
         echo cache: $(ls /tmp/cache 2>/dev/null | wc -l); echo stdout: $(wc -c </tmp/out); cat /tmp/err",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let exit = lines.next().and_then(|l| l.strip_prefix("exit="));
    assert_eq!(exit, Some("4"), "{}", text(&out));
    assert_eq!(
        lines.next(),
        Some("cache: 0"),
        "nothing fetched:\n{}",
        text(&out)
    );
    assert_eq!(lines.next(), Some("stdout: 0"), "{}", text(&out));
    let said: Vec<&str> = lines.filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(said.len(), 1, "one line:\n{}", text(&out));
    for needle in ["cmake", "libclang-dev", "apt-get install"] {
        assert!(said[0].contains(needle), "{needle}: {}", said[0]);
    }
}

#[test]
fn this_machine_is_set_up_and_bindgen_finds_libclang() {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/setup.sh"))
        .arg("--check")
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "scripts/setup.sh --check finds something missing on this machine; run scripts/setup.sh (make test does):\n{}",
        text(&out)
    );
    // bindgen (clang-sys) loads libclang.so, libclang-<N>.so or their versioned files
    // (libclang-14.so.13 on Debian 12), never libclang-cpp.
    let ldconfig = Command::new("ldconfig")
        .arg("-p")
        .output()
        .expect("ldconfig");
    let libs = String::from_utf8_lossy(&ldconfig.stdout);
    assert!(
        libs.lines().any(|l| {
            let name = l.split_whitespace().next().unwrap_or("");
            (name.starts_with("libclang.so") || name.starts_with("libclang-"))
                && !name.starts_with("libclang-cpp")
        }),
        "no libclang for bindgen in `ldconfig -p`:\n{libs}"
    );
    let bad = Command::new("bash")
        .arg(repo_root().join("scripts/setup.sh"))
        .arg("--no-such-flag")
        .output()
        .expect("bash");
    assert_eq!(bad.status.code(), Some(64), "{}", text(&bad));
}

/// The packages in scripts/setup.sh's list, in order.
fn setup_packages() -> Vec<String> {
    let script = std::fs::read_to_string(repo_root().join("scripts/setup.sh")).unwrap();
    let list = script
        .split_once("PACKAGES=(")
        .and_then(|(_, rest)| rest.split_once("\n)"))
        .map(|(list, _)| list)
        .expect("a PACKAGES=( ... ) list in scripts/setup.sh");
    list.lines()
        .filter_map(|l| l.trim().strip_prefix('"')?.split_once('|'))
        .map(|(pkg, _)| pkg.to_string())
        .collect()
}

#[test]
fn the_script_this_test_and_the_readme_list_the_same_packages() {
    assert_eq!(setup_packages(), REQUIRED, "scripts/setup.sh's PACKAGES");
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    for pkg in REQUIRED {
        assert!(
            readme.contains(&format!("`{pkg}`")),
            "README.md does not say that setup installs `{pkg}`"
        );
    }
}
