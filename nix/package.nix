# The llama-orch workspace: orchestratord, pool-managerd, engine-provisioner, llorch-engine and
# the llorch CLI, with the systemd units, sysusers, tmpfiles, D-Bus policy and polkit files of
# systemd/ installed where NixOS (and any systemd distribution) looks for them.
#
#   pkgs.callPackage ./package.nix { }                          CPU, portable llama.cpp
#   pkgs.callPackage ./package.nix { cpuLevel = "x86-64-v3"; }  AVX2/FMA/F16C (2x faster on CPU)
#   pkgs.callPackage ./package.nix { cudaSupport = true; }      CUDA engine (unfree nixpkgs)
{ lib
, rustPlatform
, cmake
, pkg-config
, cudaSupport ? false
, cudaPackages ? { }
, autoAddDriverRunpath ? null
  # llama.cpp's CPU kernels: "portable" (x86-64 baseline, runs everywhere), "x86-64-v3"
  # (AVX2, FMA, F16C, BMI2: every x86 server since 2013; what `make build` uses) or "native"
  # (the build machine's own CPU: only for a binary built where it runs).
, cpuLevel ? "portable"
  # CUDA architectures compiled in (CMAKE_CUDA_ARCHITECTURES): Ampere (80, 86), Ada (89),
  # Hopper (90). One entry builds several times faster.
, cudaCapabilities ? [ "80" "86" "89" "90" ]
}:
let
  cargoToml = builtins.fromTOML (builtins.readFile ../Cargo.toml);
  x86Flags = [ "GGML_AVX" "GGML_AVX2" "GGML_FMA" "GGML_F16C" "GGML_BMI2" ];
  cpuEnv =
    {
      # .cargo/config.toml turns these on for `make build`; the environment wins over it.
      portable = lib.genAttrs x86Flags (_: "OFF");
      "x86-64-v3" = lib.genAttrs x86Flags (_: "ON");
      native = { RUSTFLAGS = "-C target-cpu=native"; };
    }.${cpuLevel} or (throw "llama-orch: cpuLevel must be \"portable\", \"x86-64-v3\" or \"native\", not \"${cpuLevel}\"");
  # nvcc needs the host compiler nixpkgs pairs with the CUDA toolkit: build with its stdenv.
  buildRustPackage =
    if cudaSupport then rustPlatform.buildRustPackage.override { stdenv = cudaPackages.backendStdenv; }
    else rustPlatform.buildRustPackage;
  bins = [ "orchestratord" "pool-managerd" "engine-provisioner" "llorch-engine" "llorch" ];
in
assert cudaSupport -> cudaPackages ? cuda_nvcc;
buildRustPackage ({
  pname = "llama-orch";
  version = cargoToml.workspace.package.version;

  # The workspace and the unit files, nothing else (no target/, no docs): a change elsewhere
  # does not rebuild. (lib.fileset needs a newer Nix than some distributions ship.)
  src = lib.cleanSourceWith {
    name = "llama-orch-source";
    src = ./..;
    filter = path: _type:
      let rel = lib.removePrefix "${toString ./..}/" (toString path);
      in lib.elem (builtins.head (lib.splitString "/" rel)) [ "Cargo.toml" "Cargo.lock" ".cargo" "crates" "tests" "systemd" ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  nativeBuildInputs = [
    cmake
    pkg-config
    # LIBCLANG_PATH and the C headers for llama-cpp-sys-2's bindgen.
    rustPlatform.bindgenHook
  ] ++ lib.optionals cudaSupport [
    cudaPackages.cuda_nvcc
    autoAddDriverRunpath
  ];
  buildInputs = lib.optionals cudaSupport [
    cudaPackages.cuda_cudart
    cudaPackages.cuda_cccl
    cudaPackages.libcublas
  ];
  # cmake is a tool of llama-cpp-sys-2's build script, not of this package.
  dontUseCmakeConfigure = true;

  cargoBuildFlags = map (b: "--package=${b}") bins
    ++ lib.optional cudaSupport "--features=llorch-engine/cuda";
  # The tests need systemd, network namespaces, a D-Bus daemon and the default model: they are
  # `make test` on a build machine and the NixOS VM tests in nix/tests/, not the sandbox.
  doCheck = false;

  postInstall = ''
    units=$out/lib/systemd/system
    install -Dm0644 -t $units systemd/*.service systemd/*.socket systemd/*.target
    substituteInPlace $units/* --replace-quiet /usr/bin/ $out/bin/
    # For systems that do not declare their units (NixOS does, in the module, instead).
    install -Dm0755 -t $out/lib/systemd/system-generators $out/bin/llama-orch-gpu-generator
    install -Dm0644 systemd/llama-orch.sysusers.conf $out/lib/sysusers.d/llama-orch.conf
    install -Dm0644 systemd/llama-orch.tmpfiles.conf $out/lib/tmpfiles.d/llama-orch.conf
    install -Dm0644 systemd/org.llamaorch.conf $out/share/dbus-1/system.d/org.llamaorch.conf
    install -Dm0644 systemd/org.llamaorch.policy $out/share/polkit-1/actions/org.llamaorch.policy
    install -Dm0644 systemd/llama-orch.polkit.rules $out/share/polkit-1/rules.d/50-llama-orch.rules
  '';

  passthru = { inherit cudaSupport cpuLevel cudaCapabilities; };

  meta = {
    description = "A systemd-native appliance that serves language models from the GPUs of one machine or a cluster";
    license = lib.licenses.asl20;
    platforms = lib.platforms.linux;
    mainProgram = "llorch";
  };
} // cpuEnv // lib.optionalAttrs cudaSupport {
  CMAKE_CUDA_ARCHITECTURES = lib.concatStringsSep ";" cudaCapabilities;
})
