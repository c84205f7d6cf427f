# Evaluates NixOS modules (the llama-orch module and a host's settings) with nixpkgs' lib and
# the option stand-ins of nixos-options.nix, and returns what the host would get on disk
# (system.build.llamaOrchFiles). Used by tests/nix.rs:
#
#   nix-instantiate --eval --strict --json nix/tests/offline/eval.nix \
#     --arg lib 'import <vendored lib>' --arg modules '[ ./nix/examples/home.nix ]'
#
# `setPackage = false` leaves services.llama-orch.package at its default (pkgs.llama-orch of
# the overlay, built with `nixpkgsConfig`), as nix/module.nix imported without the flake.
{ lib, modules, hostName ? "host", cudaPackage ? false, setPackage ? true, nixpkgsConfig ? { } }:
let
  pkgs = import ./pkgs.nix {
    inherit lib;
    config = nixpkgsConfig;
    overlay = final: _: {
      llama-orch = final.callPackage ../../package.nix { };
      llama-orch-cuda = final.callPackage ../../package.nix { cudaSupport = true; };
    };
  };
  evaluated = lib.evalModules {
    modules = [
      ./nixos-options.nix
      ../../module.nix
      {
        _module.args.pkgs = pkgs;
        networking.hostName = hostName;
        services.llama-orch.package = lib.mkIf setPackage (if cudaPackage then pkgs.llama-orch-cuda else pkgs.llama-orch);
      }
    ] ++ modules;
  };
in
evaluated.config.system.build.llamaOrchFiles
