//! The flake, the NixOS module and the cluster library (nix/), checked offline: every file
//! parses and is formatted without dead code; the module evaluates with nixpkgs' lib against
//! stand-ins of the NixOS options it sets (nix/tests/offline/), refuses bad settings with the
//! message a NixOS user would read, and renders node.toml and drop-ins that the daemons' own
//! `--check-config` accepts; the cluster library's tests pass; and the flake's outputs
//! evaluate (`nix flake check --no-build`) against a stand-in nixpkgs that passes the real lib
//! through. tests/cloud.rs boots the cloud example's hosts with the rendered files.
//!
//! Not proved here (no nixpkgs, no KVM on these machines): that nixpkgs' real functions accept
//! the package's arguments, that the build succeeds, and the VM tests in nix/tests/. They run
//! on a machine with nixpkgs: `nix flake check` (docs/NIXOS.md).

use llorch_tests::nix::{files, nix, start_units, text, values, write_files, Nix};
use llorch_tests::pki::Ca;
use llorch_tests::{bin, model_path, repo_root};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn nix_or_skip() -> Option<&'static Nix> {
    match nix() {
        Ok(n) => Some(n),
        Err(why) => {
            llorch_tests::skip(why);
            None
        }
    }
}

/// Every `.nix` file of the repository.
fn nix_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "nix") {
                out.push(p);
            }
        }
    }
    let mut out = vec![repo_root().join("flake.nix")];
    walk(&repo_root().join("nix"), &mut out);
    out.sort();
    assert!(out.len() > 10, "{out:?}");
    out
}

