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
  # nixpkgs' default CUDA capabilities stand in as this list (the real one follows the CUDA
  # release); config.cudaCapabilities replaces it, as in nixpkgs.
  cudaCapabilities = config.cudaCapabilities or [ "7.5" "8.0" "8.6" "8.9" "9.0" ];
  pkgs = lib.fix (lib.extends overlay (self: lib.genAttrs tools (n: stub n { }) // {
    inherit lib system config;
    stdenv = stub "stdenv" { } // { hostPlatform = { inherit system; efiArch = if system == "aarch64-linux" then "aa64" else "x64"; }; };
    callPackage = lib.callPackageWith self;
    # nixos-25.05's rustc (nix/rustc-version; tests/nix.rs compares the two).
    rustc = stub "rustc-1.86.0" { version = "1.86.0"; };
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
    cudaPackages = lib.genAttrs [ "cuda_nvcc" "cuda_cudart" "cuda_cccl" "libcublas" "backendStdenv" ] (n: stub n { }) // {
      # pkgs/development/cuda-modules/flags.nix: CMake's architectures, "8.9" -> "89".
      flags = {
        inherit cudaCapabilities;
        cmakeCudaArchitecturesString = lib.concatMapStringsSep ";" (lib.replaceStrings [ "." ] [ "" ]) cudaCapabilities;
      };
    };
    symlinkJoin = args: stub args.name (plain args);
    writeText = name: text: stub name { inherit text; };
    # pkgs/pkgs-lib/formats.nix: the TOML value type (generate is not used by the module).
    formats.toml = _: {
      type =
        let
          valueType = lib.types.oneOf [
            lib.types.bool
            lib.types.int
            lib.types.float
            lib.types.str
            lib.types.path
            (lib.types.attrsOf valueType)
            (lib.types.listOf valueType)
          ] // { description = "TOML value"; };
        in
        valueType;
      generate = name: value: stub name { text = builtins.toJSON value; };
    };
    fetchurl = { url, sha256, name ? baseNameOf url }: derivation {
      inherit name system url;
      builder = "builtin:fetchurl";
      outputHashMode = "flat";
      outputHashAlgo = "sha256";
      outputHash = sha256;
    };
    runCommand = name: env: script: stub name (plain env // { inherit script; });
    cacert = stub "nss-cacert" { };
    # pkgs/build-support/docker: the image's config, kept as JSON for the tests to read.
    dockerTools.streamLayeredImage = args:
      stub "stream-${args.name}" (plain (removeAttrs args [ "config" ]) // { configJson = builtins.toJSON args.config; });
    writeShellScriptBin = name: text: stub name { inherit text; } // { meta.mainProgram = name; };
    mkShell = args: stub (args.name or "nix-shell") (plain args);
    testers.runNixOSTest = import ./run-nixos-test.nix { inherit lib; pkgs = self; };
  }));
in
pkgs
