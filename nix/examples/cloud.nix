# A cluster of three hosts: the control plane `cp`, which two racks reach at an address each,
# and the workers `w2` and `w3`, one per rack. One CA signs every certificate; secrets stay on
# the hosts (/etc/llama-orch/secrets, mode 0600), never in the Nix store. The cloud test
# (tests/cloud.rs) boots exactly these hosts, with the files the module renders from this.
let
  secret = name: "/etc/llama-orch/secrets/${name}";
  worker = rack: {
    address = "10.231.${rack}.2";
    controlPlaneAddress = "10.231.${rack}.1";
    tokenFile = secret "node-token";
    tls = { certFile = secret "node.pem"; keyFile = secret "node.key"; };
    heartbeatSecs = 1;
    pools.default = { model = "smollm2"; slots = 2; ctx = 1024; threads = 1; };
  };
in
{
  controlPlane = {
    host = "cp";
    addresses = [ "10.231.2.1" "10.231.3.1" ];
    port = 8443;
    tls = { certFile = secret "cp.pem"; keyFile = secret "cp.key"; };
    apiKeysFile = secret "api-keys";
    nodeTokensFile = secret "node-tokens";
  };
  caFile = secret "ca.pem";
  models.smollm2 = {
    id = "smollm2-135m";
    source = "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf";
    sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
  };
  workers = {
    w2 = worker "2";
    w3 = worker "3";
  };
}
