# A stand-in for nixpkgs' nixos/modules/image/repart.nix, for offline evaluation: the options
# the appliance sets, with their types, and system.build.image as a derivation that cannot
# build but depends on every partition's contents and store paths. Not proved here: that
# systemd-repart builds the image, or that it boots.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption types;
  partition = types.submodule {
    options = {
      contents = mkOption {
        type = types.attrsOf (types.submodule { options.source = mkOption { type = types.path; }; });
        default = { };
      };
      storePaths = mkOption { type = types.listOf types.path; default = [ ]; };
      repartConfig = mkOption { type = types.attrsOf (types.oneOf [ types.str types.int types.bool ]); };
    };
  };
in
{
  options.image.repart = {
    name = mkOption { type = types.str; };
    partitions = mkOption { type = types.attrsOf partition; default = { }; };
  };
  config.system.build.image = derivation {
    name = "${config.image.repart.name}-offline-stand-in";
    inherit (pkgs) system;
    builder = "/bin/sh";
    args = [ "-c" "echo 'offline stand-in: systemd-repart builds the image with nixpkgs only' >&2; exit 1" ];
    partitions = builtins.toJSON (lib.mapAttrs
      (_: p: {
        contents = lib.mapAttrs (_: c: "${c.source}") p.contents;
        storePaths = map toString p.storePaths;
        inherit (p) repartConfig;
      })
      config.image.repart.partitions);
  };
}
