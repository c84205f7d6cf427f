# A small, clearly partial declaration of the NixOS options services.llama-orch sets, with
# NixOS's types where they matter, for evaluating the module offline with nixpkgs' lib alone
# (no nixpkgs checkout here). An option the module sets that is not declared below is an
# evaluation error, as it would be on NixOS. It also renders what a host would get on disk:
# system.build.llamaOrchFiles, the files NixOS writes for these settings (/etc entries, unit
# drop-ins as nixos/lib/systemd-lib.nix formats them, masks) and the units it enables.
# Not proved here: that the real NixOS modules accept every value (checks.*.home and .cloud,
# the VM tests, run on a machine with nixpkgs).
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkOption types;

  # nixos/lib/systemd-lib.nix: unit settings merge lists by concatenation, render
  # `Key=value` per element, booleans as true/false.
  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let defs' = lib.filterOverrides defs; in
      if lib.any (def: builtins.isList def.value) defs'
      then lib.concatMap (def: lib.toList def.value) defs'
      else lib.mergeEqualOption loc defs';
  };
  toOption = x: if x == true then "true" else if x == false then "false" else toString x;
  section = name: attrs:
    lib.optionalString (attrs != { }) ("[${name}]\n" + lib.concatStrings (lib.concatLists (lib.mapAttrsToList
      (k: v: map (x: "${k}=${toOption x}\n") (lib.toList v))
      attrs)));
  settings = mkOption { type = types.attrsOf unitOption; default = { }; };
  unit = extra: types.submodule {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      overrideStrategy = mkOption { type = types.enum [ "asDropinIfExists" "asDropin" ]; default = "asDropinIfExists"; };
      wantedBy = mkOption { type = types.listOf types.str; default = [ ]; };
      unitConfig = settings;
      restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      reloadTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    } // extra;
  };

  # nixos/lib/systemd-lib.nix (unitConfig): each list of triggers becomes a file in the store,
  # named in [Unit]. switch-to-configuration restarts a unit whose files changed, and only
  # reloads it when X-Reload-Triggers is all that changed.
  triggers = name: u:
    let
      file = kind: list: pkgs.writeText "${kind}-${name}"
        (toString (map (x: if builtins.isPath x then "${x}" else x) (lib.flatten list)));
    in
    lib.optionalAttrs (u.restartTriggers != [ ]) { X-Restart-Triggers = "${file "X-Restart-Triggers" u.restartTriggers}"; }
    // lib.optionalAttrs (u.reloadTriggers != [ ]) { X-Reload-Triggers = "${file "X-Reload-Triggers" u.reloadTriggers}"; };

  # What NixOS puts on disk for the units of one kind.
  unitFiles = kind: units: sections:
    lib.concatLists (lib.mapAttrsToList
      (name: u:
        let
          file = "${name}.${kind}";
          text = section "Unit" (u.unitConfig // triggers name u)
            + lib.concatStrings (lib.mapAttrsToList (s: attr: section s u.${attr}) sections);
        in
        if !u.enable then [{ path = "/etc/systemd/system/${file}"; link = "/dev/null"; }]
        else lib.optional (text != "") { path = "/etc/systemd/system/${file}.d/overrides.conf"; inherit text; })
      units);
  wanted = kind: units:
    lib.concatLists (lib.mapAttrsToList (name: u: lib.optional (u.enable && u.wantedBy != [ ]) "${name}.${kind}") units);
  sd = config.systemd;
  # NixOS turns a service's `path` into its PATH (nixos/lib/systemd-unit-options.nix).
  withPath = _: s: s // lib.optionalAttrs (s.path != [ ]) {
    serviceConfig = s.serviceConfig // {
      Environment = lib.toList (s.serviceConfig.Environment or [ ])
        ++ [ "PATH=${lib.makeBinPath s.path}:${lib.makeSearchPathOutput "bin" "sbin" s.path}" ];
    };
  };
