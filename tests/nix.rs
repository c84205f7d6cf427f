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
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("node.toml");
    std::fs::write(&toml, file(host, "/etc/llama-orch/node.toml")).unwrap();
    let out = Command::new(bin("llama-orch-gpu-generator"))
        .arg(dir.path().join("gen"))
        .env("LLORCH_NODE_CONFIG", &toml)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    std::fs::read_to_string(dir.path().join(format!(
        "gen/llorch-engine@{pool}.service.d/50-llama-orch-gpu.conf"
    )))
    .unwrap()
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
        &format!("{{ services.llama-orch.pools.default = {{ gpus = [ \"{uuid}\" ]; gpuOnly = true; }}; }}"),
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

    // Home, on the real default model: node.toml and orchestratord's environment.
    let model = model_path();
    let home = home_with(
        n,
        &format!(
            "{{ lib, ... }}: {{ services.llama-orch.pools.default.model.source = lib.mkForce {}; }}",
            serde_json::to_string(&model.display().to_string()).unwrap()
        ),
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let toml = dir.path().join("node.toml");
    std::fs::write(&toml, file(&home, "/etc/llama-orch/node.toml")).unwrap();
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
            "pool-managerd.socket",
            "llama-orch.target",
            "pool-managerd.service"
        ]
    );

    // The cloud example's control plane: TLS, keys and tokens from credentials, off loopback.
    let hosts = n.cloud_hosts();
    let ca = Ca::new(dir.path(), "cluster");
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
            ("node-tokens", &tokens),
            ("api-keys", &keys),
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

    // Workers: their node.toml (the model where the cloud test puts it), TLS and token from
    // credentials.
    let token = dir.path().join("node-token");
    llorch_tests::write_secret(&token, "w-token-0123456789abcdef\n");
    for (w, ip) in [("w2", "10.231.2.2"), ("w3", "10.231.3.2")] {
        let root = dir.path().join(w);
        write_files(&root, &hosts[w]);
        let toml = root.join("etc/llama-orch/node.toml");
        let text_ = std::fs::read_to_string(&toml).unwrap().replace(
            "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            &model.display().to_string(),
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
    let out = Command::new("cp")
        .arg("-r")
        .arg(&n.lib)
        .arg(s.join("lib"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    s
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
        ["cloud-cp", "cloud-w2", "cloud-w3", "home"]
    );
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
