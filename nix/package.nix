# The llama-orch workspace: orchestratord, pool-managerd, engine-provisioner, llorch-engine and
# the llorch CLI, with the systemd units, sysusers, tmpfiles, D-Bus policy and polkit files of
# systemd/ installed where NixOS (and any systemd distribution) looks for them.
#
#   pkgs.callPackage ./package.nix { }                          CPU, portable llama.cpp; CUDA
#                                                               when nixpkgs' config.cudaSupport
#   pkgs.callPackage ./package.nix { cpuLevel = "x86-64-v3"; }  AVX2/FMA/F16C (2x faster on CPU)
#   pkgs.callPackage ./package.nix { cudaSupport = true; }      CUDA engine (unfree nixpkgs)
{ lib
, config ? { }
, rustPlatform
  # The rustc of rustPlatform (nixpkgs' own; give both when overriding rustPlatform).
, rustc
, cmake
, pkg-config
, symlinkJoin
  # nixpkgs' convention: `import nixpkgs { config = { cudaSupport = true; allowUnfree = true; }; }`.
, cudaSupport ? config.cudaSupport or false
, cudaPackages ? { }
, autoAddDriverRunpath ? null
  # llama.cpp's CPU kernels: "portable" (x86-64 baseline, runs everywhere), "x86-64-v3"
  # (AVX2, FMA, F16C, BMI2: every x86 server since 2013; what `make build` uses) or "native"
  # (the build machine's own CPU: only for a binary built where it runs).
, cpuLevel ? "portable"
  # CUDA capabilities compiled in (CMAKE_CUDA_ARCHITECTURES), such as [ "8.9" ] (or "89"):
  # null takes nixpkgs' (cudaPackages.flags, which follow config.cudaCapabilities). One
  # entry builds several times faster.
, cudaCapabilities ? null
}:
let
  cargoToml = builtins.fromTOML (builtins.readFile ../Cargo.toml);
  # The workspace's minimum rustc (Cargo.toml); nix/rustc-version records nixos-25.05's.
  rustVersion = cargoToml.workspace.package.rust-version;
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

  cudaArchitectures =
    if cudaCapabilities != null then lib.concatMapStringsSep ";" (lib.replaceStrings [ "." ] [ "" ]) cudaCapabilities
    else cudaPackages.flags.cmakeCudaArchitecturesString;
  # llama-cpp-sys-2 links cudart_static, cublas_static, cublasLt_static, culibos and libcuda
  # (the driver's stub) by name, searching `lib64` and `lib64/stubs` of each prefix in
  # CUDA_LIBRARY_PATH (find_cuda_helper; otherwise /opt/cuda and /usr/local/cuda*, absent in
  # the sandbox). nixpkgs splits each CUDA library into outputs (lib, static, stubs): one prefix
  # gathers them. CUDA 13 moved culibos into a package of its own.
  cudaLibraries = symlinkJoin {
    name = "llama-orch-cuda-libraries";
    paths = lib.unique (lib.concatMap (p: map (o: lib.getOutput o p) [ "lib" "static" "stubs" ])
      ([ cudaPackages.cuda_cudart cudaPackages.libcublas ] ++ lib.optional (cudaPackages ? cuda_culibos) cudaPackages.cuda_culibos));
    postBuild = "[ -e $out/lib64 ] || ln -s lib $out/lib64";
  };
in
assert cudaSupport -> cudaPackages ? cuda_nvcc;
assert lib.assertMsg (!lib.versionOlder rustc.version rustVersion) ''
  llama-orch needs rustc ${rustVersion} or newer (rust-version in Cargo.toml), but this nixpkgs' rustPlatform has rustc ${rustc.version}.
  Build it with the nixpkgs of flake.nix (nixos-25.05${lib.optionalString (builtins.pathExists ./rustc-version) ", rustc ${lib.fileContents ./rustc-version}"}: nix/rustc-version) or newer:
  if your flake sets inputs.llama-orch.inputs.nixpkgs.follows = "nixpkgs", your nixpkgs must be that new, or drop the follows.'';
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

  # ld-wrapper gives a binary a RUNPATH entry for each -L directory it linked a shared library
  # from: the joined CUDA prefix (for the libcuda stub) would keep the static CUDA libraries in
  # the closure. libcuda is the driver's, found at run time in /run/opengl-driver/lib
  # (autoAddDriverRunpath); the build fails if a reference to the prefix remains.
  postFixup = lib.optionalString cudaSupport ''
    for f in $out/bin/*; do
      rpath=$(patchelf --print-rpath "$f" 2>/dev/null) || continue
      patchelf --set-rpath "$(printf '%s' "$rpath" | tr ':' '\n' | grep -v '^${cudaLibraries}' | paste -sd:)" "$f"
    done
  '';
  disallowedReferences = lib.optional cudaSupport cudaLibraries;

  passthru = { inherit cudaSupport cpuLevel; } // lib.optionalAttrs cudaSupport { inherit cudaArchitectures cudaLibraries; };

  meta = {
    description = "A systemd-native appliance that serves language models from the GPUs of one machine or a cluster";
    license = lib.licenses.asl20;
    platforms = lib.platforms.linux;
    mainProgram = "llorch";
  };
} // cpuEnv // lib.optionalAttrs cudaSupport {
  CMAKE_CUDA_ARCHITECTURES = cudaArchitectures;
  CUDA_LIBRARY_PATH = "${cudaLibraries}";
})
