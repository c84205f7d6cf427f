# services.llama-orch: one option set for the three roles of docs/ARCHITECTURE.md.
#
#   home           orchestratord and pool-managerd on one machine, node API on a Unix socket
#   control-plane  orchestratord only: the public API, the queue, placement
#   worker         pool-managerd, its provisioner and its engines; registers with a control plane
#
# The units come from the package (systemd.packages, the same files the appliance test boots);
# this module adds drop-ins (listen addresses, credentials, environment, GPU devices), renders
# /etc/llama-orch/node.toml, creates the users and opens the firewall when asked.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.llama-orch;
  render = import ./lib/render.nix { inherit lib; };
  inherit (lib) mkOption mkEnableOption mkIf types literalExpression;

  idType = types.strMatching "[A-Za-z0-9_.-]{1,64}";
  fileOption = description: mkOption {
    type = types.nullOr types.str;
    default = null;
    example = "/run/secrets/llama-orch/${description}";
    description = ''
      Path of the ${description} file on the host. It is handed to the daemon with
      `LoadCredential=` and never copied into the Nix store: give a string, not a Nix path.
    '';
  };

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
      threads = mkOption { type = types.nullOr types.ints.positive; default = null; description = "CPU threads of the engine (default: one per core)."; };
      onDemand = mkOption { type = types.bool; default = false; description = "Load the model on the first request instead of at start."; };
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
  controlPlane =
    if cfg.node.controlPlane != null then cfg.node.controlPlane
    else "http://${render.hostPort (if apiLoopback then cfg.api.address else "127.0.0.1") cfg.api.port}";

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

  poolAssertions = lib.concatLists (lib.mapAttrsToList
    (name: p: [
      {
        assertion = builtins.match "[A-Za-z0-9_.-]{1,64}" name != null;
        message = "services.llama-orch.pools.\"${name}\": a pool id is 1 to 64 of A-Za-z0-9_.- (it names the pool's units).";
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
        message = "services.llama-orch.pools.${name}.gpus is set but services.llama-orch.package is a CPU build: use the flake's packages.<system>.cuda.";
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

    package = mkOption {
      type = types.package;
      defaultText = literalExpression "llama-orch.packages.\${system}.default";
      description = "The llama-orch package: binaries, units, sysusers, tmpfiles, D-Bus and polkit files. Use the `cuda` package for GPU pools.";
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
        description = "Worker: the control plane's URL. Home: derived from api.address and api.port.";
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
    ] ++ lib.optionals runsNode poolAssertions;

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
      };
    };

    systemd.targets.llama-orch = mkIf isHome { overrideStrategy = "asDropin"; wantedBy = [ "multi-user.target" ]; };

    systemd.sockets = {
      orchestratord =
        if runsApi then {
          overrideStrategy = "asDropin";
          wantedBy = [ "sockets.target" ];
          socketConfig.ListenStream = [ "" apiListen ];
        } else { enable = false; };
      # The package's unit listens on loopback; this puts it on the API's address and port.
      orchestratord-beats = mkIf (runsApi && cfg.api.beats) {
        overrideStrategy = "asDropin";
        wantedBy = [ "sockets.target" ];
        socketConfig.ListenDatagram = [ "" apiListen ];
      };
      pool-managerd = mkIf runsNode {
        overrideStrategy = "asDropin";
        wantedBy = [ "sockets.target" ];
        socketConfig = mkIf isWorker { ListenStream = [ "" nodeListen ]; };
      };
    };

    systemd.services = {
      orchestratord =
        if runsApi then {
          overrideStrategy = "asDropin";
          serviceConfig = {
            Environment = render.apiEnvironment { inherit (cfg) api logLevel; listen = apiListen; };
            LoadCredential = render.credentials {
              node-tokens = if cfg.api.nodeTokensFile != null then cfg.api.nodeTokensFile else "/etc/llama-orch/node-tokens";
              api-keys = cfg.api.apiKeysFile;
              tls-cert = cfg.api.tls.certFile;
              tls-key = cfg.api.tls.keyFile;
              node-ca = cfg.api.nodeCaFile;
            };
          };
        } else { enable = false; };
      pool-managerd = mkIf runsNode {
        overrideStrategy = "asDropin";
        wantedBy = [ "multi-user.target" ];
        serviceConfig = {
          Environment = [ "LLORCH_LOG=${cfg.logLevel}" ];
          LoadCredential = render.credentials {
            node-token = if cfg.node.tokenFile != null then cfg.node.tokenFile else "/etc/llama-orch/node-token";
            tls-cert = cfg.node.tls.certFile;
            tls-key = cfg.node.tls.keyFile;
            control-plane-ca = cfg.node.controlPlaneCaFile;
          };
        };
      };
      # Home only: the node token of this machine's own node agent, generated once (its shell
      # line needs od, tr and mv, which NixOS keeps out of systemd's default PATH).
      llama-orch-node-token = if isHome then { overrideStrategy = "asDropin"; path = [ pkgs.coreutils ]; } else { enable = false; };
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
          PrivateDevices = false;
          DevicePolicy = "closed";
          DeviceAllow = [ "/dev/nvidiactl rw" "/dev/nvidia-uvm rw" "/dev/nvidia-uvm-tools rw" "char-nvidia-caps r" ]
            ++ map (i: "/dev/nvidia${toString i} rw") (lib.filter builtins.isInt p.gpus);
          ProcSubset = "all";
        };
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
