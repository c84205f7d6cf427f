# NixOS VM test: a home box boots, answers a chat, and loses no request while orchestratord
# restarts (systemd holds its socket); its node agent reaches orchestratord on the local socket
# and its node token is state under /var/lib; switching to a configuration with another pool
# size reloads pool-managerd instead of restarting it. Runs with nixpkgs and KVM:
# `nix build .#checks.x86_64-linux.home`.
{ self, pkgs }:
let
  model = import ./model.nix { inherit pkgs; };
  chat = "curl -sf http://127.0.0.1:8080/v1/chat/completions -H 'content-type: application/json' "
    + "-d '{\"model\":\"smollm2-135m\",\"messages\":[{\"role\":\"user\",\"content\":\"What is the capital of France?\"}],\"max_tokens\":8,\"temperature\":0}'";
in
{
  name = "llama-orch-home";
  nodes.machine = {
    imports = [ self.nixosModules.default ];
    virtualisation.memorySize = 2048;
    virtualisation.cores = 2;
    environment.systemPackages = [ pkgs.curl pkgs.jq ];
    services.llama-orch = {
      enable = true;
      pools.default = { inherit model; slots = 2; ctx = 1024; };
    };
    # The same box with one more slot: `switch-to-configuration test` into it must reload
    # pool-managerd (X-Reload-Triggers), not restart it.
    specialisation.slots3.configuration = { lib, ... }: {
      services.llama-orch.pools.default.slots = lib.mkForce 3;
    };
  };
  testScript = ''
    machine.wait_for_unit("pool-managerd.service")
    machine.wait_for_unit("orchestratord.socket")
    # The pool is ready once the model is loaded: the chat then answers.
    machine.wait_until_succeeds("${chat} | jq -e '.choices[0].message.content | length > 0'", timeout=300)
    # Restart under load: 20 requests, one connection each, orchestratord restarted meanwhile.
    machine.succeed(
      "(for i in $(seq 20); do ${chat} >/dev/null || echo failed; done) > /tmp/load 2>&1 & "
      + "sleep 2; systemctl restart orchestratord.service; wait"
    )
    machine.succeed("test ! -s /tmp/load")
    machine.succeed("systemctl is-active orchestratord.service pool-managerd.service llorch-engine@default.service")
    # The node agent's control plane is orchestratord's local socket; the generated node
    # token is under /var/lib, root's alone, and nothing was written to /etc/llama-orch.
    machine.succeed("systemctl is-active orchestratord-local.socket")
    machine.succeed("grep -qx 'control_plane = \"unix:/run/llama-orch/orchestratord.sock\"' /etc/llama-orch/node.toml")
    machine.succeed("test -s /var/lib/llama-orch-secrets/node-token -a -s /var/lib/llama-orch-secrets/node-tokens")
    machine.succeed("test $(stat -c %a /var/lib/llama-orch-secrets) = 700")
    machine.fail("test -e /etc/llama-orch/node-token")
    # A pool change is reloaded: the same pool-managerd process, the new slots, still serving.
    pid = machine.succeed("systemctl show -P MainPID pool-managerd.service").strip()
    machine.succeed("/run/current-system/specialisation/slots3/bin/switch-to-configuration test")
    machine.succeed("grep -qx 'slots = 3' /etc/llama-orch/node.toml")
    machine.succeed(f"test $(systemctl show -P MainPID pool-managerd.service) = {pid}")
    machine.wait_until_succeeds("${chat} | jq -e '.choices[0].message.content | length > 0'", timeout=300)
  '';
}
