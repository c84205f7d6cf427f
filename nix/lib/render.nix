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

  # A TOML value (services.llama-orch.settings): strings, integers, floats, booleans, lists and
  # inline tables; null drops the key.
  key = k: if builtins.match "[A-Za-z0-9_-]+" k != null then k else str k;
  value = v:
    if builtins.isString v || builtins.isPath v then str "${v}"
    else if builtins.isBool v then lib.boolToString v
    else if builtins.isInt v || builtins.isFloat v then toString v
    else if builtins.isList v then "[${concatStringsSep ", " (map value v)}]"
    else if builtins.isAttrs v then "{ ${concatStringsSep ", " (keyValues v)} }"
    else throw "llama-orch: ${builtins.typeOf v} is not a TOML value";
  keyValues = attrs: mapAttrsToList (k: v: "${key k} = ${value v}") (lib.filterAttrs (_: v: v != null) attrs);

  # One [[pools]] table; `extra`: more keys of it (settings.pools.<id>).
  poolToml = extra: id: p: concatStringsSep "\n" (
    [
      "[[pools]]"
      "id = ${str id}"
      "slots = ${toString p.slots}"
      "ctx = ${toString p.ctx}"
    ]
    ++ optional (p.gpus != [ ] && lib.all builtins.isInt p.gpus) "devices = ${str "cuda:${concatStringsSep "," (map toString p.gpus)}"}"
    ++ optional (p.gpus != [ ] && lib.all builtins.isString p.gpus) "devices = [${concatStringsSep ", " (map str p.gpus)}]"
    ++ optional (p.gpuOnly or false) "gpu_only = true"
    ++ optional (p.embeddings or false) "embeddings = true"
    ++ optional (p.threads != null) "threads = ${toString p.threads}"
    ++ optional p.onDemand "on_demand = true"
    ++ optional (p.pinned or false) "pinned = true"
    ++ optional (p.keepAliveSecs != null) "keep_alive_secs = ${toString p.keepAliveSecs}"
    ++ optional (p.memoryMaxMiB != null) "memory_max_mib = ${toString p.memoryMaxMiB}"
    ++ keyValues (extra.${id} or { })
    ++ [
      ""
      "[pools.model]"
      "id = ${str p.model.id}"
      "source = ${str p.model.resolvedSource}"
    ]
    ++ optional (p.model.sha256 != null) "sha256 = ${str p.model.sha256}"
    ++ optional (p.model.allowHttp or false) "allow_http = true"
  );

  # node.toml's [node] table (restart: pool-managerd applies it only when it starts) and its
  # pools (reload: SIGHUP applies added, removed and changed pools). `settings`: the keys the
  # module does not model, `node` for [node] and `pools.<id>` for a pool's table.
  nodeSection = { node, listen, controlPlane, settings ? { } }:
    concatStringsSep "\n"
      (
        [
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
        ++ optional ((node.memoryBudgetMiB or null) != null) "memory_budget_mib = ${toString node.memoryBudgetMiB}"
        ++ optional ((node.gpuMemoryBudgetMiB or null) != null) "gpu_memory_budget_mib = ${toString node.gpuMemoryBudgetMiB}"
        ++ optional ((node.maxLoaded or null) != null) "max_loaded = ${toString node.maxLoaded}"
        ++ optional ((node.minResidentSecs or null) != null) "min_resident_secs = ${toString node.minResidentSecs}"
        ++ keyValues (settings.node or { })
      ) + "\n";
  poolsSection = { pools, settings ? { } }:
    lib.concatMapStrings (p: "\n${p}\n") (mapAttrsToList (poolToml (settings.pools or { })) pools);

  # The keys the module writes itself (settings may not repeat them: TOML refuses a key twice).
  nodeKeys = [ "id" "control_plane" "listen" "advertise" "cache_dir" "runtime_dir" "heartbeat_secs" "allow_plaintext" "metrics_listen" "memory_budget_mib" "gpu_memory_budget_mib" "max_loaded" "min_resident_secs" ];
  poolKeys = [ "id" "slots" "ctx" "devices" "gpu_only" "embeddings" "threads" "on_demand" "pinned" "keep_alive_secs" "memory_max_mib" "model" ];
in
{
  inherit hostPort isLoopback nodeSection poolsSection nodeKeys poolKeys;

  # node.toml (docs/CONFIGURATION.md, `pool-managerd`). `node` is services.llama-orch.node with
  # `listen` and `controlPlane` already chosen for the role; `pools` maps pool ids to their
  # settings, each model with `resolvedSource` (a store path or the run-time source);
  # `settings` is services.llama-orch.settings.
  nodeToml = { node, listen, controlPlane, pools, settings ? { } }:
    ''
      # Written by the llama-orch NixOS module; check with
      # pool-managerd --config /etc/llama-orch/node.toml --check-config
    ''
    + nodeSection { inherit node listen controlPlane settings; }
    + poolsSection { inherit pools settings; };

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
