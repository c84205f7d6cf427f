#!/usr/bin/env bash
# Builds the Debian package of llama-orch from binaries already built:
#   scripts/build-deb.sh [--bins DIR] [--out FILE] [--fast]
# --bins: where the binaries are (default target/release); --out: the .deb (default
# target/llama-orch_VERSION_ARCH.deb); --fast: the quickest compression (gzip -1) in place of
# xz -6 (the tests' packages of debug binaries). `make deb` builds the release binaries first
# and runs lintian.
#
# The package: the binaries in /usr/bin, the generator, the units in /usr/lib/systemd/system,
# sysusers and tmpfiles entries, the D-Bus policy and the polkit action and rule, a default
# home configuration (/etc/llama-orch/node.toml, a conffile), manual pages (help2man), the licence of llama-orch and of
# what the binaries bundle (llama.cpp, every Rust crate), and maintainer scripts (packaging/deb)
# that create users and directories and enable nothing.
set -euo pipefail

root_dir=$(cd "$(dirname "$0")/.." && pwd)
bins="${CARGO_TARGET_DIR:-$root_dir/target}/release"
out=""
fast=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bins) bins=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --fast) fast=1; shift ;;
    *) echo "build-deb: unknown argument '$1'" >&2; exit 64 ;;
  esac
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root_dir/Cargo.toml" | head -1)-1
arch=$(dpkg --print-architecture)
out=${out:-$root_dir/target/llama-orch_${version}_${arch}.deb}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/pkg"

for b in orchestratord pool-managerd llorch-engine engine-provisioner llorch llama-orch-gpu-generator; do
  [ -x "$bins/$b" ] || { echo "build-deb: $bins/$b is missing; build the binaries first (cargo build --release --bins)" >&2; exit 66; }
done

install -d "$pkg/usr/bin" "$pkg/usr/lib/systemd/system" "$pkg/usr/lib/systemd/system-generators" \
  "$pkg/usr/lib/sysusers.d" "$pkg/usr/lib/tmpfiles.d" "$pkg/usr/share/dbus-1/system.d" \
  "$pkg/usr/share/polkit-1/actions" "$pkg/usr/share/polkit-1/rules.d" "$pkg/etc/llama-orch" \
  "$pkg/usr/share/doc/llama-orch" "$pkg/DEBIAN"
for b in orchestratord pool-managerd llorch-engine engine-provisioner llorch; do
  install -m 0755 "$bins/$b" "$pkg/usr/bin/$b"
done
install -m 0755 "$bins/llama-orch-gpu-generator" "$pkg/usr/lib/systemd/system-generators/"
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
  "$pkg"/usr/bin/* "$pkg/usr/lib/systemd/system-generators/llama-orch-gpu-generator"
units="$root_dir/systemd"
install -m 0644 "$units"/*.service "$units"/*.socket "$units"/*.target "$pkg/usr/lib/systemd/system/"
install -m 0644 "$units/llama-orch.sysusers.conf" "$pkg/usr/lib/sysusers.d/llama-orch.conf"
install -m 0644 "$units/llama-orch.tmpfiles.conf" "$pkg/usr/lib/tmpfiles.d/llama-orch.conf"
install -m 0644 "$units/org.llamaorch.conf" "$pkg/usr/share/dbus-1/system.d/org.llamaorch.conf"
install -m 0644 "$units/org.llamaorch.policy" "$pkg/usr/share/polkit-1/actions/org.llamaorch.policy"
install -m 0644 "$units/llama-orch.polkit.rules" "$pkg/usr/share/polkit-1/rules.d/50-llama-orch.rules"
install -m 0644 "$root_dir/crates/pool-managerd/examples/node.toml" "$pkg/etc/llama-orch/node.toml"

# Manual pages, from each binary's --help and --version (help2man), dated by the commit as
# the changelog is, compressed without a timestamp: the same sources give the same pages.
SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$root_dir" log -1 --format=%ct 2>/dev/null || date +%s)}"
export SOURCE_DATE_EPOCH
install -d "$pkg/usr/share/man/man1" "$pkg/usr/share/man/man8"
man_page() { # man_page BINARY SECTION NAME
  help2man --no-info --section "$2" --name "$3" --version-option=--version "$pkg/usr/bin/$1" |
    gzip -9n >"$pkg/usr/share/man/man$2/$1.$2.gz"
}
man_page orchestratord 8 "llama-orch's control plane: public API, admission queue, placement, streaming"
man_page pool-managerd 8 "llama-orch's node agent: GPUs, pools, engines, registration"
man_page llorch-engine 8 "llama-orch's engine: one GGUF model served over a Unix socket"
man_page engine-provisioner 8 "llama-orch's model stager: fetch, verify and plan a pool's model"
man_page llorch 1 "llama-orch's command line: the home stack, chat, status and operator actions"
chmod 0644 "$pkg"/usr/share/man/man*/*

# Licences: llama-orch's, llama.cpp's (built into llorch-engine), every Rust crate's.
doc="$pkg/usr/share/doc/llama-orch"
python3 "$root_dir/scripts/licences.py" "$root_dir" "$doc"
date=$(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$root_dir" log -1 --format=%ct 2>/dev/null || date +%s)}")
sed -e "s/@VERSION@/$version/" -e "s/@DATE@/$date/" "$root_dir/packaging/deb/changelog" |
  gzip -9n >"$doc/changelog.Debian.gz"
chmod 0644 "$doc"/*

for s in postinst prerm postrm; do
  install -m 0755 "$root_dir/packaging/deb/$s" "$pkg/DEBIAN/$s"
done
echo /etc/llama-orch/node.toml >"$pkg/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$pkg" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
  "$root_dir/packaging/deb/control.in" >"$pkg/DEBIAN/control"
(cd "$pkg" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"

compress=(-Zxz)
[ "$fast" -eq 1 ] && compress=(-Zgzip -z1)
mkdir -p "$(dirname "$out")"
dpkg-deb --root-owner-group "${compress[@]}" --build "$pkg" "$out" >/dev/null
echo "$out"
