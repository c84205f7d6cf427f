# services.llama-orch: one option set for the three roles of docs/ARCHITECTURE.md.
#
#   home           orchestratord and pool-managerd on one machine, node API on a Unix socket
#   control-plane  orchestratord only: the public API, the queue, placement
#   worker         pool-managerd, its provisioner and its engines; registers with a control plane
#
# The units come from the package (systemd.packages, the same files the appliance test boots);
# this module adds drop-ins (listen addresses, credentials, environment, GPU devices, what
# `nixos-rebuild switch` restarts or reloads), renders /etc/llama-orch/node.toml, creates the
# users and opens the firewall when asked.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.llama-orch;
  render = import ./lib/render.nix { inherit lib; };
  inherit (lib) mkOption mkEnableOption mkIf types literalExpression;

  idType = types.strMatching "[A-Za-z0-9_.-]{1,64}";
  # A secret is a file on the host, never in the Nix store (world-readable): an absolute path
  # as a string. lib.types.pathWith (nixpkgs 25.05) refuses a Nix path, a relative path and a
  # store path with one message; an older lib gets the same rule by hand.
  secretPath =
    if types ? pathWith then types.pathWith { inStore = false; absolute = true; }
    else
      types.addCheck (types.strMatching "/.*") (p: !lib.hasPrefix "${builtins.storeDir}/" p) // {
        description = "absolute path not in the Nix store";
      };
  fileOption = description: mkOption {
    type = types.nullOr secretPath;
    default = null;
    example = "/run/secrets/llama-orch/${description}";
    description = ''
      Path of the ${description} file on the host. It is handed to the daemon with
      `LoadCredential=` and never copied into the Nix store: an absolute path as a string, not a
      Nix path (which would copy the secret into the world-readable store).
    '';
  };
  settingsFormat = pkgs.formats.toml { };

  modelType = types.submodule {
    options = {
      id = mkOption {
        type = types.str;
        example = "smollm2-135m";
        description = "The id clients ask for (`model` in /v1, `model_ref` in /v2).";
      };
      source = mkOption {
        type = types.oneOf [
          types.path
          types.str
          (types.submodule {
            options = {
              url = mkOption { type = types.str; description = "Where Nix fetches the GGUF file."; };
              sha256 = mkOption { type = types.strMatching "[0-9a-f]{64}"; description = "Its sha256, in hex."; };
            };
          })
        ];
        example = literalExpression ''{ url = "https://example.org/model.gguf"; sha256 = "b179…"; }'';
        description = ''
          The GGUF file. A Nix path is copied into the store; `{ url; sha256; }` is fetched by
          Nix as a fixed-output derivation; a string (an absolute path, `file:` or `http(s)://`
          URL) is staged by engine-provisioner when the pool starts.
        '';
      };
      sha256 = mkOption {
        type = types.nullOr (types.strMatching "[0-9a-f]{64}");
        default = null;
        description = ''
          The file's sha256 (hex), checked by the provisioner before the engine loads it.
          Required for `http(s)://` sources; taken from `source.sha256` when Nix fetches it.
        '';
      };
      allowHttp = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Let engine-provisioner fetch a plain `http://` source on another host (anyone on the
          path sees which model is fetched and can cut it off; the sha256 still decides what
          is staged). Loopback is always allowed.
        '';
      };
    };
  };

  poolType = types.submodule {
    options = {
      model = mkOption { type = modelType; description = "The model this pool serves."; };
      slots = mkOption { type = types.ints.between 1 64; default = 4; description = "Parallel sequences."; };
      ctx = mkOption { type = types.ints.between 64 1048576; default = 2048; description = "Context per slot, in tokens."; };
      gpus = mkOption {
        type = types.listOf (types.either types.ints.unsigned
          (types.strMatching "GPU-[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"));
        default = [ ];
        example = [ 0 1 ];
        description = ''
          The GPUs this pool's engine uses: CUDA device indices in PCI bus order, or GPU UUIDs
          from `nvidia-smi -L` ("GPU-…"), not mixed. Empty: CPU. The model is fitted to their
          free memory before it loads (every layer offloaded when it fits). The engine unit may
          open exactly these /dev/nvidiaN and the driver's control devices; for UUIDs the
          package's systemd generator finds the device nodes at boot. Needs the CUDA package.
        '';
      };
      gpuOnly = mkOption {
        type = types.bool;
        default = false;
        description = "Refuse the pool when the model does not fit its GPUs' free memory, instead of running the layers that do not fit on the CPU.";
      };
      embeddings = mkOption {
        type = types.bool;
        default = false;
        description = "Serve embeddings (/v1/embeddings, /api/embed) from this pool too: the engine keeps a context of ctx tokens for them beside its slots.";
      };
      threads = mkOption { type = types.nullOr types.ints.positive; default = null; description = "CPU threads of the engine (default: one per core)."; };
      onDemand = mkOption { type = types.bool; default = false; description = "Load the model on the first request instead of at start."; };
      pinned = mkOption {
        type = types.bool;
        default = false;
        description = "On-demand pools: never unloaded to make room for another pool (its keep-alive still unloads it).";
      };
      keepAliveSecs = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = "On-demand pools: seconds without a request before the engine unloads (0: never). Default 300.";
      };
      memoryMaxMiB = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = "The engine unit's MemoryMax= in MiB (0: none). Default: sized from the model and the KV cache.";
      };
    };
  };

  isHome = cfg.role == "home";
  # Home: where llama-orch-node-token.service writes the node token of this machine's own
  # node agent (root's, mode 0700; the daemons get the files with LoadCredential=).
  secretsDir = "/var/lib/llama-orch-secrets";
  isControl = cfg.role == "control-plane";
  isWorker = cfg.role == "worker";
  runsApi = isHome || isControl;
  runsNode = isHome || isWorker;

  apiListen = render.hostPort cfg.api.address cfg.api.port;
  apiLoopback = render.isLoopback cfg.api.address;
  apiTls = cfg.api.tls.certFile != null && cfg.api.tls.keyFile != null;
  nodeListen =
    if isHome then "unix:/run/llama-orch/pool-managerd.sock"
    else render.hostPort cfg.node.address cfg.node.port;
  nodeTls = cfg.node.tls.certFile != null && cfg.node.tls.keyFile != null;
  # Home: orchestratord's local socket (orchestratord-local.socket, plain HTTP on a Unix socket
  # of the group llama-orch), whatever api.address is: a LAN address with TLS has no loopback
  # plain-HTTP listener for the node agent to reach.
  localApi = "/run/llama-orch/orchestratord.sock";
  controlPlane =
    if cfg.node.controlPlane != null then cfg.node.controlPlane
    else "unix:${localApi}";
  # What `nixos-rebuild switch` must apply: a change of [node] restarts pool-managerd, a change
  # of the pools reloads it (SIGHUP applies added, removed and changed pools in place).
  nodeSection = render.nodeSection { node = cfg.node; listen = nodeListen; inherit controlPlane; inherit (cfg) settings; };
  poolsSection = render.poolsSection { inherit pools; inherit (cfg) settings; };

  # A Nix path or a derivation is in the store; `{ url; sha256; }` is fetched into it.
  inStore = src: builtins.isPath src || lib.isDerivation src;
  resolveSource = m:
    if inStore m.source then "${m.source}"
    else if builtins.isAttrs m.source then
      "${pkgs.fetchurl { inherit (m.source) url sha256; name = baseNameOf m.source.url; }}"
    else m.source;
  modelSha = m: if builtins.isAttrs m.source && !inStore m.source then m.source.sha256 else m.sha256;
  pools = lib.mapAttrs
    (_: p: p // { model = p.model // { resolvedSource = resolveSource p.model; sha256 = modelSha p.model; }; })
    cfg.pools;

  gpuPools = lib.filterAttrs (_: p: p.gpus != [ ]) cfg.pools;
  cudaPackage = cfg.package.cudaSupport or false;
  # The NVIDIA driver on the host: its kernel module and device nodes, and its user-space
  # libraries (libcuda, libnvidia-ml) in /run/opengl-driver/lib, where the CUDA package looks.
  nvidiaDriver = config.hardware.graphics.enable
    && (lib.elem "nvidia" config.services.xserver.videoDrivers || config.hardware.nvidia.datacenter.enable);
  # The drop-in of a unit that opens NVIDIA devices: none but these (DevicePolicy=closed), and
  # /proc/driver/nvidia, which the driver's libraries read.
  nvidiaDevices = allow: {
    PrivateDevices = false;
    DevicePolicy = "closed";
    DeviceAllow = allow;
    ProcSubset = "all";
  };

  # Rendered from settings (the keys the module does not model), so they may not repeat a key
  # the module writes: TOML refuses a key given twice.
  settingsProblems =
    let
      clash = keys: attrs: lib.intersectLists keys (lib.attrNames attrs);
      node = cfg.settings.node or { };
      poolSettings = cfg.settings.pools or { };
    in
    map (k: "services.llama-orch.settings: node.toml has [node] and [[pools]] only, not \"${k}\".")
      (lib.subtractLists [ "node" "pools" ] (lib.attrNames cfg.settings))
    ++ lib.optional (!builtins.isAttrs node) "services.llama-orch.settings.node must be an attribute set (the keys of [node])."
    ++ lib.optional (!builtins.isAttrs poolSettings) "services.llama-orch.settings.pools must be an attribute set: pool id -> keys of its [[pools]] table."
    ++ map (k: "services.llama-orch.settings.node.${k} is written by the module: set its option instead (docs/NIXOS.md, \"Options\").")
      (lib.optionals (builtins.isAttrs node) (clash render.nodeKeys node))
    ++ lib.optionals (builtins.isAttrs poolSettings) (lib.concatLists (lib.mapAttrsToList
      (id: extra:
        if !(cfg.pools ? ${id}) then [ "services.llama-orch.settings.pools.${id}: there is no pool ${id} in services.llama-orch.pools." ]
        else if !builtins.isAttrs extra then [ "services.llama-orch.settings.pools.${id} must be an attribute set (keys of its [[pools]] table)." ]
        else map (k: "services.llama-orch.settings.pools.${id}.${k} is written by the module: set services.llama-orch.pools.${id}'s option instead.") (clash render.poolKeys extra))
      poolSettings));

  poolAssertions = lib.concatLists (lib.mapAttrsToList
    (name: p: [
      {
        assertion = builtins.match "[A-Za-z0-9_.-]{1,64}" name != null;
        message = "services.llama-orch.pools.\"${name}\": a pool id is 1 to 64 of A-Za-z0-9_.- (it names the pool's units).";
      }
      {
        assertion = !p.pinned || p.onDemand;
        message = "services.llama-orch.pools.${name}.pinned is set but onDemand is false: only on-demand pools are unloaded to make room.";
      }
      {
        assertion = p.keepAliveSecs == null || p.onDemand;
        message = "services.llama-orch.pools.${name}.keepAliveSecs is set but onDemand is false: only on-demand pools unload.";
      }
      {
        assertion = !(builtins.isString p.model.source && builtins.match "https?://.*" p.model.source != null) || p.model.sha256 != null;
        message = "services.llama-orch.pools.${name}.model: a URL source (${toString p.model.source}) needs model.sha256, so the provisioner can verify what it downloads.";
      }
      {
        assertion = p.gpus == [ ] || cudaPackage;
        message = "services.llama-orch.pools.${name}.gpus is set but services.llama-orch.package is a CPU build: use a CUDA build (the flake's packages.<system>.cuda, or pkgs.llama-orch of a nixpkgs with config.cudaSupport = true).";
      }
      {
        assertion = p.gpus == [ ] || nvidiaDriver;
        message = "services.llama-orch.pools.${name}.gpus is set but the NVIDIA driver is not: set hardware.graphics.enable = true (libcuda and libnvidia-ml in /run/opengl-driver/lib) and services.xserver.videoDrivers = [ \"nvidia\" ] (the driver, also on a host without X; or hardware.nvidia.datacenter.enable = true), with hardware.nvidia.open chosen for your GPU.";
      }
      {
        assertion = lib.all builtins.isInt p.gpus || lib.all builtins.isString p.gpus;
        message = "services.llama-orch.pools.${name}.gpus mixes CUDA indices and UUIDs: name every GPU the same way.";
      }
      {
        assertion = !p.gpuOnly || p.gpus != [ ];
        message = "services.llama-orch.pools.${name}.gpuOnly is for GPU pools: give the pool gpus, or remove gpuOnly.";
      }
    ])
    cfg.pools);
in
{
  options.services.llama-orch = {
    enable = mkEnableOption "llama-orch, serving language models from this machine's GPUs (or CPUs)";

    package = lib.mkPackageOption pkgs "llama-orch" {
      extraDescription = ''
        Binaries, units, sysusers, tmpfiles, D-Bus and polkit files. `pkgs.llama-orch` comes from
        the flake's `overlays.default` (built with nixpkgs' `config`: `cudaSupport = true` gives
        the CUDA engine); the flake's `nixosModules.default` sets the flake's own package. Use a
        CUDA build (the flake's `packages.<system>.cuda`) for GPU pools.
      '';
    };

    settings = mkOption {
      type = settingsFormat.type;
      default = { };
      example = literalExpression ''
        {
          node.launcher = "systemd";
          pools.default.prefix_cache_mib = 512;
        }
      '';
      description = ''
        Keys of /etc/llama-orch/node.toml the module does not model (docs/CONFIGURATION.md,
        `pool-managerd`): `node` adds keys to `[node]`, `pools.<id>` to that pool's `[[pools]]`
        table. A key the module writes from its options is refused (set the option); pool-managerd
        refuses unknown keys, so `pool-managerd --config /etc/llama-orch/node.toml --check-config`
        (run before each start) names a misspelt one.
      '';
    };

    role = mkOption {
      type = types.enum [ "home" "control-plane" "worker" ];
      default = "home";
      description = "`home`: everything on this machine. `control-plane`: orchestratord only. `worker`: pool-managerd and its engines.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the API port (home, control-plane) or the node API port (worker) in the firewall.";
    };

    logLevel = mkOption {
      type = types.str;
      default = "info";
      example = "info,orchestratord=debug";
      description = "The daemons' log filter (`LLORCH_LOG`).";
    };

    api = {
      address = mkOption { type = types.str; default = "127.0.0.1"; example = "0.0.0.0"; description = "Address of the public API (OpenAI `/v1` and native `/v2`)."; };
      port = mkOption { type = types.port; default = 8080; description = "Port of the public API."; };
      tls = {
        certFile = fileOption "tls-cert" // { description = "PEM certificate chain of the API (server certificate first). With keyFile, the API speaks only TLS."; };
        keyFile = fileOption "tls-key" // { description = "PEM private key of api.tls.certFile."; };
      };
      apiKeysFile = fileOption "api-keys" // { description = "Client API keys, one `NAME KEY [admin]` per line; required off loopback."; };
      nodeTokensFile = fileOption "node-tokens" // { description = "Node tokens, one `NODE_ID TOKEN` per line. Home: generated at first start when unset."; };
      nodeCaFile = fileOption "node-ca" // { description = "PEM CA that signed the workers' node API certificates."; };
      allowPlaintext = mkOption { type = types.bool; default = false; description = "Allow plain HTTP across the network (logged as a warning)."; };
      queueCapacity = mkOption { type = types.ints.between 1 1000000; default = 256; description = "Tasks that may wait."; };
      admissionPolicy = mkOption { type = types.enum [ "reject" "drop-lru" ]; default = "reject"; description = "A full queue rejects (429) or evicts the oldest batch task."; };
      offlineAfterBeats = mkOption { type = types.ints.between 2 20; default = 3; description = "Missed heartbeats after which a node is offline."; };
      beats = mkOption {
        type = types.bool;
        default = cfg.role == "control-plane";
        defaultText = lib.literalExpression ''config.services.llama-orch.role == "control-plane"'';
        description = "Read nodes' liveness beats on UDP api.port (orchestratord-beats.socket): a worker whose state did not change sends a 52-byte authenticated datagram each interval instead of an HTTPS heartbeat (docs/API.md, \"Liveness beats\"). Off: workers heartbeat over HTTPS every interval.";
      };
      extraEnvironment = mkOption {
        type = types.attrsOf types.str;
        default = { };
        example = { LLORCH_SESSION_TTL_SECS = "900"; };
        description = "Other orchestratord settings, as the `LLORCH_*` variables of docs/CONFIGURATION.md.";
      };
    };

    node = {
      id = mkOption {
        type = idType;
        default = config.networking.hostName;
        defaultText = literalExpression "config.networking.hostName";
        description = "This node's id (1 to 64 of A-Za-z0-9_.-), unique in the cluster.";
      };
      controlPlane = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://cp.example.internal:8443";
        description = "Worker: the control plane's URL. Home: default `unix:/run/llama-orch/orchestratord.sock`, orchestratord's local socket (orchestratord-local.socket), whatever api.address is.";
      };
      controlPlaneCaFile = fileOption "control-plane-ca" // { description = "PEM CA the control plane's certificate is verified against."; };
      address = mkOption { type = types.str; default = "127.0.0.1"; example = "10.0.0.2"; description = "Worker: address of the node API, where the control plane dispatches work."; };
      port = mkOption { type = types.port; default = 9200; description = "Worker: port of the node API."; };
      advertise = mkOption { type = types.nullOr types.str; default = null; description = "Where the control plane reaches the node API (required for wildcard addresses)."; };
      tokenFile = fileOption "node-token" // { description = "This node's token (the control plane lists it under node.id). Home: generated at first start when unset."; };
      tls = {
        certFile = fileOption "tls-cert" // { description = "Worker: PEM certificate of the node API; it must name node.address (or advertise)."; };
        keyFile = fileOption "tls-key" // { description = "Worker: PEM private key of node.tls.certFile."; };
      };
      allowPlaintext = mkOption { type = types.bool; default = false; description = "Allow plain HTTP across the network (logged as a warning)."; };
      heartbeatSecs = mkOption { type = types.ints.between 1 300; default = 5; description = "Seconds between heartbeats."; };
      metricsListen = mkOption { type = types.nullOr types.str; default = null; example = "0.0.0.0:9201"; description = "A metrics-only listener for Prometheus."; };
      memoryBudgetMiB = mkOption {
        type = types.nullOr (types.ints.between 64 1073741824);
        default = null;
        description = "Host memory (MiB) CPU pools' engines may hold together, each charged its memory bound; a request for an on-demand pool that does not fit unloads idle on-demand pools first, least recently used first. Default: three quarters of MemAvailable when pool-managerd starts.";
      };
      gpuMemoryBudgetMiB = mkOption {
        type = types.nullOr (types.ints.between 64 1073741824);
        default = null;
        description = "Memory (MiB) of each GPU that GPU pools may hold together. Default: the GPU's total memory (NVML).";
      };
      maxLoaded = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        description = "The most pools loaded at once, always-loaded ones included (default: no limit but the budgets).";
      };
      minResidentSecs = mkOption {
        type = types.nullOr (types.ints.between 0 3600);
        default = null;
        description = "A pool loaded less than this many seconds ago is not unloaded to make room for another (default 10).";
      };
    };

    pools = mkOption {
      type = types.attrsOf poolType;
      default = { };
      example = literalExpression ''
        {
          default = {
            model = { id = "smollm2-135m"; source = "/var/lib/models/SmolLM2-135M-Instruct.Q4_1.gguf";
                      sha256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"; };
            slots = 4;
            ctx = 2048;
          };
        }
      '';
      description = "The pools of this node (home, worker): one engine each.";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !isControl || cfg.pools == { };
        message = "services.llama-orch.pools is set on a control-plane host: pools run on workers (role = \"worker\").";
      }
      {
        assertion = !runsNode || cfg.pools != { };
        message = "services.llama-orch.pools is empty: a ${cfg.role} host serves models from its pools; declare at least one.";
      }
      {
        assertion = !runsApi || apiLoopback || cfg.api.apiKeysFile != null;
        message = "services.llama-orch.api.address ${cfg.api.address} is not loopback: set services.llama-orch.api.apiKeysFile, or anyone who reaches it may use the API.";
      }
      {
        assertion = !isControl || cfg.api.nodeTokensFile != null;
        message = "services.llama-orch.api.nodeTokensFile is required on a control plane: it lists the token of each worker's node id.";
      }
      {
        assertion = !runsApi || apiLoopback || apiTls || cfg.api.allowPlaintext;
        message = "services.llama-orch.api.address ${cfg.api.address} is not loopback: set api.tls.certFile and api.tls.keyFile (or api.allowPlaintext = true to send keys and prompts in the clear).";
      }
      {
        assertion = (cfg.api.tls.certFile == null) == (cfg.api.tls.keyFile == null);
        message = "services.llama-orch.api.tls: set both certFile and keyFile, or neither.";
      }
      {
        assertion = !isWorker || cfg.node.controlPlane != null;
        message = "services.llama-orch.node.controlPlane is required on a worker: the URL of the control plane it registers with.";
      }
      {
        assertion = !isWorker || cfg.node.tokenFile != null;
        message = "services.llama-orch.node.tokenFile is required on a worker: the token the control plane lists under node.id \"${cfg.node.id}\".";
      }
      {
        assertion = !isWorker || render.isLoopback cfg.node.address || nodeTls || cfg.node.allowPlaintext;
        message = "services.llama-orch.node.address ${cfg.node.address} is not loopback: set node.tls.certFile and node.tls.keyFile (or node.allowPlaintext = true).";
      }
      {
        assertion = (cfg.node.tls.certFile == null) == (cfg.node.tls.keyFile == null);
        message = "services.llama-orch.node.tls: set both certFile and keyFile, or neither.";
      }
      {
        assertion = !isWorker || cfg.node.controlPlane == null || cfg.node.allowPlaintext || !(lib.hasPrefix "http://" cfg.node.controlPlane)
          || builtins.match "http://(127[.][0-9.]+|localhost|[[]::1[]])(:[0-9]+)?/?" cfg.node.controlPlane != null;
        message = "services.llama-orch.node.controlPlane ${toString cfg.node.controlPlane} is plain HTTP to another host: use https:// (or node.allowPlaintext = true).";
      }
    ] ++ lib.optionals runsNode poolAssertions
    ++ map (message: { assertion = false; inherit message; }) (
      if runsNode then settingsProblems
      else lib.optional (cfg.settings != { }) "services.llama-orch.settings is for node.toml, which a control-plane host does not have: orchestratord's settings are api.* and api.extraEnvironment."
    );

    environment.systemPackages = [ cfg.package ];
    systemd.packages = [ cfg.package ];
    systemd.tmpfiles.packages = [ cfg.package ];
    services.dbus.packages = [ cfg.package ];
    # pool-managerd starts its engine units over systemd's API; these rules allow exactly that
    # (and let the group llama-orch-admin use the D-Bus methods). The action file comes with
    # the package (share/polkit-1/actions).
    security.polkit.enable = true;
    security.polkit.extraConfig = builtins.readFile ../systemd/llama-orch.polkit.rules;

    users.users = {
      llama-orch = { isSystemUser = true; group = "llama-orch"; home = "/var/lib/llama-orch"; description = "llama-orch node agent and provisioner"; };
      llama-orch-api = { isSystemUser = true; group = "llama-orch-api"; description = "llama-orch control plane"; };
      llama-orch-engine = { isSystemUser = true; group = "llama-orch-engine"; description = "llama-orch engines"; };
      llama-orch-provisioner = { isSystemUser = true; group = "llama-orch-provisioner"; description = "llama-orch model provisioner"; };
    };
    users.groups = {
      llama-orch = { };
      llama-orch-api = { };
      llama-orch-engine = { };
      llama-orch-provisioner = { };
      llama-orch-admin = { };
    };

    environment.etc = mkIf runsNode {
      "llama-orch/node.toml".text = render.nodeToml {
        node = cfg.node;
        listen = nodeListen;
        inherit controlPlane pools;
        inherit (cfg) settings;
      };
    };

    systemd.targets.llama-orch = mkIf isHome { overrideStrategy = "asDropin"; wantedBy = [ "multi-user.target" ]; };

    # Sockets on an IP address bind with FreeBind=: at boot they start before the network is
    # configured (sockets.target), when a specific address is not on an interface yet.
    systemd.sockets = {
      orchestratord =
        if runsApi then {
          overrideStrategy = "asDropin";
          wantedBy = [ "sockets.target" ];
          socketConfig = { ListenStream = [ "" apiListen ]; FreeBind = true; };
        } else { enable = false; };
      # The package's unit listens on loopback; this puts it on the API's address and port.
      orchestratord-beats = mkIf (runsApi && cfg.api.beats) {
        overrideStrategy = "asDropin";
        wantedBy = [ "sockets.target" ];
        socketConfig = { ListenDatagram = [ "" apiListen ]; FreeBind = true; };
      };
      # Home: orchestratord's API in plain HTTP on a Unix socket, for this machine's node agent
      # (node.toml's control_plane). A worker runs no orchestratord: masked, as its other units.
      orchestratord-local =
        if isHome then {
          overrideStrategy = "asDropin";
          wantedBy = [ "sockets.target" ];
        } else if isWorker then { enable = false; } else { };
      pool-managerd = mkIf runsNode {
        overrideStrategy = "asDropin";
        wantedBy = [ "sockets.target" ];
        socketConfig = mkIf isWorker { ListenStream = [ "" nodeListen ]; FreeBind = true; };
      };
    };

    systemd.services = {
      orchestratord =
        if runsApi then
          let
            serviceConfig = {
              Environment = render.apiEnvironment { inherit (cfg) api logLevel; listen = apiListen; };
              LoadCredential = render.credentials {
                node-tokens = if cfg.api.nodeTokensFile != null then cfg.api.nodeTokensFile else "${secretsDir}/node-tokens";
                api-keys = cfg.api.apiKeysFile;
                tls-cert = cfg.api.tls.certFile;
                tls-key = cfg.api.tls.keyFile;
                node-ca = cfg.api.nodeCaFile;
              };
            };
          in
          {
            overrideStrategy = "asDropin";
            inherit serviceConfig;
            # Its settings and the paths of its credentials: a change restarts it on switch
            # (LoadCredential= is read at start only). A changed key file is not seen here:
            # `systemctl restart orchestratord` after editing one (docs/NIXOS.md).
            restartTriggers = serviceConfig.Environment ++ serviceConfig.LoadCredential;
          } else { enable = false; };
      pool-managerd = mkIf runsNode {
        overrideStrategy = "asDropin";
        wantedBy = [ "multi-user.target" ];
        restartTriggers = [ nodeSection ];
        reloadTriggers = [ poolsSection ];
        serviceConfig = {
          Environment = [ "LLORCH_LOG=${cfg.logLevel}" ];
          LoadCredential = render.credentials {
            node-token = if cfg.node.tokenFile != null then cfg.node.tokenFile else "${secretsDir}/node-token";
            tls-cert = cfg.node.tls.certFile;
            tls-key = cfg.node.tls.keyFile;
            control-plane-ca = cfg.node.controlPlaneCaFile;
          };
        }
        # GPU nodes: NVML (libnvidia-ml) reads every GPU of the node for its reports and the
        # fit check, and numbers them as the driver does only when it can open them all: the
        # driver's GPU device class (major 195: /dev/nvidiaN and /dev/nvidiactl, named
        # nvidia-frontend or nvidia in /proc/devices), not nvidia-uvm (CUDA's, the engines').
        // lib.optionalAttrs (gpuPools != { }) (nvidiaDevices [ "/dev/nvidiactl rw" "char-nvidia-frontend rw" "char-nvidia rw" ]);
      };
      # Home only: the node token of this machine's own node agent, generated once (its shell
      # line needs od, tr and mv, which NixOS keeps out of systemd's default PATH). Under
      # /var/lib, not the package's /etc/llama-orch: NixOS owns /etc, state lives in /var/lib.
      llama-orch-node-token =
        if isHome then {
          overrideStrategy = "asDropin";
          path = [ pkgs.coreutils ];
          # An empty ConditionPathExists= drops the unit's conditions on /etc/llama-orch.
          unitConfig.ConditionPathExists = [ "" "!${secretsDir}/node-token" "!${secretsDir}/node-tokens" ];
          serviceConfig = {
            ConfigurationDirectory = [ "" ];
            StateDirectory = baseNameOf secretsDir;
            StateDirectoryMode = "0700";
            WorkingDirectory = secretsDir;
          };
        } else { enable = false; };
    } // lib.mapAttrs'
      # What llama-orch-gpu-generator writes elsewhere (pool_managerd::gpu::engine_dropin;
      # tests/nix.rs compares the two): exactly the pool's GPUs and the driver's shared nodes.
      (name: p: lib.nameValuePair "llorch-engine@${name}" {
        overrideStrategy = "asDropin";
        serviceConfig = {
          Environment = [
            "CUDA_DEVICE_ORDER=PCI_BUS_ID"
            "CUDA_VISIBLE_DEVICES=${lib.concatMapStringsSep "," toString p.gpus}"
          ];
        } // nvidiaDevices ([ "/dev/nvidiactl rw" "/dev/nvidia-uvm rw" "/dev/nvidia-uvm-tools rw" "char-nvidia-caps r" ]
          ++ map (i: "/dev/nvidia${toString i} rw") (lib.filter builtins.isInt p.gpus));
      })
      (if runsNode then gpuPools else { });

    # GPUs named by UUID: the device node of each is known only once the driver runs, so the
    # package's generator (which reads the node.toml above) adds it at boot.
    systemd.generators = mkIf (runsNode && lib.any (p: lib.any builtins.isString p.gpus) (lib.attrValues cfg.pools)) {
      llama-orch-gpu-generator = "${cfg.package}/lib/systemd/system-generators/llama-orch-gpu-generator";
    };

    networking.firewall.allowedUDPPorts = mkIf cfg.openFirewall (
      lib.optional (runsApi && cfg.api.beats && !apiLoopback) cfg.api.port
    );
    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall (
      lib.optional (runsApi && !apiLoopback) cfg.api.port
      ++ lib.optional (isWorker && !(render.isLoopback cfg.node.address)) cfg.node.port
    );
  };
}
