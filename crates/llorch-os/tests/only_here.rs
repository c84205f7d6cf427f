//! What llorch-os's documentation promises: no other crate of the daemons and the CLI has an
//! `unsafe` block, reads the service manager's variables or calls `libc::kill`, `dup2` or
//! `prctl` itself. Tests may signal their own children.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn os_plumbing_lives_in_llorch_os_only() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    for e in std::fs::read_dir(crates).unwrap().flatten() {
        let src = e.path().join("src");
        if e.file_name() != "llorch-os" && src.is_dir() {
            sources(&src, &mut files);
        }
    }
    assert!(files.len() > 20, "{} source files", files.len());
    let banned = [
        "unsafe {",
        "unsafe impl",
        "libc::kill",
        "libc::dup2",
        "libc::prctl",
        "pre_exec",
        "\"LISTEN_FDS\"",
        "\"NOTIFY_SOCKET\"",
    ];
    let mut found = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for b in banned {
                if line.contains(b) {
                    found.push(format!("{}:{}: {b}", f.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "OS plumbing outside llorch-os:\n{}",
        found.join("\n")
    );
}
