# What the NixOS module writes, as pure functions of its settings: node.toml for pool-managerd,
# the environment of orchestratord, listen addresses. No pkgs: the offline tests evaluate it with
# nixpkgs' lib alone.
{ lib }:
let
  inherit (lib) concatStringsSep optional optionals mapAttrsToList;

  # A TOML basic string. JSON's escapes (\" \\ \n \uXXXX) are TOML's, so toJSON is exact.
  str = builtins.toJSON;

  # "ip:port" for a socket address; IPv6 literals get brackets.
  hostPort = address: port:
    if lib.hasInfix ":" address then "[${address}]:${toString port}" else "${address}:${toString port}";

  isLoopback = address:
    address == "localhost" || address == "::1" || lib.hasPrefix "127." address;

  poolToml = id: p: concatStringsSep "\n" (
    [
      "[[pools]]"
      "id = ${str id}"
      "slots = ${toString p.slots}"
      "ctx = ${toString p.ctx}"
    ]
    ++ optional (p.gpus != [ ] && lib.all builtins.isInt p.gpus) "devices = ${str "cuda:${concatStringsSep "," (map toString p.gpus)}"}"
    ++ optional (p.gpus != [ ] && lib.all builtins.isString p.gpus) "devices = [${concatStringsSep ", " (map str p.gpus)}]"
    ++ optional (p.gpuOnly or false) "gpu_only = true"
    ++ optional (p.threads != null) "threads = ${toString p.threads}"
    ++ optional p.onDemand "on_demand = true"
    ++ optional (p.keepAliveSecs != null) "keep_alive_secs = ${toString p.keepAliveSecs}"
    ++ optional (p.memoryMaxMiB != null) "memory_max_mib = ${toString p.memoryMaxMiB}"
    ++ [
      ""
      "[pools.model]"
      "id = ${str p.model.id}"
      "source = ${str p.model.resolvedSource}"
    ]
    ++ optional (p.model.sha256 != null) "sha256 = ${str p.model.sha256}"
    ++ optional (p.model.allowHttp or false) "allow_http = true"
  );
in
{
  inherit hostPort isLoopback;

  # node.toml (docs/CONFIGURATION.md, `pool-managerd`). `node` is services.llama-orch.node with
  # `listen` and `controlPlane` already chosen for the role; `pools` maps pool ids to their
  # settings, each model with `resolvedSource` (a store path or the run-time source).
  nodeToml = { node, listen, controlPlane, pools }:
    concatStringsSep "\n"
      (
        [
          "# Written by the llama-orch NixOS module; check with"
          "# pool-managerd --config /etc/llama-orch/node.toml --check-config"
          "[node]"
          "id = ${str node.id}"
          "control_plane = ${str controlPlane}"
          "listen = ${str listen}"
        ]
        ++ optional (node.advertise != null) "advertise = ${str node.advertise}"
        ++ [
          "cache_dir = \"/var/cache/llama-orch/models\""
          "runtime_dir = \"/run/llama-orch\""
          "heartbeat_secs = ${toString node.heartbeatSecs}"
        ]
        ++ optional node.allowPlaintext "allow_plaintext = true"
        ++ optional (node.metricsListen != null) "metrics_listen = ${str node.metricsListen}"
        ++ lib.concatMap (p: [ "" p ]) (mapAttrsToList poolToml pools)
      ) + "\n";

  # orchestratord's settings as the environment variables it reads (one per flag).
  apiEnvironment = { api, listen, logLevel }:
    [
      "LLORCH_LISTEN=${listen}"
      "LLORCH_QUEUE_CAPACITY=${toString api.queueCapacity}"
      "LLORCH_ADMISSION_POLICY=${api.admissionPolicy}"
      "LLORCH_OFFLINE_AFTER_BEATS=${toString api.offlineAfterBeats}"
      "LLORCH_LOG=${logLevel}"
      # The module passes every key file as a credential (LoadCredential=, below): the files
      # the package's unit stages from /etc/llama-orch must not win over them.
      "LLORCH_SECRETS_DIR="
    ]
    ++ optional api.allowPlaintext "LLORCH_ALLOW_PLAINTEXT=true"
    ++ mapAttrsToList (k: v: "${k}=${v}") api.extraEnvironment;

  # `LoadCredential=` lines: the empty first entry drops the unit's own list, so a drop-in
  # states every credential the daemon gets (ids as the daemons look them up).
  credentials = creds:
    [ "" ] ++ lib.concatLists (mapAttrsToList (id: file: optionals (file != null) [ "${id}:${file}" ]) creds);
}
