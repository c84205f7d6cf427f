#!/usr/bin/env bash
# Builds the CUDA engine (`llorch-engine --features cuda-no-vmm`) on a machine without a GPU and
# without a system CUDA toolkit: NVIDIA's CUDA 13 toolchain comes from PyPI wheels, unpacked once
# into the cache, and llama.cpp's CMake is pointed at it.
#
#   scripts/build-cuda.sh              toolkit (once) + build; prints the binary's path last
#   scripts/build-cuda.sh --toolkit    only install the toolkit; prints its prefix last
#
# Environment:
#   LLORCH_CUDA_ARCHS   GPU architectures for CMAKE_CUDA_ARCHITECTURES, `;`-separated
#                       (default "80-real;86-real;89-real;90": Ampere to Hopper as machine code,
#                       plus Hopper PTX for newer cards). One arch ("90-real") for a quick check.
#   LLORCH_CACHE        the cache (default ~/.cache/llama-orch); the toolkit goes to
#                       $LLORCH_CACHE/cuda-<version>/
#   CARGO_TARGET_DIR    default target/cuda, so the CPU build's target directory stays warm
#
# Why these choices (docs/OPERATIONS.md, "GPUs"):
# - The wheels are pinned to CUDA 13.0: a binary runs on drivers of its CUDA major version only
#   when they are at least as new as its runtime's minor version, so the oldest 13.x runtime
#   runs on every CUDA 13 driver.
# - The wheels ship no libcuda.so (the driver's library, not even a link stub): the
#   `cuda-no-vmm` feature builds ggml without the driver API's virtual memory pool, so nothing
#   links libcuda; the runtime opens the driver itself at run time.
# - The wheels ship cuBLAS only as shared libraries, and llama-cpp-sys-2 links
#   cublas_static, cublasLt_static and culibos by name: the prefix gets empty archives of those
#   names and the engine links libcublas.so.13 and libcublasLt.so.13 dynamically
#   (LLORCH_CUDA_CUBLAS=dynamic, read by crates/llorch-engine/build.rs). At run time the
#   loader must find them (LD_LIBRARY_PATH, or the driver's CUDA 13 libraries installed).
#   libcudart is linked statically, as upstream does.
set -euo pipefail

CUDA_VERSION="13.0"
WHEELS=(
  "nvidia-cuda-nvcc==13.0.88"    # nvcc, cudafe++, fatbinary, nvlink, ptxas
  "nvidia-nvvm==13.0.88"         # cicc and libdevice
  "nvidia-cuda-crt==13.0.88"     # nvcc's crt headers
  "nvidia-cuda-runtime==13.0.96" # headers, libcudart.so.13, libcudart_static.a
  "nvidia-cuda-cccl==13.0.85"    # thrust, cub, libcu++
  "nvidia-cublas==13.0.2.14"     # libcublas.so.13, libcublasLt.so.13
)
ARCHS="${LLORCH_CUDA_ARCHS:-80-real;86-real;89-real;90}"
CACHE="${LLORCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-orch}"
PREFIX="$CACHE/cuda-$CUDA_VERSION"
STAMP="$PREFIX/.llama-orch-wheels"

say() { printf 'build-cuda: %s\n' "$*" >&2; }

ONLY_TOOLKIT=0
case "${1:-}" in
  "") ;;
  --toolkit) ONLY_TOOLKIT=1 ;;
  -h | --help)
    sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    say "unknown argument '$1'; usage: scripts/build-cuda.sh [--toolkit]"
    exit 64
    ;;
esac

if ! [[ "$ARCHS" =~ ^[0-9]+[af]?(-real|-virtual)?(\;[0-9]+[af]?(-real|-virtual)?)*$ ]]; then
  say "LLORCH_CUDA_ARCHS='$ARCHS' is not a list of CUDA architectures such as '80-real;86-real;89-real;90' or '90-real'"
  exit 64
fi

# What the steps below call; scripts/setup.sh (make setup) installs them: binutils comes with
# g++, python3 with python3-pip.
for tool in python3 ar objdump cmake cargo; do
  command -v "$tool" >/dev/null || { say "$tool is missing: run scripts/setup.sh first (make build-cuda does)"; exit 1; }
done
python3 -m pip --version >/dev/null 2>&1 || { say "pip is missing: run scripts/setup.sh first (make build-cuda does)"; exit 1; }

