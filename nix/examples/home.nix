# A home box: the whole stack on one machine, the API on loopback, one pool on the CPU (add
# `gpus = [ 0 ];` and the cuda package for a GPU). The node token between its two daemons is
# generated at first boot.
{
  services.llama-orch = {
    enable = true;
    role = "home";
    pools.default = {
      model = {
        id = "smollm2-135m";
        source = "/srv/models/SmolLM2-135M-Instruct.Q4_1.gguf";
        sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
      };
      slots = 2;
      ctx = 1024;
    };
  };
}
