# An OCI image of the home stack: `llorch up` (orchestratord, pool-managerd and one engine as
# child processes, no systemd) on one model, listening on port 8080 of the container.
#
# The model is mounted at /models/model.gguf (`-v ./m.gguf:/models/model.gguf:ro`), or built
# into the image when `model` is given (a fixed-output derivation, e.g. `fetchurl` with its
# sha256: fetched and checked by Nix, and checked again by the provisioner at every start).
# Off loopback `llorch up` needs API keys: mount a key file (`NAME KEY` lines, mode 0600) at
# /etc/llama-orch/api-keys. Runs as nobody; the model cache is the volume /var/cache/llama-orch.
#
# The CUDA variant is the same with the CUDA package: the container sees the host's driver
# through the NVIDIA Container Toolkit (`--gpus all`, or CDI `--device nvidia.com/gpu=all`),
# which mounts libcuda and libnvidia-ml into the container; LD_LIBRARY_PATH names where the
# toolkit puts them.
{ lib
, dockerTools
, cacert
, llama-orch
, model ? null
, modelId ? "model"
, cuda ? false
}:
let
  modelPath = if model == null then "/models/model.gguf" else "${model}";
in
dockerTools.streamLayeredImage {
  name = if cuda then "llama-orch-cuda" else "llama-orch";
  tag = llama-orch.version;
  contents = [ llama-orch cacert ] ++ lib.optional (model != null) model;
  # World-writable (sticky) directories for the unprivileged user: /tmp for llorch up's runtime
  # directory, HOME for its tokens, the model cache.
  extraCommands = ''
    mkdir -p tmp var/lib/llama-orch var/cache/llama-orch etc/llama-orch models
    chmod 1777 tmp var/lib/llama-orch var/cache/llama-orch
  '';
  config = {
    User = "65534:65534";
    WorkingDir = "/var/lib/llama-orch";
    Entrypoint = [ "${llama-orch}/bin/llorch" "up" ];
    Cmd = [
      "--model"
      modelPath
      "--model-id"
      modelId
      "--listen"
      "0.0.0.0:8080"
      "--api-keys"
      "/etc/llama-orch/api-keys"
      "--cache"
      "/var/cache/llama-orch"
    ] ++ lib.optionals (model != null && model ? outputHash) [ "--sha256" model.outputHash ];
    Env = [
      "HOME=/var/lib/llama-orch"
      "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
    ] ++ lib.optionals cuda [
      "NVIDIA_VISIBLE_DEVICES=all"
      "NVIDIA_DRIVER_CAPABILITIES=compute,utility"
      "LD_LIBRARY_PATH=/usr/lib64:/usr/lib/x86_64-linux-gnu:/usr/local/nvidia/lib64"
    ];
    ExposedPorts."8080/tcp" = { };
    Volumes."/var/cache/llama-orch" = { };
    Labels = {
      "org.opencontainers.image.title" = "llama-orch";
      "org.opencontainers.image.description" = "llama-orch's home stack (llorch up) on one model";
      "org.opencontainers.image.licenses" = "Apache-2.0";
      "org.opencontainers.image.version" = llama-orch.version;
    };
  };
}
