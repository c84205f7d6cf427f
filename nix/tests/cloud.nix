# NixOS VM test: the 3-host cluster of nix/lib/cluster.nix (a control plane, two workers) on the
# test driver's network (192.168.1.1 to .3 in node order); a worker lost and back. Plain HTTP:
# the VMs share a private virtual network and TLS is proved by the nspawn cloud test
# (tests/cloud.rs), which boots the TLS topology of nix/examples/cloud.nix. Runs with nixpkgs
# and KVM: `nix build .#checks.x86_64-linux.cloud`.
{ self, pkgs }:
let
  key = "ops-0123456789abcdef0123";
  tokens = { w2 = "w2-token-0123456789abcdef"; w3 = "w3-token-0123456789abcdef"; };
  secret = name: "/etc/llama-orch/secrets/${name}";
  worker = id: {
    address = "192.168.1.${if id == "w2" then "2" else "3"}";
    tokenFile = secret "node-token";
    heartbeatSecs = 1;
    pools.default = { model = "smollm2"; slots = 2; ctx = 1024; };
  };
  spec = {
    allowPlaintext = true;
    controlPlane = {
      host = "cp";
      addresses = [ "192.168.1.1" ];
      apiKeysFile = secret "api-keys";
      nodeTokensFile = secret "node-tokens";
    };
    models.smollm2 = import ./model.nix { inherit pkgs; };
    workers = { w2 = worker "w2"; w3 = worker "w3"; };
  };
  hosts = self.lib.hosts spec;
  # Test secrets only: a real cluster keeps them out of the Nix store.
  secrets = files: { environment.etc = builtins.mapAttrs (_: text: { inherit text; mode = "0600"; }) files; };
  node = name: files: {
    imports = [ self.nixosModules.default hosts.${name} (secrets files) ];
    virtualisation.memorySize = 2048;
    environment.systemPackages = [ pkgs.curl pkgs.jq ];
  };
  api = path: "curl -sf -H 'authorization: Bearer ${key}' http://127.0.0.1:8443${path}";
in
{
  name = "llama-orch-cloud";
  nodes = {
    cp = node "cp" {
      "llama-orch/secrets/api-keys" = "ops ${key} admin\n";
      "llama-orch/secrets/node-tokens" = self.lib.nodeTokensTextFor spec tokens;
    };
    w2 = node "w2" { "llama-orch/secrets/node-token" = "${tokens.w2}\n"; };
    w3 = node "w3" { "llama-orch/secrets/node-token" = "${tokens.w3}\n"; };
  };
  testScript = ''
    start_all()
    cp.wait_for_unit("orchestratord.socket")
    w2.wait_for_unit("pool-managerd.service")
    w3.wait_for_unit("pool-managerd.service")
    cp.wait_until_succeeds("${api "/v2/nodes"} | jq -e '[.[] | select(.state == \"online\")] | length == 2'", timeout=300)
    # Node loss: w2 stops; the control plane marks it offline and keeps serving on w3.
    w2.crash()
    cp.wait_until_succeeds("${api "/v2/nodes"} | jq -e '.[] | select(.node_id == \"w2\") | .state == \"offline\"'", timeout=60)
    cp.succeed("${api "/v1/models"} | jq -e '.data | length > 0'")
    # And return: it registers again by itself.
    w2.start()
    cp.wait_until_succeeds("${api "/v2/nodes"} | jq -e '[.[] | select(.state == \"online\")] | length == 2'", timeout=300)
  '';
}