# --- The toolkit, from PyPI, once ------------------------------------------------------------
install_toolkit() {
  local want
  want="$(printf '%s\n' "${WHEELS[@]}" | sed 's/ *#.*//')"
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return 0
  fi
  say "installing the CUDA $CUDA_VERSION toolchain from PyPI into $PREFIX (about 450 MB to download, 840 MB unpacked)"
  local tmp="$PREFIX.tmp"
  rm -rf "$tmp"
  mkdir -p "$CACHE"
  # shellcheck disable=SC2046
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --no-deps \
    --target "$tmp/wheels" $(printf '%s\n' "$want") >&2
  mv "$tmp/wheels/nvidia/cu13" "$tmp/root"
  rm -rf "$tmp/wheels"
  local root="$tmp/root"
  [[ -x "$root/bin/nvcc" && -x "$root/nvvm/bin/cicc" && -f "$root/include/cuda_runtime.h" ]] || {
    say "the wheels did not unpack into bin/nvcc, nvvm/bin/cicc and include/: has their layout changed?"
    exit 1
  }
  # CMake's FindCUDAToolkit and llama-cpp-sys-2 look for unversioned libraries in lib64/.
  ln -s lib "$root/lib64"
  local so
  for so in "$root"/lib/lib*.so.[0-9]*; do
    ln -sf "$(basename "$so")" "${so%%.so.*}.so"
  done
  # Empty archives under the names llama-cpp-sys-2 links statically (see the header).
  local name
  for name in cublas_static cublasLt_static culibos; do
    ar rc "$root/lib/lib$name.a"
  done
  printf '%s\n' "$want" >"$root/.llama-orch-wheels"
  rm -rf "$PREFIX"
  mv "$root" "$PREFIX"
  rmdir "$tmp"
  "$PREFIX/bin/nvcc" --version | tail -2 >&2
}

install_toolkit
if [[ $ONLY_TOOLKIT == 1 ]]; then
  echo "$PREFIX"
  exit 0
fi

# --- nvcc, the same every time ------------------------------------------------------------------
# nvcc names its intermediate files after its process id (tmpxft_<pid>_<n>-…cudafe1.cpp), and
# those names end up in the objects, so two builds of the same source differ. Run each nvcc in
# a PID namespace of its own, where it is process 1, with a private tmpfs as its TMPDIR (every
# nvcc is process 1 there, so concurrent ones would otherwise share file names in /tmp). Where
# namespaces are not allowed (no root and no unprivileged user namespaces), nvcc runs as is and
# the engine builds, but not bit for bit the same twice.
nvcc_wrapper() {
  local real="$PREFIX/bin/nvcc" wrapper="$PREFIX/llama-orch-nvcc" userns=""
  [ "$(id -u)" -eq 0 ] || userns="--user --map-root-user"
  mkdir -p /tmp/llorch-nvcc
  # shellcheck disable=SC2086
  if ! unshare $userns --mount --pid --fork --kill-child -- \
    sh -c 'mount -t tmpfs -o mode=1777 tmpfs /tmp/llorch-nvcc' 2>/dev/null; then
    say "cannot run nvcc in a PID namespace here (unshare refused); building without it: the engine will not be bit for bit reproducible"
    echo "$real"
    return
  fi
  cat >"$wrapper.tmp" <<WRAPPER
#!/bin/sh
# Written by scripts/build-cuda.sh: nvcc as process 1 of a PID namespace, with a private TMPDIR.
mkdir -p /tmp/llorch-nvcc
exec unshare $userns --mount --pid --fork --kill-child -- sh -c \
  'mount -t tmpfs -o mode=1777 tmpfs /tmp/llorch-nvcc && TMPDIR=/tmp/llorch-nvcc exec "\$0" "\$@"' \
  "$real" "\$@"
WRAPPER
  chmod 755 "$wrapper.tmp"
  mv "$wrapper.tmp" "$wrapper"
  echo "$wrapper"
}

# --- The engine --------------------------------------------------------------------------------
export CUDA_PATH="$PREFIX" CUDA_LIBRARY_PATH="$PREFIX"
CUDACXX=$(nvcc_wrapper)
export CUDACXX CMAKE_CUDA_COMPILER="$CUDACXX"
export CMAKE_CUDA_ARCHITECTURES="$ARCHS"
export LLORCH_CUDA_CUBLAS=dynamic
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
say "building llorch-engine with CUDA for $ARCHS into $CARGO_TARGET_DIR (llama.cpp's CUDA kernels take long on few cores)"
start=$(date +%s)
cargo build --release -p llorch-engine --features cuda-no-vmm
bin="$CARGO_TARGET_DIR/release/llorch-engine"
say "built in $(($(date +%s) - start)) s"
# The binary must carry CUDA kernels and must not need libcuda at link time.
if ! grep -q -a "ggml_cuda_init" "$bin"; then
  say "$bin has no CUDA backend in it"
  exit 1
fi
objdump -p "$bin" | grep NEEDED >&2
echo "$bin"
