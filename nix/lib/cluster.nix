# A cluster in one attribute set: the control plane, the workers with their pools, the models
# and the credential files. `hosts` checks it as a whole (what no single host's module can
# see: a worker pointed at an address the control plane does not have, two workers with one
# node id, a pool whose model is not pinned) and returns each host's services.llama-orch
# settings, a NixOS module per host name. docs/NIXOS.md shows it in use.
#
#   {
#     controlPlane = {
#       host = "cp";                      # its NixOS host name
#       addresses = [ "10.0.0.1" ];       # where workers reach it; its certificate names them
#       port = 8443;                      # default 8443
#       tls = { certFile = "/run/secrets/cp.pem"; keyFile = "/run/secrets/cp.key"; };
#       apiKeysFile = "/run/secrets/api-keys";
#       nodeTokensFile = "/run/secrets/node-tokens";   # "NODE_ID TOKEN" per worker
#       settings = { queueCapacity = 1024; };           # more services.llama-orch.api options
#     };
#     caFile = "/run/secrets/cluster-ca.pem";  # signs the control plane's and workers' certificates
#     models.smollm2 = { id = "smollm2-135m"; source = "/var/lib/models/smollm2.gguf"; sha256 = "…"; };
#     workers.gpu1 = {
#       address = "10.0.0.2";            # node API; its certificate names it
#       tokenFile = "/run/secrets/node-token";
#       tls = { certFile = …; keyFile = …; };
#       pools.default = { model = "smollm2"; slots = 4; ctx = 2048; gpus = [ 0 ]; };
#     };
#   }
{ lib }:
let
  inherit (lib) optional concatLists mapAttrsToList attrNames concatStringsSep;
  render = import ./render.nix { inherit lib; };
  validId = s: builtins.isString s && builtins.match "[A-Za-z0-9_.-]{1,64}" s != null;
  pinned = m: (builtins.isAttrs (m.source or null) && (m.source.sha256 or null) != null)
    || (m.sha256 or null) != null;
  nodeId = name: w: w.nodeId or name;
  plaintext = spec: spec.allowPlaintext or false;
  hasTls = x: (x.tls.certFile or null) != null && (x.tls.keyFile or null) != null;
  cpAddress = spec: w: w.controlPlaneAddress or (builtins.head spec.controlPlane.addresses);
  cpPort = spec: spec.controlPlane.port or 8443;