in
{
  options = {
    assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
    warnings = mkOption { type = types.listOf types.str; default = [ ]; };
    networking.hostName = mkOption { type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$"; default = "nixos"; };
    networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    networking.firewall.allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
    # The NVIDIA driver (nixos/modules/hardware/video/nvidia.nix and graphics.nix, NixOS 24.11+).
    hardware.graphics.enable = mkOption { type = types.bool; default = false; };
    hardware.nvidia.datacenter.enable = mkOption { type = types.bool; default = false; };
    services.xserver.videoDrivers = mkOption { type = types.listOf types.str; default = [ "modesetting" "fbdev" ]; };
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
    environment.etc = mkOption {
      type = types.attrsOf (types.submodule {
        options.text = mkOption { type = types.nullOr types.lines; default = null; };
        options.mode = mkOption { type = types.str; default = "symlink"; };
      });
      default = { };
    };
    users.users = mkOption {
      type = types.attrsOf (types.submodule {
        options = {
          isSystemUser = mkOption { type = types.bool; default = false; };
          group = mkOption { type = types.str; default = ""; };
          home = mkOption { type = types.path; default = "/var/empty"; };
          description = mkOption { type = types.str; default = ""; };
        };
      });
      default = { };
    };
    users.groups = mkOption { type = types.attrsOf (types.submodule { }); default = { }; };
    security.polkit.enable = mkOption { type = types.bool; default = false; };
    security.polkit.extraConfig = mkOption { type = types.lines; default = ""; };
    services.dbus.packages = mkOption { type = types.listOf types.path; default = [ ]; };
    systemd.packages = mkOption { type = types.listOf types.package; default = [ ]; };
    systemd.tmpfiles.packages = mkOption { type = types.listOf types.package; default = [ ]; };
    systemd.services = mkOption {
      type = types.attrsOf (unit {
        serviceConfig = settings;
        path = mkOption { type = types.listOf types.package; default = [ ]; };
      });
      default = { };
    };
    systemd.sockets = mkOption { type = types.attrsOf (unit { socketConfig = settings; }); default = { }; };
    systemd.targets = mkOption { type = types.attrsOf (unit { }); default = { }; };
    systemd.generators = mkOption { type = types.attrsOf types.path; default = { }; };
    boot.isContainer = mkOption { type = types.bool; default = false; };
    # What a bootable image sets (nix/examples/appliance.nix).
    boot.loader.grub.enable = mkOption { type = types.bool; default = true; };
    fileSystems = mkOption {
      type = types.attrsOf (types.submodule {
        options.device = mkOption { type = types.str; };
        options.fsType = mkOption { type = types.str; default = "auto"; };
      });
      default = { };
    };
    system.boot.loader.ukiFile = mkOption { type = types.str; default = "nixos.efi"; };
    # The VM tests switch into these (nix/tests/home.nix); not evaluated here.
    specialisation = mkOption { type = types.attrsOf types.unspecified; default = { }; };
    virtualisation.memorySize = mkOption { type = types.ints.positive; default = 1024; };
    virtualisation.cores = mkOption { type = types.ints.positive; default = 1; };
    system.stateVersion = mkOption { type = types.str; default = "25.05"; };
    system.build = mkOption { type = types.attrsOf types.unspecified; default = { }; };
  };

  # What `nix flake check` evaluates for a nixosConfiguration: a derivation that depends on
  # the rendered files, so every assertion and every file is forced.
  config.system.build.toplevel = derivation {
    name = "nixos-system-${config.networking.hostName}-offline-stand-in";
    inherit (pkgs) system;
    builder = "/bin/sh";
    args = [ "-c" "echo 'offline stand-in: a NixOS system is built with nixpkgs only' >&2; exit 1" ];
    files = builtins.toJSON config.system.build.llamaOrchFiles;
  };

  # nixos/modules/system/boot/uki.nix: the unified kernel image a bootable image carries.
  config.system.build.uki = pkgs.writeText "uki-offline-stand-in" "";

  config.system.build.llamaOrchFiles =
    let
      failed = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    in
    if failed != [ ] then throw "\nFailed assertions:\n${lib.concatMapStrings (m: "- ${m}\n") failed}"
    else {
      files =
        lib.mapAttrsToList (name: e: { path = "/etc/${name}"; inherit (e) text; }) config.environment.etc
        ++ unitFiles "service" (lib.mapAttrs withPath sd.services) { Service = "serviceConfig"; }
        ++ unitFiles "socket" sd.sockets { Socket = "socketConfig"; }
        ++ unitFiles "target" sd.targets { };
      start = wanted "socket" sd.sockets ++ wanted "target" sd.targets ++ wanted "service" sd.services;
      generators = config.systemd.generators;
      firewall = config.networking.firewall.allowedTCPPorts;
      firewallUdp = config.networking.firewall.allowedUDPPorts;
      users = lib.attrNames config.users.users;
      packages = map (p: p.name) config.systemd.packages;
      groups = lib.attrNames config.users.groups;
    };
}
