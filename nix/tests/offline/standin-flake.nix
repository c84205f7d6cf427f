# An offline stand-in for the nixpkgs flake input, for
#   nix flake check --no-build --override-input nixpkgs path:<dir holding this as flake.nix>
# tests/nix.rs assembles <dir>: this file, nixpkgs' real lib/ (../shared/vendor) and the
# stand-ins next to it. It passes the real lib through; lib.nixosSystem evaluates modules with
# the option stand-ins of nixos-options.nix; packages are derivations that cannot build.
{
  description = "offline stand-in for nixpkgs (llama-orch tests)";
  outputs = { self }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      pkgsFor = args: import ./pkgs.nix ({ lib = self.lib; } // args);
      lib = (import ./lib).extend (_: _: {
        nixosSystem = { system ? "x86_64-linux", modules, specialArgs ? { } }:
          self.lib.evalModules {
            # ./modules stands in for nixpkgs' nixos/modules (image/repart.nix alone).
            specialArgs = { modulesPath = ./modules; } // specialArgs;
            modules = [ ./nixos-options.nix { _module.args.pkgs = pkgsFor { inherit system; }; } ] ++ modules;
          };
      });
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs systems (system: pkgsFor { inherit system; });
    };
}
