#!/usr/bin/env bash
# `make repro`: are the release binaries reproducible? Two release builds of this commit, each
# from a fresh clone in a directory of its own, with its own HOME and target directory, then
# every binary's sha256 from both, side by side. Exit 0 when all are identical, 1 otherwise.
#
#   scripts/repro.sh            the six binaries of `cargo build --release`
#   scripts/repro.sh --cuda     the CUDA engine of `make build-cuda` (scripts/build-cuda.sh),
#                               for LLORCH_CUDA_ARCHS (default "90-real", one architecture);
#                               the toolkit from PyPI is installed once into the shared cache,
#                               and nvcc's host compiler gets the same -ffile-prefix-map
#
# The standard means make the builds independent of where they ran: --remap-path-prefix for
# Rust (the clone, the target directory, the cargo home), -ffile-prefix-map for llama.cpp's C
# and C++ (the same three), SOURCE_DATE_EPOCH from the commit. REPRO_DIR keeps the builds
# (default: a temporary directory, removed afterwards); each takes a full release build.
set -euo pipefail

cuda=0
case "${1:-}" in
  "") ;;
  --cuda) cuda=1 ;;
  *) echo "usage: scripts/repro.sh [--cuda]" >&2; exit 64 ;;
esac
root=$(cd "$(dirname "$0")/.." && pwd)
# The cache with the CUDA toolkit, the same for both builds (its path is in neither binary).
cache=${LLORCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-orch}
commit=$(git -C "$root" rev-parse HEAD)
base=${REPRO_DIR:-$(mktemp -d /tmp/llorch-repro.XXXXXX)}
keep=${REPRO_DIR:+1}
[ -n "$keep" ] || trap 'rm -rf "$base"' EXIT
cargo_home=${CARGO_HOME:-$HOME/.cargo}
# The toolchain stays where it is while HOME changes.
export RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
export SOURCE_DATE_EPOCH
SOURCE_DATE_EPOCH=$(git -C "$root" log -1 --format=%ct)
bins=(orchestratord pool-managerd llorch-engine engine-provisioner llorch llama-orch-gpu-generator)
[ "$cuda" -eq 1 ] && bins=(llorch-engine)

build() {
  local name=$1 src="$base/$1/checkout-$1" target="$base/$1/target-$1" home="$base/$1/home"
  mkdir -p "$home"
  git clone -q "$root" "$src"
  git -C "$src" checkout -q "$commit"
  local maps="$src=/build/llama-orch $target=/build/target $cargo_home=/build/cargo"
  local rust="" c="" cu=""
  for m in $maps; do
    rust+=" --remap-path-prefix=$m"
    c+=" -ffile-prefix-map=$m"
    cu+=" -Xcompiler=-ffile-prefix-map=$m"
  done
  echo "repro: building $name in $src" >&2
  if [ "$cuda" -eq 1 ]; then
    (cd "$src" && HOME="$home" CARGO_HOME="$cargo_home" CARGO_TARGET_DIR="$target" \
      LLORCH_CACHE="$cache" LLORCH_CUDA_ARCHS="${LLORCH_CUDA_ARCHS:-90-real}" \
      RUSTFLAGS="${RUSTFLAGS:-}$rust" CFLAGS="${CFLAGS:-}$c" CXXFLAGS="${CXXFLAGS:-}$c" \
      CUDAFLAGS="${CUDAFLAGS:-}$cu" scripts/build-cuda.sh >/dev/null)
  else
    (cd "$src" && HOME="$home" CARGO_HOME="$cargo_home" CARGO_TARGET_DIR="$target" \
      RUSTFLAGS="${RUSTFLAGS:-}$rust" CFLAGS="${CFLAGS:-}$c" CXXFLAGS="${CXXFLAGS:-}$c" \
      cargo build --release --locked --bins -q)
  fi
}

build a
build b
same=1
printf '%-28s %-64s %s\n' binary "sha256 (build a)" "build b"
for b in "${bins[@]}"; do
  ha=$(sha256sum "$base/a/target-a/release/$b" | cut -d' ' -f1)
  hb=$(sha256sum "$base/b/target-b/release/$b" | cut -d' ' -f1)
  if [ "$ha" = "$hb" ]; then
    printf '%-28s %s %s\n' "$b" "$ha" same
  else
    printf '%-28s %s %s\n' "$b" "$ha" "$hb"
    same=0
  fi
done
[ "$same" -eq 1 ] && echo "repro: every binary is bit for bit the same" && exit 0
echo "repro: binaries differ (REPRO_DIR=<dir> keeps both builds for diffoscope)" >&2
exit 1
