# A bootable disk image of the home box (home.nix): systemd-boot and a unified kernel image on
# the EFI system partition, the system on an ext4 root partition, laid out by systemd-repart
# (nixpkgs' image/repart.nix). Build it with
#   nix build .#nixosConfigurations.appliance.config.system.build.image
# and write it to a disk (or boot it in a VM with UEFI firmware). The image holds no
# configuration.nix: it is updated by building and writing a new image. The model is not in
# the image: copy it to /srv/models on the root partition; the provisioner checks its sha256
# before the engine loads it.
{ config, lib, pkgs, modulesPath, ... }:
let
  inherit (pkgs.stdenv.hostPlatform) efiArch;
in
{
  imports = [ ./home.nix "${modulesPath}/image/repart.nix" ];

  boot.loader.grub.enable = false;
  fileSystems."/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };

  image.repart = {
    name = "llama-orch-appliance";
    partitions = {
      "10-esp" = {
        contents = {
          "/EFI/BOOT/BOOT${lib.toUpper efiArch}.EFI".source =
            "${pkgs.systemd}/lib/systemd/boot/efi/systemd-boot${efiArch}.efi";
          "/EFI/Linux/${config.system.boot.loader.ukiFile}".source =
            "${config.system.build.uki}/${config.system.boot.loader.ukiFile}";
        };
        repartConfig = { Type = "esp"; Format = "vfat"; SizeMinBytes = "96M"; };
      };
      "20-root" = {
        storePaths = [ config.system.build.toplevel ];
        repartConfig = { Type = "root"; Format = "ext4"; Label = "nixos"; Minimize = "guess"; };
      };
    };
  };
}