/// A tool installed by scripts/setup.sh into the cache (cargo install), or on PATH.
fn tool(name: &str) -> Option<PathBuf> {
    let cached = llorch_tests::cache_dir().join("nix-tools/bin");
    std::iter::once(cached)
        .chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[test]
fn every_nix_file_parses() {
    if nix_or_skip().is_none() {
        return;
    }
    for f in nix_files() {
        let out = Command::new("nix-instantiate")
            .args(["--store", "dummy://", "--parse"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", f.display(), text(&out));
    }
}

#[test]
fn nix_files_are_formatted_and_have_no_dead_code() {
    let files = nix_files();
    for (name, args) in [
        ("deadnix", &["--fail"][..]),
        ("nixpkgs-fmt", &["--check"][..]),
    ] {
        let Some(t) = tool(name) else {
            llorch_tests::skip(format!(
                "{name} is not installed (scripts/setup.sh installs it with cargo)"
            ));
            continue;
        };
        let out = Command::new(t).args(args).args(&files).output().unwrap();
        assert!(
            out.status.success(),
            "{name} {args:?} found something (run `{name}` on the files to see or fix it):\n{}",
            text(&out)
        );
    }
}

#[test]
fn cluster_library_tests_pass() {
    let Some(n) = nix_or_skip() else { return };
    let failures = n
        .eval("nix/tests/offline/cluster-tests.nix", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(failures, Value::Array(vec![]), "lib.runTests failures");
}

/// What a GPU host sets for the NVIDIA driver (the module asserts it when a pool has GPUs).
const NVIDIA_DRIVER: &str =
    "hardware.graphics.enable = true; services.xserver.videoDrivers = [ \"nvidia\" ];";

/// The module with the home example and `extra` (a Nix module expression) on top.
fn home_with(n: &Nix, extra: &str, cuda: bool) -> Result<Value, String> {
    let modules = format!("[ ./nix/examples/home.nix ({extra}) ]");
    n.eval(
        "nix/tests/offline/eval.nix",
        &[
            ("modules", &modules),
            ("cudaPackage", if cuda { "true" } else { "false" }),
        ],
    )
}

fn file<'a>(host: &'a Value, path: &str) -> &'a str {
    host["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == path)
        .and_then(|f| f["text"].as_str())
        .unwrap_or_else(|| panic!("no {path} in {host:#}"))
}

#[test]
fn module_refuses_bad_settings_with_the_message_a_user_reads() {
    let Some(n) = nix_or_skip() else { return };
    let cases: &[(&str, &str)] = &[
        // Types and names, as NixOS reports them.
        (
            "{ services.llama-orch.pools.default.slots = 300; }",
            "services.llama-orch.pools.default.slots' is not of type `integer between 1 and 64",
        ),
        (
            "{ services.llama-orch.pools.default.slot = 3; }",
            "The option `services.llama-orch.pools.default.slot' does not exist",
        ),
        (
            "{ services.llama-orch.role = \"gpu\"; }",
            "services.llama-orch.role' is not of type `one of \"home\", \"control-plane\", \"worker\"'",
        ),
        (
            "{ services.llama-orch.pools.default.model.sha256 = \"ABC\"; }",
            "services.llama-orch.pools.default.model.sha256' is not of type",
        ),
        // Assertions of the module.
        (
            "{ services.llama-orch.api.address = \"0.0.0.0\"; }",
            "services.llama-orch.api.address 0.0.0.0 is not loopback: set services.llama-orch.api.apiKeysFile",
        ),
        (
            "{ services.llama-orch.api = { address = \"0.0.0.0\"; apiKeysFile = \"/k\"; }; }",
            "set api.tls.certFile and api.tls.keyFile (or api.allowPlaintext = true",
        ),
        (
            "{ services.llama-orch.api.tls.certFile = \"/c\"; }",
            "services.llama-orch.api.tls: set both certFile and keyFile, or neither",
        ),
        (
            "{ services.llama-orch.pools.default.keepAliveSecs = 30; }",
            "services.llama-orch.pools.default.keepAliveSecs is set but onDemand is false",
        ),
        (
            "{ services.llama-orch.pools.default.pinned = true; }",
            "services.llama-orch.pools.default.pinned is set but onDemand is false",
        ),
        (
            "{ services.llama-orch.node.maxLoaded = 0; }",
            "services.llama-orch.node.maxLoaded' is not of type",
        ),
        (
            "{ lib, ... }: { services.llama-orch.pools.default.model = { source = lib.mkForce \"https://example.org/m.gguf\"; sha256 = lib.mkForce null; }; }",
            "services.llama-orch.pools.default.model: a URL source (https://example.org/m.gguf) needs model.sha256",
        ),
        (
            "{ services.llama-orch.pools.default.gpus = [ 0 ]; }",
            "services.llama-orch.pools.default.gpus is set but services.llama-orch.package is a CPU build",
        ),
        (
            "{ services.llama-orch.pools.default.gpuOnly = true; }",
            "services.llama-orch.pools.default.gpuOnly is for GPU pools",
        ),
        (
            "{ services.llama-orch.pools.default.gpus = [ \"GPU-1234\" ]; }",
            "services.llama-orch.pools.default.gpus.\"[definition 1-entry 1]\"' is not of type `unsigned integer, meaning >=0, or string matching the pattern GPU-",
        ),
        (
            "{ services.llama-orch.pools.\"a b\" = { model = { id = \"m\"; source = \"/m\"; }; }; }",
            "services.llama-orch.pools.\"a b\": a pool id is 1 to 64 of A-Za-z0-9_.-",
        ),
        (
            "{ lib, ... }: { services.llama-orch.role = lib.mkForce \"control-plane\"; }",
            "services.llama-orch.pools is set on a control-plane host",
        ),
        (
            "{ lib, ... }: { services.llama-orch = { role = lib.mkForce \"control-plane\"; pools = lib.mkForce { }; api.nodeTokensFile = \"/run/t\"; settings.node.launcher = \"process\"; }; }",
            "services.llama-orch.settings is for node.toml, which a control-plane host does not have",
        ),
        (
            "{ lib, ... }: { services.llama-orch.role = lib.mkForce \"worker\"; }",
            "services.llama-orch.node.controlPlane is required on a worker",
        ),
        (
            "{ lib, ... }: { services.llama-orch = { role = lib.mkForce \"worker\"; node = { controlPlane = \"http://10.0.0.1:8443\"; tokenFile = \"/t\"; address = \"10.0.0.2\"; tls = { certFile = \"/c\"; keyFile = \"/k\"; }; }; }; }",
            "services.llama-orch.node.controlPlane http://10.0.0.1:8443 is plain HTTP to another host",
        ),
    ];
    for (module, message) in cases {
        match home_with(n, module, false) {
            Ok(v) => panic!("{module} was accepted: {v:#}"),
            Err(e) => assert!(
                e.contains(message),
                "{module}: the error does not say {message:?}:\n{e}"
            ),
        }
    }
}

#[test]
fn module_renders_gpu_devices_fetched_models_and_on_demand_pools() {
    let Some(n) = nix_or_skip() else { return };
    let host = home_with(
        n,
        r#"{ lib, ... }: {
          hardware.graphics.enable = true;
          services.xserver.videoDrivers = [ "nvidia" ];
          services.llama-orch.pools.default = { gpus = [ 1 ]; onDemand = true; keepAliveSecs = 60; };
          services.llama-orch.pools.fetched = {
            model = { id = "m"; source = { url = "https://example.org/m.gguf";
              sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"; }; };
          };
        }"#,
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let engine = file(
        &host,
        "/etc/systemd/system/llorch-engine@default.service.d/overrides.conf",
    );
    assert_eq!(
        values(engine, "DeviceAllow"),
        [
            "/dev/nvidiactl rw",
            "/dev/nvidia-uvm rw",
            "/dev/nvidia-uvm-tools rw",
            "char-nvidia-caps r",
            "/dev/nvidia1 rw"
        ]
    );
    assert_eq!(values(engine, "DevicePolicy"), ["closed"]);
    assert_eq!(values(engine, "PrivateDevices"), ["false"]);
    // The same settings the systemd generator writes on hosts without the module.
    assert_eq!(
        settings(engine),
        settings(&generated_dropin(&host, "default"))
    );
    // Only the GPU pool's engine gets devices.
    assert!(!files(&host)
        .iter()
        .any(|(p, _)| p.contains("llorch-engine@fetched")));
    let toml = file(&host, "/etc/llama-orch/node.toml");
    assert!(
        toml.contains("devices = \"cuda:1\"\non_demand = true\nkeep_alive_secs = 60"),
        "{toml}"
    );
    // Fetched by Nix: a store path, and the hash the provisioner checks again.
    let fetched = toml.split("id = \"fetched\"").nth(1).unwrap();
    assert!(fetched.contains("source = \"/nix/store/"), "{toml}");
    assert!(fetched.contains("-m.gguf\"\nsha256 = \"b179c95"), "{toml}");
}

/// The drop-in `llama-orch-gpu-generator` writes for `pool` from the node.toml the module
/// rendered for `host`.
fn generated_dropin(host: &Value, pool: &str) -> String {
    generated_unit_dropin(host, &format!("llorch-engine@{pool}.service"))
}

/// What llama-orch-gpu-generator writes for `unit` from the host's rendered node.toml.
fn generated_unit_dropin(host: &Value, unit: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("node.toml");
    std::fs::write(&toml, file(host, "/etc/llama-orch/node.toml")).unwrap();
    let out = Command::new(bin("llama-orch-gpu-generator"))
        .arg(dir.path().join("gen"))
        .env("LLORCH_NODE_CONFIG", &toml)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    std::fs::read_to_string(
        dir.path()
            .join(format!("gen/{unit}.d/50-llama-orch-gpu.conf")),
    )
    .unwrap_or_else(|e| panic!("the generator wrote no drop-in for {unit}: {e}"))
}

/// A drop-in's settings, sorted, comments left out, booleans as the generator spells them.
fn settings(t: &str) -> Vec<String> {
    let mut v: Vec<String> = t
        .lines()
        .filter(|l| l.contains('=') && !l.starts_with('#'))
        .map(|l| l.replace("=false", "=no"))
        .collect();
    v.sort();
    v
}

#[test]
fn module_binds_gpus_by_uuid_through_the_generator() {
    let Some(n) = nix_or_skip() else { return };
    let uuid = "GPU-8d2a5f31-1c44-4b6e-9a0b-3f9e2c7d1e11";
    let host = home_with(
        n,
        &format!("{{ {NVIDIA_DRIVER} services.llama-orch.pools.default = {{ gpus = [ \"{uuid}\" ]; gpuOnly = true; }}; }}"),
        true,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let toml = file(&host, "/etc/llama-orch/node.toml");
    assert!(
        toml.contains(&format!("devices = [\"{uuid}\"]\ngpu_only = true")),
        "{toml}"
    );
    // The device node of a UUID is known at boot: the package's generator is enabled for it.
    assert!(
        host["generators"]["llama-orch-gpu-generator"]
            .as_str()
            .is_some_and(|p| p.ends_with("/lib/systemd/system-generators/llama-orch-gpu-generator")),
        "{:#}",
        host["generators"]
    );
    let engine = file(
        &host,
        "/etc/systemd/system/llorch-engine@default.service.d/overrides.conf",
    );
    assert!(
        values(engine, "Environment").contains(&format!("CUDA_VISIBLE_DEVICES={uuid}")),
        "{engine}"
    );
    assert!(!engine.contains("/dev/nvidia0"), "{engine}");
    // Without a driver here the generator opens no GPU node either: the same settings.
    assert_eq!(
        settings(engine),
        settings(&generated_dropin(&host, "default"))
    );
    // Indices and UUIDs are not mixed.
    let mixed = home_with(
        n,
        &format!("{{ services.llama-orch.pools.default.gpus = [ 0 \"{uuid}\" ]; }}"),
        true,
    )
    .unwrap_err();
    assert!(
        mixed.contains("services.llama-orch.pools.default.gpus mixes CUDA indices and UUIDs"),
        "{mixed}"
    );
}

/// The module's drop-in for `unit` on `host`.
fn dropin<'a>(host: &'a Value, unit: &str) -> &'a str {
    file(
        host,
        &format!("/etc/systemd/system/{unit}.d/overrides.conf"),
    )
}

/// The package under nixpkgs' conventions: `config.cudaSupport` picks the CUDA build, its
/// architectures come from `cudaPackages.flags` (`config.cudaCapabilities`) unless the
/// package's own `cudaCapabilities` overrides them, and llama-cpp-sys-2 finds nixpkgs' CUDA
/// libraries through CUDA_LIBRARY_PATH: one prefix gathering cuda_cudart's and libcublas's
/// outputs, whose `lib64` is where find_cuda_helper looks.
#[test]
fn package_follows_nixpkgs_cuda_config_and_finds_its_libraries() {
    let Some(n) = nix_or_skip() else { return };
    let env = |config: &str, args: &str| -> Value {
        n.eval(
            "nix/tests/offline/package-env.nix",
            &[("config", config), ("args", args)],
        )
        .unwrap_or_else(|e| panic!("config {config}, args {args}:\n{e}"))
    };
    let cpu = env("{ }", "{ }");
    assert_eq!(cpu["cudaSupport"], false, "{cpu:#}");
    assert_eq!(cpu["CUDA_LIBRARY_PATH"], Value::Null, "{cpu:#}");
    assert_eq!(cpu["CMAKE_CUDA_ARCHITECTURES"], Value::Null, "{cpu:#}");

    let cuda = env(
        "{ cudaSupport = true; cudaCapabilities = [ \"8.6\" \"8.9\" ]; }",
        "{ }",
    );
    assert_eq!(cuda["cudaSupport"], true, "{cuda:#}");
    assert_eq!(cuda["stdenvName"], "backendStdenv", "{cuda:#}");
    assert!(
        cuda["cargoBuildFlags"]
            .as_array()
            .unwrap()
            .contains(&Value::from("--features=llorch-engine/cuda")),
        "{cuda:#}"
    );
    assert_eq!(cuda["CMAKE_CUDA_ARCHITECTURES"], "86;89", "{cuda:#}");
    let libs = &cuda["cudaLibraries"];
    assert_eq!(cuda["CUDA_LIBRARY_PATH"], libs["path"], "{cuda:#}");
    assert!(
        libs["path"].as_str().is_some_and(
            |p| p.starts_with("/nix/store/") && p.ends_with("-llama-orch-cuda-libraries")
        ),
        "{cuda:#}"
    );
    assert_eq!(
        libs["paths"],
        serde_json::json!(["cuda_cudart", "libcublas"]),
        "{cuda:#}"
    );
    assert!(
        libs["postBuild"]
            .as_str()
            .is_some_and(|s| s.contains("ln -s lib $out/lib64")),
        "{cuda:#}"
    );
    // The static libraries are for the link only: no reference to them may stay.
    assert_eq!(
        cuda["disallowedReferences"],
        serde_json::json!(["llama-orch-cuda-libraries"]),
        "{cuda:#}"
    );
    assert_eq!(
        cpu["disallowedReferences"],
        serde_json::json!([]),
        "{cpu:#}"
    );

    // The package's own list wins over nixpkgs' flags, and an explicit cudaSupport over config.
    let one = env(
        "{ cudaSupport = true; }",
        "{ cudaCapabilities = [ \"9.0\" ]; }",
    );
    assert_eq!(one["CMAKE_CUDA_ARCHITECTURES"], "90", "{one:#}");
    let off = env("{ cudaSupport = true; }", "{ cudaSupport = false; }");
    assert_eq!(off["cudaSupport"], false, "{off:#}");
    assert_eq!(off["CUDA_LIBRARY_PATH"], Value::Null, "{off:#}");
}

/// A version `1.86` or `1.86.0` as numbers, for comparing.
fn version(v: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = v
        .trim()
        .split('.')
        .map(|p| p.parse().unwrap_or_else(|_| panic!("not a version: {v:?}")))
        .collect();
    parts.resize(3, 0);
    parts
}

/// The flake builds with the rustc of the NixOS release it follows (nix/rustc-version): the
/// lock file may hold no crate that needs a newer one, and the workspace's `rust-version`
/// (which every member declares, so cargo's resolver picks versions that build with it) says
/// the same. Raise nix/rustc-version only with the flake's nixpkgs.
#[test]
fn the_lock_file_builds_with_the_pinned_nixos_rustc() {
    let pinned =
        std::fs::read_to_string(repo_root().join("nix/rustc-version")).expect("nix/rustc-version");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let out = Command::new(cargo)
        .current_dir(repo_root())
        .args(["metadata", "--format-version", "1", "--locked"])
        .output()
        .unwrap();
    assert!(out.status.success(), "cargo metadata: {}", text(&out));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    let mut too_new = Vec::new();
    for p in meta["packages"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let declared = p["rust_version"].as_str();
        if members.contains(&p["id"].as_str().unwrap()) {
            assert!(
                declared.is_some(),
                "{name} does not declare rust-version (add `rust-version.workspace = true`)"
            );
        }
        if let Some(v) = declared.filter(|v| version(v) > version(&pinned)) {
            too_new.push(format!("{name} {} needs rustc {v}", p["version"]));
        }
    }
    assert!(
        too_new.is_empty(),
        "nix/rustc-version is {}, but:\n{}\n(`cargo update -p NAME` picks the newest version that builds with rust-version)",
        pinned.trim(),
        too_new.join("\n")
    );
}

/// The workspace's rust-version is a floor the package enforces at evaluation: a nixpkgs whose
/// rustc is older (a flake that makes llama-orch's nixpkgs follow an old one) gets a message
/// naming both versions and the way out, not a compile error an hour into the build. The
/// stand-in's rustc is nixos-25.05's, as nix/rustc-version records it.
#[test]
fn package_refuses_a_rustc_older_than_the_workspace_rust_version() {
    let Some(n) = nix_or_skip() else { return };
    let cargo = std::fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let rust_version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \"")?.strip_suffix('"'))
        .expect("rust-version in Cargo.toml");
    let recorded =
        std::fs::read_to_string(repo_root().join("nix/rustc-version")).expect("nix/rustc-version");
    let ok = n
        .eval("nix/tests/offline/package-env.nix", &[])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        ok["rustcVersion"],
        recorded.trim(),
        "nix/tests/offline/pkgs.nix's rustc is not the one nix/rustc-version records"
    );
    let err = n
        .eval(
            "nix/tests/offline/package-env.nix",
            &[("args", "{ rustc = { version = \"1.80.0\"; }; }")],
        )
        .unwrap_err();
    for needle in [
        format!(
            "llama-orch needs rustc {rust_version} or newer (rust-version in Cargo.toml), \
             but this nixpkgs' rustPlatform has rustc 1.80.0"
        ),
        "inputs.llama-orch.inputs.nixpkgs.follows".to_owned(),
    ] {
        assert!(err.contains(&needle), "{needle:?} is not in:\n{err}");
    }
}

/// A home box serving its LAN: the API on a LAN address with keys and TLS.
const LAN_HOME: &str = r#"{
  services.llama-orch.api = {
    address = "192.168.1.10";
    apiKeysFile = "/run/secrets/llama-orch/api-keys";
    tls = { certFile = "/run/secrets/llama-orch/api.pem"; keyFile = "/run/secrets/llama-orch/api.key"; };
  };
}"#;

