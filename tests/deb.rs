//! The Debian package (`make deb`, `scripts/build-deb.sh`): built here from this checkout's
//! binaries, it holds what the appliance needs where Debian wants it, declares its one
//! conffile and its licences, and Debian's checker (lintian) reports no error. The appliance
//! and fault tests install this package with `dpkg -i` and boot it; the fault test also
//! removes and purges it.

use std::process::Command;

use llorch_tests::appliance::build_deb;
use llorch_tests::serial;

fn dpkg_deb(args: &[&str], deb: &std::path::Path) -> String {
    let out = Command::new("dpkg-deb")
        .args(args)
        .arg(deb)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_package_holds_the_appliance_and_lintian_finds_no_error() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("llama-orch.deb");
    build_deb(&deb);

    let files = dpkg_deb(&["-c"], &deb);
    for path in [
        "./usr/bin/orchestratord",
        "./usr/bin/pool-managerd",
        "./usr/bin/llorch-engine",
        "./usr/bin/engine-provisioner",
        "./usr/bin/llorch",
        "./usr/lib/systemd/system-generators/llama-orch-gpu-generator",
        "./usr/lib/systemd/system/orchestratord.socket",
        "./usr/lib/systemd/system/llorch-engine@.service",
        "./usr/lib/systemd/system/llama-orch.target",
        "./usr/lib/sysusers.d/llama-orch.conf",
        "./usr/lib/tmpfiles.d/llama-orch.conf",
        "./usr/share/dbus-1/system.d/org.llamaorch.conf",
        "./usr/share/polkit-1/actions/org.llamaorch.policy",
        "./usr/share/polkit-1/rules.d/50-llama-orch.rules",
        "./etc/llama-orch/node.toml",
        "./usr/share/doc/llama-orch/copyright",
        "./usr/share/doc/llama-orch/THIRD-PARTY",
        "./usr/share/man/man8/orchestratord.8.gz",
        "./usr/share/man/man8/pool-managerd.8.gz",
        "./usr/share/man/man8/llorch-engine.8.gz",
        "./usr/share/man/man8/engine-provisioner.8.gz",
        "./usr/share/man/man1/llorch.1.gz",
    ] {
        assert!(
            files.lines().any(|l| l.ends_with(path)),
            "{path} is not in the package:\n{files}"
        );
    }
    // Every unit of systemd/ is shipped.
    for unit in std::fs::read_dir(llorch_tests::repo_root().join("systemd")).unwrap() {
        let name = unit.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".service") || name.ends_with(".socket") || name.ends_with(".target") {
            let path = format!("./usr/lib/systemd/system/{name}");
            assert!(files.lines().any(|l| l.ends_with(&path)), "{path}");
        }
    }
    let conffiles = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dpkg-deb --ctrl-tarfile {} | tar -xO ./conffiles",
            deb.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout),
        "/etc/llama-orch/node.toml\n"
    );
    let control = dpkg_deb(&["-f"], &deb);
    assert!(control.contains("Depends: libc6"), "{control}");
    // The licences: llama-orch's, llama.cpp's MIT notice in full, and the crates.
    let doc = |file: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "dpkg-deb --fsys-tarfile {} | tar -xO ./usr/share/doc/llama-orch/{file}",
                deb.display()
            ))
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    let copyright = doc("copyright");
    assert!(copyright.contains("License: Apache-2.0"), "{copyright}");
    assert!(
        copyright.contains("Permission is hereby granted"),
        "{copyright}"
    );
    let third = doc("THIRD-PARTY");
    assert!(third.lines().any(|l| l.starts_with("tokio ")), "{third}");
    assert!(
        third.lines().any(|l| l.starts_with("llama-cpp-sys-2 ")),
        "{third}"
    );

    let Ok(out) = Command::new("lintian")
        .args(["--fail-on", "error", "--no-tag-display-limit"])
        .arg(&deb)
        .output()
    else {
        llorch_tests::skip("lintian is not installed (scripts/setup.sh installs it)");
        return;
    };
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !said.lines().any(|l| l.starts_with("E:")),
        "lintian:\n{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every program has its manual page, and each page is well formed.
    for tag in [
        "no-manual-page",
        "manpage-has-errors-from-man",
        "manpage-has-bad-whatis-entry",
    ] {
        assert!(!said.contains(tag), "lintian: {tag}\n{said}");
    }
    eprintln!("deb: lintian says\n{said}");
}
