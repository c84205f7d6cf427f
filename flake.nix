{
  description = "llama-orch: a systemd-native appliance that serves language models from the GPUs of one machine or a cluster";

  # A release branch: its rustc (nix/rustc-version) is the workspace's rust-version, which
  # nix/package.nix asserts. flake.lock pins it when generated on a machine with network
  # (`nix flake lock`); the build machines of this project have none (docs/NIXOS.md).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      eachSystem = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
      cluster = import ./nix/lib/cluster.nix { inherit lib; };
      # The examples are containers (nixos-container, systemd-nspawn): no boot loader or file
      # systems to invent. A VM or a machine adds its own hardware configuration.
      example = name: modules: lib.nixosSystem {
        system = "x86_64-linux";
        modules = [
          self.nixosModules.default
          { boot.isContainer = true; networking.hostName = name; system.stateVersion = "25.05"; }
        ] ++ modules;
      };
    in
    {
      # The cluster library (nix/lib/cluster.nix): check and hosts.
      lib = { inherit (cluster) check hosts nodeTokensText nodeTokensTextFor; };

      # pkgs.llama-orch, built with that nixpkgs' config (cudaSupport, cudaCapabilities).
      overlays.default = final: _prev: {
        llama-orch = final.callPackage ./nix/package.nix { };
      };

      packages = eachSystem (system: pkgs:
        let
          cudaPkgs = import nixpkgs {
            inherit system;
            config = { allowUnfree = true; cudaSupport = true; cudaCapabilities = [ "8.0" "8.6" "8.9" "9.0" ]; };
          };
        in
        {
          default = pkgs.callPackage ./nix/package.nix { };
          # The CUDA engine for Ampere, Ada and Hopper (nixpkgs' cudaCapabilities; override the
          # package's cudaCapabilities for one GPU generation: docs/NIXOS.md).
          cuda = cudaPkgs.callPackage ./nix/package.nix { };
          # OCI images of the home stack (nix/image.nix): `nix build .#image && ./result |
          # podman load`; the model mounted at /models/model.gguf, or built in with
          # `.override { model = pkgs.fetchurl { ... }; }`.
          image = pkgs.callPackage ./nix/image.nix { llama-orch = self.packages.${system}.default; };
          image-cuda = cudaPkgs.callPackage ./nix/image.nix { llama-orch = self.packages.${system}.cuda; cuda = true; };
        });

      # nix run . -- MODEL.gguf [llorch up options]: the home stack on one model, until Ctrl-C.
      apps = eachSystem (system: pkgs: {
        default = {
          type = "app";
          program = lib.getExe (pkgs.writeShellScriptBin "llorch-up" ''
            if [ $# -lt 1 ]; then
              echo "usage: nix run <llama-orch flake> -- MODEL.gguf [llorch up options, e.g. --sha256 HEX --listen 127.0.0.1:8080]" >&2
              exit 64
            fi
            model=$1
            shift
            exec ${self.packages.${system}.default}/bin/llorch up --model "$model" "$@"
          '');
        };
      });

      # What `make test` needs besides the Rust toolchain.
      devShells = eachSystem (system: pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${system}.default ];
          packages = with pkgs; [
            cargo
            rustc
            clippy
            rustfmt
            python3
            curl
            systemd
            dbus
            iproute2
            debootstrap
            prometheus
            openssl
            nix
            deadnix
            nixpkgs-fmt
          ];
        };
      });

      nixosModules.default = { pkgs, lib, ... }: {
        imports = [ ./nix/module.nix ];
        services.llama-orch.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      nixosConfigurations = {
        home = example "home" [ ./nix/examples/home.nix ];
        # A bootable disk image of the home box (nix/examples/appliance.nix):
        # nix build .#nixosConfigurations.appliance.config.system.build.image
        appliance = lib.nixosSystem {
          system = "x86_64-linux";
          modules = [
            self.nixosModules.default
            ./nix/examples/appliance.nix
            { networking.hostName = "appliance"; system.stateVersion = "25.05"; }
          ];
        };
      } // lib.mapAttrs' (host: settings: lib.nameValuePair "cloud-${host}" (example host [ settings ]))
        (cluster.hosts (import ./nix/examples/cloud.nix));

      # The VM tests need nixpkgs and KVM (nix/tests/README.md); `package` builds the workspace.
      checks = eachSystem (system: pkgs: {
        package = self.packages.${system}.default;
      } // lib.optionalAttrs (system == "x86_64-linux") {
        home = pkgs.testers.runNixOSTest (import ./nix/tests/home.nix { inherit self pkgs; });
        cloud = pkgs.testers.runNixOSTest (import ./nix/tests/cloud.nix { inherit self pkgs; });
      });
    };
}