/// Nothing listens in plain HTTP on loopback when the API is on a LAN address with TLS: the
/// home node agent reaches orchestratord on its local Unix socket, which the module enables.
#[test]
fn home_node_agent_reaches_orchestratord_on_its_local_socket() {
    let Some(n) = nix_or_skip() else { return };
    let host = home_with(n, LAN_HOME, false).unwrap_or_else(|e| panic!("{e}"));
    let toml = file(&host, "/etc/llama-orch/node.toml");
    assert!(
        toml.contains("\ncontrol_plane = \"unix:/run/llama-orch/orchestratord.sock\"\n"),
        "{toml}"
    );
    assert!(
        start_units(&host).contains(&"orchestratord-local.socket".to_owned()),
        "{:?}",
        start_units(&host)
    );
    assert_eq!(
        values(dropin(&host, "orchestratord.socket"), "ListenStream"),
        ["", "192.168.1.10:8080"]
    );
    // A control plane given explicitly still wins.
    let other = home_with(
        n,
        "{ services.llama-orch.node.controlPlane = \"https://cp.example.internal:8443\"; }",
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let toml = file(&other, "/etc/llama-orch/node.toml");
    assert!(
        toml.contains("\ncontrol_plane = \"https://cp.example.internal:8443\"\n"),
        "{toml}"
    );
    // Only a home box has the local socket; a worker, which runs no orchestratord, masks it.
    let hosts = n.cloud_hosts();
    assert!(!start_units(&hosts["cp"]).contains(&"orchestratord-local.socket".to_owned()));
    assert!(
        files(&hosts["w2"]).contains(&(
            "/etc/systemd/system/orchestratord-local.socket".to_owned(),
            None
        )),
        "{:#}",
        hosts["w2"]
    );
}

/// Every socket bound to an IP address binds with FreeBind=: sockets.target comes before the
/// network is configured, when a specific address is not on an interface yet.
#[test]
fn sockets_on_ip_addresses_bind_before_the_network_is_configured() {
    let Some(n) = nix_or_skip() else { return };
    let hosts = n.cloud_hosts();
    for (host, unit) in [
        ("cp", "orchestratord.socket"),
        ("cp", "orchestratord-beats.socket"),
        ("w2", "pool-managerd.socket"),
        ("w3", "pool-managerd.socket"),
    ] {
        let d = dropin(&hosts[host], unit);
        assert_eq!(values(d, "FreeBind"), ["true"], "{host} {unit}:\n{d}");
    }
    let home = home_with(n, LAN_HOME, false).unwrap_or_else(|e| panic!("{e}"));
    let api = dropin(&home, "orchestratord.socket");
    assert_eq!(values(api, "FreeBind"), ["true"], "{api}");
    // The home node API is a Unix socket: the package's unit as it is.
    assert!(
        !files(&home)
            .iter()
            .any(|(p, _)| p.contains("pool-managerd.socket")),
        "{home:#}"
    );
}

/// `nixos-rebuild switch` applies a change: a pool change reloads pool-managerd (only its
/// X-Reload-Triggers differ, which switch-to-configuration turns into a reload; SIGHUP applies
/// pools in place), a [node] change restarts it (X-Restart-Triggers: [node] applies at a start
/// only), and a change of orchestratord's settings restarts orchestratord.
#[test]
fn switch_reloads_pool_changes_and_restarts_node_changes() {
    let Some(n) = nix_or_skip() else { return };
    let render = |extra: &str| -> Value {
        home_with(n, extra, false).unwrap_or_else(|e| panic!("{extra}:\n{e}"))
    };
    let base = render("{ }");
    let slots =
        render("{ lib, ... }: { services.llama-orch.pools.default.slots = lib.mkForce 3; }");
    let node = render("{ services.llama-orch.node.heartbeatSecs = 7; }");
    let api = render("{ services.llama-orch.api.queueCapacity = 512; }");
    assert!(file(&slots, "/etc/llama-orch/node.toml").contains("\nslots = 3\n"));

    let pmd = |h: &Value| dropin(h, "pool-managerd.service").to_owned();
    let without = |t: &str, key: &str| -> Vec<String> {
        let prefix = format!("{key}=");
        t.lines()
            .filter(|l| !l.starts_with(&prefix))
            .map(str::to_owned)
            .collect()
    };
    let (b, s, nd) = (pmd(&base), pmd(&slots), pmd(&node));
    assert_eq!(values(&b, "X-Reload-Triggers").len(), 1, "{b}");
    assert_eq!(values(&b, "X-Restart-Triggers").len(), 1, "{b}");
    assert_ne!(
        values(&b, "X-Reload-Triggers"),
        values(&s, "X-Reload-Triggers"),
        "a pool change must change the reload trigger:\n{b}\n{s}"
    );
    assert_eq!(
        without(&b, "X-Reload-Triggers"),
        without(&s, "X-Reload-Triggers"),
        "a pool change must change nothing else of pool-managerd's unit (it would restart):\n{b}\n{s}"
    );
    assert_ne!(
        values(&b, "X-Restart-Triggers"),
        values(&nd, "X-Restart-Triggers"),
        "a [node] change must restart pool-managerd:\n{b}\n{nd}"
    );
    assert_eq!(
        values(&b, "X-Reload-Triggers"),
        values(&nd, "X-Reload-Triggers"),
        "{b}\n{nd}"
    );

    let orchestratord =
        |h: &Value| values(dropin(h, "orchestratord.service"), "X-Restart-Triggers");
    assert_eq!(orchestratord(&base).len(), 1);
    assert_ne!(orchestratord(&base), orchestratord(&api));
    assert_eq!(orchestratord(&base), orchestratord(&slots));
}

/// pool-managerd reads every GPU of a GPU node through NVML (its reports, the fit check):
/// its unit opens the driver's GPU devices, not only the engines'. And a GPU pool needs the
/// NVIDIA driver on the host, which the module asserts with the options to set.
#[test]
fn gpu_nodes_open_nvml_to_pool_managerd_and_require_the_nvidia_driver() {
    let Some(n) = nix_or_skip() else { return };
    let gpu = |driver: &str| {
        home_with(
            n,
            &format!("{{ {driver} services.llama-orch.pools.default.gpus = [ 1 ]; }}"),
            true,
        )
    };
    let host = gpu(NVIDIA_DRIVER).unwrap_or_else(|e| panic!("{e}"));
    let pmd = dropin(&host, "pool-managerd.service");
    assert_eq!(values(pmd, "PrivateDevices"), ["false"], "{pmd}");
    assert_eq!(values(pmd, "DevicePolicy"), ["closed"], "{pmd}");
    assert_eq!(
        values(pmd, "DeviceAllow"),
        [
            "/dev/nvidiactl rw",
            "char-nvidia-frontend rw",
            "char-nvidia rw"
        ],
        "{pmd}"
    );
    assert_eq!(values(pmd, "ProcSubset"), ["all"], "{pmd}");
    // The same settings the systemd generator writes on hosts without the module.
    let generated = generated_unit_dropin(&host, "pool-managerd.service");
    let device_keys = |t: &str| -> Vec<String> {
        settings(t)
            .into_iter()
            .filter(|l| {
                [
                    "PrivateDevices=",
                    "DevicePolicy=",
                    "DeviceAllow=",
                    "ProcSubset=",
                ]
                .iter()
                .any(|k| l.starts_with(k))
            })
            .collect()
    };
    assert_eq!(device_keys(pmd), device_keys(&generated), "{generated}");
    // A CPU node's agent opens no device (the package's PrivateDevices=yes stands).
    let cpu = home_with(n, "{ }", false).unwrap_or_else(|e| panic!("{e}"));
    let pmd = dropin(&cpu, "pool-managerd.service");
    for key in [
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
        "ProcSubset",
    ] {
        assert!(values(pmd, key).is_empty(), "{key}: {pmd}");
    }
    // Without the driver a GPU pool is refused, naming the options.
    let err = gpu("").unwrap_err();
    for message in [
        "services.llama-orch.pools.default.gpus is set but the NVIDIA driver is not: set hardware.graphics.enable = true",
        "services.xserver.videoDrivers = [ \"nvidia\" ]",
    ] {
        assert!(err.contains(message), "{message:?} is not in:\n{err}");
    }
    // Either half alone is not enough; the datacenter driver stands for videoDrivers.
    assert!(gpu("hardware.graphics.enable = true;").is_err());
    assert!(gpu("services.xserver.videoDrivers = [ \"nvidia\" ];").is_err());
    gpu("hardware.graphics.enable = true; hardware.nvidia.datacenter.enable = true;")
        .unwrap_or_else(|e| panic!("{e}"));
}

/// nix/module.nix imported without the flake has a package: pkgs.llama-orch of the overlay,
/// built with that nixpkgs' config (cudaSupport gives the CUDA build that GPU pools need).
#[test]
fn module_package_defaults_to_pkgs_llama_orch() {
    let Some(n) = nix_or_skip() else { return };
    let eval = |modules: &str, config: &str| {
        n.eval(
            "nix/tests/offline/eval.nix",
            &[
                ("modules", modules),
                ("setPackage", "false"),
                ("nixpkgsConfig", config),
            ],
        )
    };
    let home = eval("[ ./nix/examples/home.nix ]", "{ }").unwrap_or_else(|e| panic!("{e}"));
    let packages = home["packages"].as_array().unwrap();
    assert!(
        packages.len() == 1
            && packages[0]
                .as_str()
                .is_some_and(|p| p.starts_with("llama-orch-")),
        "{home:#}"
    );
    let gpu = format!(
        "[ ./nix/examples/home.nix ({{ {NVIDIA_DRIVER} services.llama-orch.pools.default.gpus = [ 0 ]; }}) ]"
    );
    eval(gpu.as_str(), "{ cudaSupport = true; }").unwrap_or_else(|e| panic!("{e}"));
    let err = eval(gpu.as_str(), "{ }").unwrap_err();
    assert!(
        err.contains("services.llama-orch.package is a CPU build"),
        "{err}"
    );
}

/// services.llama-orch.settings adds the node.toml keys the module does not model (the check
/// test above runs pool-managerd --check-config on them); a key the module writes, a pool it
/// does not have and a table node.toml does not have are refused.
#[test]
fn module_settings_add_keys_the_module_does_not_model() {
    let Some(n) = nix_or_skip() else { return };
    let host = home_with(
        n,
        r#"{ services.llama-orch.settings = {
          node = { launcher = "process"; engine_bin = "/opt/llorch/llorch-engine"; };
          pools.default = { prefix_cache_mib = 0; };
        }; }"#,
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let toml = file(&host, "/etc/llama-orch/node.toml");
    let (node, pools) = toml.split_once("[[pools]]").unwrap();
    assert!(
        node.contains("\nengine_bin = \"/opt/llorch/llorch-engine\"\nlauncher = \"process\"\n"),
        "{toml}"
    );
    // In the pool's own table, before its [pools.model].
    let (pool, _) = pools.split_once("[pools.model]").unwrap();
    assert!(pool.contains("\nprefix_cache_mib = 0\n"), "{toml}");

    let err = home_with(
        n,
        r#"{ services.llama-orch.settings = {
          node.listen = "0.0.0.0:1"; pools.default.slots = 3; pools.other.x = 1; metrics = { };
        }; }"#,
        false,
    )
    .unwrap_err();
    for message in [
        "services.llama-orch.settings.node.listen is written by the module: set its option instead",
        "services.llama-orch.settings.pools.default.slots is written by the module",
        "services.llama-orch.settings.pools.other: there is no pool other in services.llama-orch.pools",
        "services.llama-orch.settings: node.toml has [node] and [[pools]] only, not \"metrics\"",
    ] {
        assert!(err.contains(message), "{message:?} is not in:\n{err}");
    }
}

