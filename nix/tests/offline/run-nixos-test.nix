# Stand-in for nixpkgs' testers.runNixOSTest: evaluates every node with the module stand-ins
# (its assertions included) and yields a derivation that names them; the VM test itself runs
# only with nixpkgs and KVM (nix/tests/README.md).
{ lib, pkgs }:
test:
let
  t = if builtins.isFunction test then test { inherit pkgs; } else test;
  node = name: m: (lib.evalModules {
    modules = [ ./nixos-options.nix { _module.args.pkgs = pkgs; networking.hostName = lib.mkDefault name; } m ]
      ++ lib.toList (t.defaults or [ ]);
  }).config.system.build.toplevel;
in
assert builtins.isString t.testScript;
derivation {
  name = "vm-test-run-${t.name}";
  inherit (pkgs) system;
  builder = "/bin/sh";
  args = [ "-c" "echo 'the VM test runs with nixpkgs and KVM only' >&2; exit 1" ];
  nodes = lib.mapAttrsToList node t.nodes;
  inherit (t) testScript;
}
