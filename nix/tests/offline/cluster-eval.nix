# Every host of a cluster description (default: nix/examples/cloud.nix) through the cluster
# library and the module: host name -> what eval.nix returns for it. tests/cloud.rs boots these.
{ lib, spec ? import ../../examples/cloud.nix }:
let
  cluster = import ../../lib/cluster.nix { inherit lib; };
in
lib.mapAttrs (host: settings: import ./eval.nix { inherit lib; hostName = host; modules = [ settings ]; })
  (cluster.hosts spec)
