# NixOS VM test: a home box boots, answers a chat, and loses no request while orchestratord
# restarts (systemd holds its socket). Runs with nixpkgs and KVM: `nix build .#checks.x86_64-linux.home`.
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
  '';
}