in
rec {
  # What is wrong with a cluster description, one message per problem; [] when it is sound.
  check = spec:
    let
      cp = spec.controlPlane or { };
      workers = spec.workers or { };
      models = spec.models or { };
      ids = mapAttrsToList nodeId workers;
      duplicates = lib.unique (lib.filter (i: lib.count (j: j == i) ids > 1) ids);
      workerProblems = name: w:
        let at = "cluster.workers.${name}"; in
        optional (!validId (nodeId name w)) "${at}: the node id \"${toString (nodeId name w)}\" is not 1 to 64 of A-Za-z0-9_.-."
        ++ optional (name == (cp.host or null)) "${at}: ${name} is the control plane's host; a machine that serves and places is role = \"home\", not a cluster."
        ++ optional ((w.address or null) == null) "${at}.address is required: the address of its node API, where the control plane sends work."
        ++ optional (w ? controlPlaneAddress && !(lib.elem w.controlPlaneAddress (cp.addresses or [ ])))
          "${at}.controlPlaneAddress ${w.controlPlaneAddress} is not one of cluster.controlPlane.addresses (${concatStringsSep ", " (cp.addresses or [ ])}): the worker would register with another machine."
        ++ optional ((w.tokenFile or null) == null) "${at}.tokenFile is required: the token cluster.controlPlane.nodeTokensFile lists under \"${toString (nodeId name w)}\"."
        ++ optional (!plaintext spec && !hasTls w) "${at}.tls (certFile, keyFile) is required: prompts reach its node API across the network (or set cluster.allowPlaintext = true)."
        ++ optional ((w.pools or { }) == { }) "${at}.pools is empty: a worker serves models from its pools."
        ++ concatLists (mapAttrsToList
          (pid: p:
            let model = p.model or null; in
            optional (!(builtins.isString model && models ? ${model}))
              "${at}.pools.${pid}.model must name one of cluster.models (${concatStringsSep ", " (attrNames models)}), not ${builtins.toJSON model}."
            ++ optional (builtins.isString model && models ? ${model} && !pinned models.${model})
              "cluster.models.${model} (used by ${at}.pools.${pid}) is not pinned: give its sha256, or source = { url; sha256; }.")
          (w.pools or { }));
    in
    optional (!(spec ? controlPlane)) "cluster.controlPlane is required."
    ++ optional (!validId (cp.host or null)) "cluster.controlPlane.host must be the control plane's host name."
    ++ optional ((cp.addresses or [ ]) == [ ]) "cluster.controlPlane.addresses is empty: give the addresses workers reach the control plane at."
    ++ optional ((cp.apiKeysFile or null) == null) "cluster.controlPlane.apiKeysFile is required: the API faces the network."
    ++ optional ((cp.nodeTokensFile or null) == null) "cluster.controlPlane.nodeTokensFile is required: one \"NODE_ID TOKEN\" line per worker."
    ++ optional (!plaintext spec && !hasTls cp) "cluster.controlPlane.tls (certFile, keyFile) is required (or set cluster.allowPlaintext = true)."
    ++ optional (!plaintext spec && (spec.caFile or null) == null) "cluster.caFile is required: the CA that signed the control plane's and the workers' certificates."
    ++ optional (workers == { }) "cluster.workers is empty: declare at least one worker."
    ++ optional (duplicates != [ ]) "cluster.workers: node ids ${concatStringsSep ", " duplicates} are used by more than one worker; each node id must be unique."
    ++ concatLists (mapAttrsToList workerProblems workers);

  # host name -> NixOS module (services.llama-orch of that host). Throws with every problem
  # `check` finds.
  hosts = spec:
    let
      problems = check spec;
      cp = spec.controlPlane;
      scheme = if hasTls cp then "https" else "http";
    in
    if problems != [ ] then
      throw "llama-orch cluster description:\n${lib.concatMapStrings (p: "- ${p}\n") problems}"
    else
      {
        ${cp.host}.services.llama-orch = {
          enable = true;
          role = "control-plane";
          openFirewall = spec.openFirewall or true;
          api = {
            address = cp.listenAddress or "0.0.0.0";
            port = cpPort spec;
            tls = cp.tls or { };
            inherit (cp) apiKeysFile nodeTokensFile;
            nodeCaFile = spec.caFile or null;
            allowPlaintext = plaintext spec;
          } // (cp.settings or { });
        };
      }
      // lib.mapAttrs
        (name: w: {
          services.llama-orch = {
            enable = true;
            role = "worker";
            openFirewall = spec.openFirewall or true;
            node = {
              id = nodeId name w;
              controlPlane = "${scheme}://${render.hostPort (cpAddress spec w) (cpPort spec)}";
              controlPlaneCaFile = spec.caFile or null;
              inherit (w) address tokenFile;
              port = w.port or 9200;
              tls = w.tls or { };
              allowPlaintext = plaintext spec;
              heartbeatSecs = w.heartbeatSecs or spec.heartbeatSecs or 5;
            };
            pools = lib.mapAttrs (_: p: removeAttrs p [ "model" ] // { model = spec.models.${p.model}; }) w.pools;
          };
        })
        spec.workers;

  # The worker tokens file the control plane needs, from "NODE_ID" -> token text (for tests
  # and for secrets tools that template files; never put real tokens in the Nix store).
  nodeTokensText = tokens: lib.concatStrings (mapAttrsToList (id: t: "${id} ${t}\n") tokens);

  # The same for a cluster, each line limited to what the cluster gives that worker: the model
  # ids of its pools and their slots together (`models=` and `slots=`: orchestratord refuses a
  # report beyond them, so one worker's token cannot capture another model's traffic).
  # `tokens`: node id -> token text.
  nodeTokensTextFor = spec: tokens: lib.concatStrings (mapAttrsToList
    (name: w:
      let
        id = nodeId name w;
        pools = lib.attrValues (w.pools or { });
        models = lib.unique (map (p: spec.models.${p.model}.id) pools);
        slots = lib.foldl' (n: p: n + (p.slots or 4)) 0 pools;
      in
      "${id} ${tokens.${id}} models=${concatStringsSep "," models} slots=${toString slots}\n")
    spec.workers);
}
