# `import nixpkgs { inherit system; config = ...; }` of the offline stand-in (standin-flake.nix).
{ system ? "x86_64-linux", config ? { }, ... }:
import ./pkgs.nix { lib = import ./lib; inherit system config; }
