# What nix/package.nix gives nixpkgs' buildRustPackage, through callPackage of the offline
# stand-in (pkgs.nix) under a nixpkgs `config` and with `args` (an override): the settings the
# build reads from its environment. Used by tests/nix.rs:
#
#   nix-instantiate --eval --strict --json nix/tests/offline/package-env.nix \
#     --arg lib 'import <vendored lib>' --arg config '{ cudaSupport = true; }'
{ lib, config ? { }, args ? { } }:
let
  pkgs = import ./pkgs.nix { inherit lib config; };
  p = pkgs.callPackage ../../package.nix args;
in
{
  inherit (p) name cudaSupport cargoBuildFlags stdenvName;
  CMAKE_CUDA_ARCHITECTURES = p.CMAKE_CUDA_ARCHITECTURES or null;
  CUDA_LIBRARY_PATH = p.CUDA_LIBRARY_PATH or null;
  # The prefix CUDA_LIBRARY_PATH names: what it gathers and how.
  cudaLibraries =
    if p ? cudaLibraries then {
      inherit (p.cudaLibraries) name postBuild;
      path = "${p.cudaLibraries}";
      paths = map (d: d.name) p.cudaLibraries.paths;
    } else null;
  # What the build refuses to keep a reference to (the joined CUDA prefix: static libraries).
  disallowedReferences = map (d: d.name) (p.disallowedReferences or [ ]);
  rustcVersion = pkgs.rustc.version;
}
