# Stand-ins for the nixpkgs packages the flake and the module use, for offline evaluation:
# each is a real derivation (so `nix flake check --no-build` can instantiate it) whose builder
# fails, so nothing here can pass for a build. What they prove: the expressions evaluate,
# the arguments have the right shape, the sources and files they name exist. What they do not:
# that nixpkgs' real functions accept those arguments and that the build succeeds.
{ lib, system ? "x86_64-linux", config ? { }, overlay ? (_: _: { }) }:
let
  stub = name: attrs: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" "echo 'offline stand-in for nixpkgs: ${name} cannot be built here' >&2; exit 1" ];
  } // attrs);
  # Derivation attributes are strings, numbers, booleans, paths, derivations or lists of them.
  plain = lib.filterAttrs (_: v: !(builtins.isFunction v || (builtins.isAttrs v && !lib.isDerivation v)));
  tools = [
    "cmake"
    "pkg-config"
    "coreutils"
    "unzip"
    "curl"
    "cargo"
    "rustc"
    "clippy"
    "rustfmt"
    "python3"
    "systemd"
    "dbus"
    "iproute2"
    "debootstrap"
    "prometheus"
    "openssl"
    "nix"
    "deadnix"
    "nixpkgs-fmt"
    "jq"
    "autoAddDriverRunpath"
  ];
  pkgs = lib.fix (lib.extends overlay (self: lib.genAttrs tools (n: stub n { }) // {
    inherit lib system config;
    stdenv = stub "stdenv" { } // { hostPlatform = { inherit system; }; };
    callPackage = lib.callPackageWith self;
    rustPlatform = {
      bindgenHook = stub "rust-bindgen-hook" { };
      buildRustPackage = lib.makeOverridable
        ({ stdenv }: args:
          assert builtins.pathExists args.cargoLock.lockFile;
          stub "${args.pname}-${args.version}"
            (plain (removeAttrs args [ "passthru" "meta" "cargoLock" ]) // {
              stdenvName = stdenv.name;
              cargoLockHash = builtins.hashFile "sha256" args.cargoLock.lockFile;
            }) // args.passthru or { } // { meta = args.meta or { }; })
        { inherit (self) stdenv; };
    };
    cudaPackages = lib.genAttrs [ "cuda_nvcc" "cuda_cudart" "cuda_cccl" "libcublas" "backendStdenv" ] (n: stub n { });
    fetchurl = { url, sha256, name ? baseNameOf url }: derivation {
      inherit name system url;
      builder = "builtin:fetchurl";
      outputHashMode = "flat";
      outputHashAlgo = "sha256";
      outputHash = sha256;
    };
    runCommand = name: env: script: stub name (plain env // { inherit script; });
    writeShellScriptBin = name: text: stub name { inherit text; } // { meta.mainProgram = name; };
    mkShell = args: stub (args.name or "nix-shell") (plain args);
    testers.runNixOSTest = import ./run-nixos-test.nix { inherit lib; pkgs = self; };
  }));
in
pkgs