/// Secrets are files on the host: a relative path, a store path (world-readable) and a Nix path
/// (which would copy the secret into the store) are refused by the option's type.
#[test]
fn module_refuses_secret_paths_that_are_relative_or_in_the_store() {
    let Some(n) = nix_or_skip() else { return };
    for value in [
        "\"api-keys\"",
        "\"/nix/store/00000000000000000000000000000000-api-keys\"",
        "./nix/examples/home.nix",
    ] {
        let module = format!("{{ services.llama-orch.api.apiKeysFile = {value}; }}");
        let err = home_with(n, &module, false).unwrap_err();
        assert!(
            err.contains(
                "services.llama-orch.api.apiKeysFile' is not of type `null or absolute path not in the Nix store'"
            ),
            "{module}:\n{err}"
        );
    }
    home_with(
        n,
        "{ services.llama-orch.api.apiKeysFile = \"/run/secrets/llama-orch/api-keys\"; }",
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Home: the generated node token is state under /var/lib (root's, mode 0700), not a file
/// under /etc, which NixOS owns; the daemons get it from there.
#[test]
fn home_node_token_is_state_under_var_lib() {
    let Some(n) = nix_or_skip() else { return };
    let host = home_with(n, "{ }", false).unwrap_or_else(|e| panic!("{e}"));
    let token = dropin(&host, "llama-orch-node-token.service");
    assert_eq!(
        values(token, "StateDirectory"),
        ["llama-orch-secrets"],
        "{token}"
    );
    assert_eq!(values(token, "StateDirectoryMode"), ["0700"], "{token}");
    assert_eq!(
        values(token, "WorkingDirectory"),
        ["/var/lib/llama-orch-secrets"],
        "{token}"
    );
    assert_eq!(values(token, "ConfigurationDirectory"), [""], "{token}");
    assert_eq!(
        values(token, "ConditionPathExists"),
        [
            "",
            "!/var/lib/llama-orch-secrets/node-token",
            "!/var/lib/llama-orch-secrets/node-tokens"
        ],
        "{token}"
    );
    assert!(
        values(dropin(&host, "orchestratord.service"), "LoadCredential")
            .contains(&"node-tokens:/var/lib/llama-orch-secrets/node-tokens".to_owned())
    );
    assert!(
        values(dropin(&host, "pool-managerd.service"), "LoadCredential")
            .contains(&"node-token:/var/lib/llama-orch-secrets/node-token".to_owned())
    );
    for (path, text) in files(&host) {
        let text = text.unwrap_or_default();
        assert!(
            !text.contains("/etc/llama-orch/node-token"),
            "{path}:\n{text}"
        );
    }
}

/// Run a daemon's `--check-config` with the environment of a rendered drop-in and its
/// `LoadCredential=` ids mapped to `creds` (id -> file), as systemd would hand them over.
fn check_config(program: &Path, args: &[&str], dropin: &str, creds: &[(&str, &Path)]) {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<String> = values(dropin, "LoadCredential")
        .into_iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.split(':').next().unwrap().to_owned())
        .collect();
    for id in &ids {
        let (_, from) = creds
            .iter()
            .find(|(c, _)| c == id)
            .unwrap_or_else(|| panic!("the test has no file for credential {id}"));
        std::fs::copy(from, dir.path().join(id)).unwrap();
    }
    let mut c = Command::new(program);
    c.args(args).arg("--check-config").env_clear();
    c.env("CREDENTIALS_DIRECTORY", dir.path());
    for kv in values(dropin, "Environment") {
        let (k, v) = kv.split_once('=').unwrap();
        c.env(k, v);
    }
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{} --check-config refused what the module rendered:\n{dropin}\n{}",
        program.display(),
        text(&out)
    );
}

#[test]
fn rendered_configuration_passes_the_daemons_own_checks() {
    let Some(n) = nix_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("node-tokens");
    llorch_tests::write_secret(&tokens, "* 0123456789abcdef0123456789abcdef\n");
    let keys = dir.path().join("api-keys");
    llorch_tests::write_secret(&keys, "ops 0123456789abcdef0123 admin\n");

    // Home, on the real default model, with keys the module does not model (settings):
    // node.toml and orchestratord's environment.
    let model = model_path();
    let home = home_with(
        n,
        &format!(
            "{{ lib, ... }}: {{ services.llama-orch.pools.default.model.source = lib.mkForce {}; \
             services.llama-orch.pools.default = {{ embeddings = true; onDemand = true; pinned = true; }}; \
             services.llama-orch.node = {{ memoryBudgetMiB = 4096; maxLoaded = 2; minResidentSecs = 30; }}; \
             services.llama-orch.settings = {{ node.launcher = \"systemd\"; pools.default.prefix_cache_mib = 64; }}; }}",
            serde_json::to_string(&model.display().to_string()).unwrap()
        ),
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let rendered = file(&home, "/etc/llama-orch/node.toml");
    assert!(
        rendered.contains("\nlauncher = \"systemd\"\n"),
        "{rendered}"
    );
    assert!(rendered.contains("\nprefix_cache_mib = 64\n"), "{rendered}");
    assert!(rendered.contains("\nembeddings = true\n"), "{rendered}");
    assert!(
        rendered.contains("\non_demand = true\npinned = true\n"),
        "{rendered}"
    );
    for line in [
        "memory_budget_mib = 4096",
        "max_loaded = 2",
        "min_resident_secs = 30",
    ] {
        assert!(rendered.contains(&format!("\n{line}\n")), "{rendered}");
    }
    let toml = dir.path().join("node.toml");
    std::fs::write(&toml, rendered).unwrap();
    let out = Command::new(bin("pool-managerd"))
        .arg("--config")
        .arg(&toml)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    check_config(
        &bin("orchestratord"),
        &[],
        file(
            &home,
            "/etc/systemd/system/orchestratord.service.d/overrides.conf",
        ),
        &[("node-tokens", &tokens)],
    );
    assert_eq!(
        start_units(&home),
        [
            "orchestratord.socket",
            "orchestratord-local.socket",
            "pool-managerd.socket",
            "llama-orch.target",
            "pool-managerd.service"
        ]
    );

    let hosts = n.cloud_hosts();
    let ca = the_cloud_control_plane_passes_its_check(dir.path(), &hosts, &tokens, &keys);
    the_cloud_workers_pass_their_checks(dir.path(), &hosts, &ca);
}

fn the_cloud_control_plane_passes_its_check(
    dir: &Path,
    hosts: &Value,
    tokens: &Path,
    keys: &Path,
) -> Ca {
    // The cloud example's control plane: TLS, keys and tokens from credentials, off loopback.
    let ca = Ca::new(dir, "cluster");
    let cp_cert = ca.server("cp", &["10.231.2.1", "10.231.3.1"]);
    let cp = &hosts["cp"];
    let dropin = file(
        cp,
        "/etc/systemd/system/orchestratord.service.d/overrides.conf",
    );
    assert!(values(dropin, "Environment").contains(&"LLORCH_LISTEN=0.0.0.0:8443".to_owned()));
    check_config(
        &bin("orchestratord"),
        &[],
        dropin,
        &[
            ("node-tokens", tokens),
            ("api-keys", keys),
            ("tls-cert", &cp_cert.cert),
            ("tls-key", &cp_cert.key),
            ("node-ca", &ca.cert),
        ],
    );
    // Without its credentials the same environment is refused: the check above is not empty.
    let out = Command::new(bin("orchestratord"))
        .arg("--check-config")
        .env_clear()
        .env("LLORCH_LISTEN", "0.0.0.0:8443")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert_eq!(cp["firewall"], serde_json::json!([8443]));
    // Liveness beats on the API's port, over UDP: the socket is on and open in the firewall.
    let beats = file(
        cp,
        "/etc/systemd/system/orchestratord-beats.socket.d/overrides.conf",
    );
    assert_eq!(values(beats, "ListenDatagram"), ["", "0.0.0.0:8443"]);
    assert!(start_units(cp).contains(&"orchestratord-beats.socket".to_owned()));
    assert_eq!(cp["firewallUdp"], serde_json::json!([8443]));
    ca
}

fn the_cloud_workers_pass_their_checks(dir: &Path, hosts: &Value, ca: &Ca) {
    // Workers: their node.toml (the model where the cloud test puts it), TLS and token from
    // credentials.
    let token = dir.join("node-token");
    llorch_tests::write_secret(&token, "w-token-0123456789abcdef\n");
    for (w, ip) in [("w2", "10.231.2.2"), ("w3", "10.231.3.2")] {
        let root = dir.join(w);
        write_files(&root, &hosts[w]);
        let toml = root.join("etc/llama-orch/node.toml");
        let text_ = std::fs::read_to_string(&toml).unwrap().replace(
            "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            &model_path().display().to_string(),
        );
        std::fs::write(&toml, text_).unwrap();
        let cert = ca.server(w, &[ip]);
        let dropin = std::fs::read_to_string(
            root.join("etc/systemd/system/pool-managerd.service.d/overrides.conf"),
        )
        .unwrap();
        check_config(
            &bin("pool-managerd"),
            &["--config", toml.to_str().unwrap()],
            &dropin,
            &[
                ("node-token", &token),
                ("tls-cert", &cert.cert),
                ("tls-key", &cert.key),
                ("control-plane-ca", &ca.cert),
            ],
        );
        // A worker runs no control plane: both of its units are masked.
        for unit in ["orchestratord.socket", "orchestratord.service"] {
            let link = root.join("etc/systemd/system").join(unit);
            assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/dev/null"));
        }
    }
}

/// A directory holding the offline stand-in for nixpkgs: its flake.nix, nixpkgs' real lib and
/// the stand-ins of nix/tests/offline.
fn standin(n: &Nix, dir: &Path) -> PathBuf {
    let s = dir.join("nixpkgs-standin");
    std::fs::create_dir_all(&s).unwrap();
    let offline = repo_root().join("nix/tests/offline");
    for (from, to) in [
        ("standin-flake.nix", "flake.nix"),
        ("standin-default.nix", "default.nix"),
        ("pkgs.nix", "pkgs.nix"),
        ("nixos-options.nix", "nixos-options.nix"),
        ("run-nixos-test.nix", "run-nixos-test.nix"),
    ] {
        std::fs::copy(offline.join(from), s.join(to)).unwrap();
    }
    for (from, to) in [
        (n.lib.clone(), s.join("lib")),
        (offline.join("modules"), s.join("modules")),
    ] {
        let out = Command::new("cp")
            .arg("-r")
            .arg(from)
            .arg(to)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    s
}

/// The appliance's disk image: an EFI system partition with systemd-boot and the unified
/// kernel image, and a root partition holding the system (the home box with its pool).
fn the_appliance_image_holds_the_system_and_its_boot_loader(json: &dyn Fn(&str) -> Value) {
    let build = "nixosConfigurations.appliance.config.system.build";
    let parts: Value =
        serde_json::from_str(json(&format!("{build}.image.partitions")).as_str().unwrap()).unwrap();
    let esp = &parts["10-esp"];
    assert_eq!(esp["repartConfig"]["Type"], "esp", "{parts}");
    let contents = esp["contents"].as_object().unwrap();
    assert!(contents.contains_key("/EFI/BOOT/BOOTX64.EFI"), "{parts}");
    assert!(contents.contains_key("/EFI/Linux/nixos.efi"), "{parts}");
    let root = &parts["20-root"];
    assert_eq!(root["repartConfig"]["Label"], "nixos", "{parts}");
    let toplevel = json(&format!("{build}.toplevel.drvPath"));
    assert_eq!(root["storePaths"].as_array().unwrap().len(), 1, "{parts}");
    assert!(
        toplevel
            .as_str()
            .unwrap()
            .ends_with("appliance-offline-stand-in.drv"),
        "{toplevel}"
    );
    let files = json(&format!("{build}.llamaOrchFiles"));
    assert!(
        files["start"].to_string().contains("llama-orch.target"),
        "{files}"
    );
}

/// The OCI images: llorch up on a mounted model, off loopback only with API keys, as nobody;
/// the CUDA image carries the CUDA package and asks the container runtime for the driver.
/// `json` evaluates a flake attribute.
fn images_run_llorch_up_with_keys(json: &dyn Fn(&str) -> Value) {
    let sys = "packages.x86_64-linux";
    let config = |image: &str| -> Value {
        serde_json::from_str(json(&format!("{sys}.{image}.configJson")).as_str().unwrap()).unwrap()
    };
    let (cpu, cuda) = (config("image"), config("image-cuda"));
    for c in [&cpu, &cuda] {
        assert!(
            c["Entrypoint"][0]
                .as_str()
                .unwrap()
                .ends_with("/bin/llorch"),
            "{c}"
        );
        assert_eq!(c["Entrypoint"][1], "up", "{c}");
        let cmd: Vec<&str> = c["Cmd"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for pair in [
            ["--model", "/models/model.gguf"],
            ["--listen", "0.0.0.0:8080"],
            ["--api-keys", "/etc/llama-orch/api-keys"],
        ] {
            assert!(cmd.windows(2).any(|w| w == pair), "{pair:?} in {cmd:?}");
        }
        assert_eq!(c["User"], "65534:65534", "{c}");
        assert!(c["ExposedPorts"]["8080/tcp"].is_object(), "{c}");
    }
    assert_ne!(
        cpu["Entrypoint"][0], cuda["Entrypoint"][0],
        "the CUDA image has the CUDA package"
    );
    assert!(
        cuda["Env"]
            .as_array()
            .unwrap()
            .contains(&Value::from("NVIDIA_VISIBLE_DEVICES=all")),
        "{cuda}"
    );
    assert!(!cpu["Env"].to_string().contains("NVIDIA"), "{cpu}");
}

#[test]
fn flake_outputs_evaluate_against_an_offline_nixpkgs() {
    let Some(n) = nix_or_skip() else { return };
    if !llorch_tests::rootfs::is_root() {
        llorch_tests::skip("nix flake check copies the flake into /nix/store: run it as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = standin(n, dir.path());
    let flake = |args: &[&str]| {
        let out = Command::new("nix")
            .current_dir(repo_root())
            .args(["--extra-experimental-features", "nix-command flakes"])
            .args(args)
            .args(["--no-write-lock-file", "--option", "substituters", ""])
            .arg("--override-input")
            .arg("nixpkgs")
            .arg(format!("path:{}", s.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "nix {args:?}:\n{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    // Every output's shape. Nix 2.8's check takes a value whose `type` is "derivation" at its
    // word, so the derivations are instantiated below, which forces everything they depend on.
    flake(&["flake", "check", "--no-build", "."]);
    let json = |attr: &str| -> Value {
        serde_json::from_str(&flake(&["eval", "--json", &format!(".#{attr}")])).unwrap()
    };
    let apply = |attr: &str, f: &str| -> Value {
        serde_json::from_str(&flake(&[
            "eval",
            "--json",
            &format!(".#{attr}"),
            "--apply",
            f,
        ]))
        .unwrap()
    };
    let per_system = "s: builtins.mapAttrs (_: builtins.mapAttrs (_: d: d.drvPath)) s";
    // packages (CPU, CUDA), devShells, and the checks: the package and the VM tests, whose node
    // configurations are evaluated with their assertions.
    for output in ["packages", "devShells", "checks"] {
        let drvs = apply(output, per_system);
        let names: Vec<&str> = drvs["x86_64-linux"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(name, drv)| {
                assert!(
                    drv.as_str().unwrap().ends_with(".drv"),
                    "{output}.{name}: {drv}"
                );
                name.as_str()
            })
            .collect();
        assert!(!names.is_empty(), "{output}: {drvs}");
    }
    assert_eq!(
        apply("checks", "s: builtins.attrNames s.x86_64-linux"),
        serde_json::json!(["cloud", "home", "package"])
    );
    // The home and cloud nixosConfigurations, their assertions and rendered files included.
    let systems = apply(
        "nixosConfigurations",
        "c: builtins.mapAttrs (_: n: n.config.system.build.toplevel.drvPath) c",
    );
    assert_eq!(
        systems.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["appliance", "cloud-cp", "cloud-w2", "cloud-w3", "home"]
    );
    the_appliance_image_holds_the_system_and_its_boot_loader(&json);
    let app = json("apps.x86_64-linux.default.program");
    assert!(app.as_str().unwrap().ends_with("/bin/llorch-up"), "{app}");
    // The flake's cloud hosts are the cluster library's, as tests/cloud.rs boots them.
    let hosts = n.cloud_hosts();
    for h in ["cp", "w2", "w3"] {
        assert_eq!(
            json(&format!(
                "nixosConfigurations.cloud-{h}.config.system.build.llamaOrchFiles"
            )),
            hosts[h],
            "{h}"
        );
    }
    let sys = "packages.x86_64-linux";
    assert_eq!(json(&format!("{sys}.default.GGML_AVX2")), "OFF");
    assert_eq!(
        json(&format!("{sys}.cuda.CMAKE_CUDA_ARCHITECTURES")),
        "80;86;89;90"
    );
    let flags = json(&format!("{sys}.cuda.cargoBuildFlags"));
    assert!(
        flags
            .as_array()
            .unwrap()
            .contains(&Value::from("--features=llorch-engine/cuda")),
        "{flags}"
    );
    assert_eq!(json(&format!("{sys}.cuda.stdenvName")), "backendStdenv");
    assert!(
        json(&format!("{sys}.cuda.CUDA_LIBRARY_PATH"))
            .as_str()
            .is_some_and(|p| p.ends_with("-llama-orch-cuda-libraries")),
        "the CUDA package names no CUDA_LIBRARY_PATH"
    );
    images_run_llorch_up_with_keys(&json);
    let install = json(&format!("{sys}.default.postInstall"));
    for unit in ["orchestratord.service", "llorch-engine@.service"] {
        assert!(repo_root().join("systemd").join(unit).exists());
    }
    assert!(
        install.as_str().unwrap().contains("lib/systemd/system"),
        "{install}"
    );
    assert_eq!(
        json("nixosConfigurations.home.config.services.llama-orch.node.id"),
        "home"
    );
}
