#!/usr/bin/env bash
# GPU smoke check, for a machine with an NVIDIA GPU and its driver: loads the default model with
# the CUDA engine (`make build-cuda`), fully offloaded, streams an answer, and prints tokens/s,
# the VRAM the engine uses against llama-orch's estimate, llama.cpp's own buffer sizes against
# the estimate's parts, and the GPUs as NVML (nvidia-smi) reports them. Exits non-zero on any
# mismatch. Needs bash, curl, python3 and nvidia-smi; no Rust toolchain.
#
#   scripts/gpu-smoke.sh [--cpu]
#
#   --cpu   a dry run of the same steps with a CPU engine (no GPU, no nvidia-smi), to check the
#           script itself on a build machine
#
# Environment:
#   ENGINE      the engine binary (default target/cuda/release/llorch-engine; with --cpu,
#               target/debug/llorch-engine)
#   MODEL       the GGUF model (default the cached default model)
#   CUDA_LIBS   a directory with libcublas.so.13 and libcublasLt.so.13, when the loader does
#               not find them (default: searched in Python environments' nvidia/cu13/lib)
#   SLOTS, CTX  the pool's shape (default 4 and 2048)
#   TOKENS      tokens to generate (default 256)
#
# Pass criteria (each printed):
#   - the engine offloads every layer (llama.cpp: "offloaded N/N layers to GPU");
#   - llama.cpp's CUDA model buffer and KV buffer are within 1% of the estimate's GPU weights
#     and GPU KV, and its compute buffer is at most the estimate's;
#   - the VRAM the engine process uses (nvidia-smi) is at most the estimate plus
#     CUDA_OVERHEAD (512 MiB, the estimate's allowance for CUDA's own context per GPU);
#   - the answer streams to its end with at least one token;
#   - swap step: pool-managerd (next to the engine) with two on-demand pools of the model on
#     GPU 0 and `max_loaded = 1` answers a request to each in turn, unloading the first to load
#     the second (its `swaps` is 1 and its engine is gone from the GPU); the first tokens of
#     the cold load and of the swap are printed side by side.
set -euo pipefail

CPU=0
case "${1:-}" in
  "") ;;
  --cpu) CPU=1 ;;
  -h | --help)
    sed -n '2,32p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: scripts/gpu-smoke.sh [--cpu]" >&2
    exit 64
    ;;
esac

here="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${LLORCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llama-orch}"
MODEL="${MODEL:-$CACHE/default-model/SmolLM2-135M-Instruct.Q4_1.gguf}"
if [[ $CPU == 1 ]]; then
  ENGINE="${ENGINE:-$here/target/debug/llorch-engine}"
  GPU_LAYERS=0
else
  ENGINE="${ENGINE:-$here/target/cuda/release/llorch-engine}"
  GPU_LAYERS=999
fi
SLOTS="${SLOTS:-4}"
CTX="${CTX:-2048}"
TOKENS="${TOKENS:-256}"
CUDA_OVERHEAD_MIB=512

fail=0
say() { printf 'gpu-smoke: %s\n' "$*"; }
check() { # check NAME OK(0/1) DETAIL
  if [[ $2 == 1 ]]; then
    printf 'gpu-smoke: ok    %s: %s\n' "$1" "$3"
  else
    printf 'gpu-smoke: FAIL  %s: %s\n' "$1" "$3"
    fail=1
  fi
}

[[ -x "$ENGINE" ]] || { say "no engine at $ENGINE (make build-cuda, or ENGINE=...)"; exit 2; }
[[ -f "$MODEL" ]] || { say "no model at $MODEL (make setup, or MODEL=...)"; exit 2; }
for tool in curl python3; do
  command -v "$tool" >/dev/null || { say "$tool is missing"; exit 2; }
done

if [[ $CPU == 0 ]]; then
  command -v nvidia-smi >/dev/null || { say "nvidia-smi is missing: is the NVIDIA driver installed?"; exit 2; }
  # cuBLAS: the engine links libcublas.so.13 dynamically (scripts/build-cuda.sh).
  if [[ -z "${CUDA_LIBS:-}" ]] && ! ldconfig -p 2>/dev/null | grep -q 'libcublas.so.13 '; then
    CUDA_LIBS="$(find / -xdev -path '*nvidia/cu13/lib/libcublas.so.13' -printf '%h\n' 2>/dev/null | head -1 || true)"
  fi
  if [[ -n "${CUDA_LIBS:-}" ]]; then
    export LD_LIBRARY_PATH="$CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "cuBLAS from $CUDA_LIBS"
  fi
  say "NVML inventory (nvidia-smi):"
  nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,memory.free,utilization.gpu,temperature.gpu,driver_version \
    --format=csv | sed 's/^/  /'
  nvidia-smi | grep -m1 'CUDA Version' | sed 's/^/  /' || true
fi

work="$(mktemp -d)"
engine_pid=""
cleanup() {
  if [[ -n "$engine_pid" ]] && kill -0 "$engine_pid" 2>/dev/null; then
    kill -TERM "$engine_pid" 2>/dev/null || true
    wait "$engine_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

say "starting $ENGINE: $SLOTS slots x $CTX tokens, gpu layers $GPU_LAYERS"
LLORCH_LOG=info NO_COLOR=1 "$ENGINE" --model "$MODEL" --slots "$SLOTS" --ctx "$CTX" \
  --gpu-layers "$GPU_LAYERS" --pool smoke --socket "$work/engine.sock" \
  --handoff-dir "$work/handoff" >"$work/engine.log" 2>&1 &
engine_pid=$!
# Ready is the handoff file (the engine writes it once the model is loaded).
for _ in $(seq 1 1200); do
  [[ -f "$work/handoff/smoke.json" ]] && break
  if ! kill -0 "$engine_pid" 2>/dev/null; then
    say "the engine exited before it was ready:"
    tail -40 "$work/engine.log"
    exit 1
  fi
  sleep 0.1
done
[[ -f "$work/handoff/smoke.json" ]] || { say "the engine was not ready after 120 s"; tail -40 "$work/engine.log"; exit 1; }
say "ready"

# One streamed answer.
curl -sS -N --unix-socket "$work/engine.sock" -H 'content-type: application/json' \
  -d "{\"messages\":[{\"role\":\"user\",\"content\":\"Tell me a long story about a lighthouse keeper.\"}],\"max_tokens\":$TOKENS,\"ignore_eos\":true,\"temperature\":0}" \
  http://engine/generate >"$work/stream.txt"

# The engine's VRAM, while it is loaded.
used_mib=""
if [[ $CPU == 0 ]]; then
  used_mib="$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits |
    awk -F', *' -v pid="$engine_pid" '$1 == pid { print $2 }' | head -1)"
fi

CPU="$CPU" USED_MIB="$used_mib" OVERHEAD_MIB="$CUDA_OVERHEAD_MIB" python3 - "$work/engine.log" "$work/stream.txt" <<'EOF' || fail=1
import json, os, re, sys

log = open(sys.argv[1], encoding="utf-8", errors="replace").read()
stream = open(sys.argv[2], encoding="utf-8", errors="replace").read()
cpu = os.environ["CPU"] == "1"
failed = False

def check(name, ok, detail):
    global failed
    print(f"gpu-smoke: {'ok   ' if ok else 'FAIL '} {name}: {detail}")
    failed |= not ok

def mib(pattern):
    m = re.search(pattern + r"\s*=\s*([0-9.]+) MiB", log)
    return float(m.group(1)) if m else None

# The engine's own estimate (crates/llorch-gguf/src/memory.rs), logged before loading.
est = {}
m = re.search(r"Memory estimate: .*", log)
for key in ("gpu_bytes", "gpu_weights_bytes", "gpu_kv_bytes", "cpu_weights_bytes", "cpu_kv_bytes", "compute_bytes"):
    k = re.search(key + r"=(\d+)", m.group(0)) if m else None
    est[key] = int(k.group(1)) / 2**20 if k else None
check("estimate logged", m is not None, m.group(0)[:200] if m else "no 'Memory estimate' line")

events = []
for block in stream.split("\n\n"):
    name = re.search(r"^event: (\S+)", block, re.M)
    data = re.search(r"^data: (.*)$", block, re.M)
    if name and data:
        events.append((name.group(1), json.loads(data.group(1))))
ends = [d for n, d in events if n == "end"]
tokens = sum(1 for n, _ in events if n == "token")
if ends:
    e = ends[0]
    rate = e["completion_tokens"] / (e["decode_ms"] / 1000) if e["decode_ms"] > 0 else 0
    check("stream", tokens > 0, f"{e['completion_tokens']} tokens, first after {e['ttft_ms']:.0f} ms, {rate:.1f} tokens/s")
else:
    check("stream", False, f"no end event; {tokens} token events; stream: {stream[-300:]!r}")

if cpu:
    weights, kv, compute = mib("CPU_Mapped model buffer size"), mib("CPU KV buffer size"), mib("CPU compute buffer size")
    want_weights, want_kv = est["cpu_weights_bytes"], est["cpu_kv_bytes"]
else:
    off = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log)
    check("offload", bool(off) and off.group(1) == off.group(2), off.group(0) if off else "no 'offloaded N/N layers' line")
    weights, kv, compute = mib("CUDA0 model buffer size"), mib("CUDA0 KV buffer size"), mib("CUDA0 compute buffer size")
    want_weights, want_kv = est["gpu_weights_bytes"], est["gpu_kv_bytes"]

def close(name, got, want, tol):
    if got is None or want is None:
        check(name, False, f"llama.cpp {got} MiB, estimate {want} MiB")
    else:
        check(name, abs(got - want) <= max(tol * want, 0.01), f"llama.cpp {got:.2f} MiB, estimate {want:.2f} MiB")

close("weights", weights, want_weights, 0.01)
close("KV cache", kv, want_kv, 0.005)
if compute is None or est["compute_bytes"] is None:
    check("compute buffer", False, f"llama.cpp {compute} MiB, estimate {est['compute_bytes']} MiB")
else:
    check("compute buffer", compute <= est["compute_bytes"], f"llama.cpp {compute:.2f} MiB, estimate {est['compute_bytes']:.2f} MiB (an upper bound)")

if not cpu:
    used = os.environ.get("USED_MIB", "")
    limit = (est["gpu_bytes"] or 0) + float(os.environ["OVERHEAD_MIB"])
    if used:
        check("VRAM", float(used) <= limit, f"the engine uses {used} MiB (nvidia-smi); estimate {est['gpu_bytes']:.0f} MiB + {os.environ['OVERHEAD_MIB']} MiB CUDA = {limit:.0f} MiB; CUDA's own share measured: {float(used) - (est['gpu_bytes'] or 0):.0f} MiB")
    else:
        check("VRAM", False, "nvidia-smi lists no compute process for the engine")
sys.exit(1 if failed else 0)
EOF

# --- Swap step: two on-demand pools, room for one -------------------------------------------
kill -TERM "$engine_pid" 2>/dev/null || true
wait "$engine_pid" 2>/dev/null || true
engine_pid=""
bindir="$(dirname "$ENGINE")"
if [[ -x "$bindir/pool-managerd" && -x "$bindir/engine-provisioner" ]]; then
  devices='"cuda:0"'
  [[ $CPU == 1 ]] && devices='"cpu"'
  swapdir="$work/swap"
  mkdir -p "$swapdir"
  {
    printf '[node]\nid = "smoke"\ncontrol_plane = "http://127.0.0.1:9"\nlisten = "unix:%s/node.sock"\n' "$swapdir"
    printf 'cache_dir = "%s/cache"\nruntime_dir = "%s/run"\nlauncher = "process"\nmax_loaded = 1\nmin_resident_secs = 0\n' "$swapdir" "$swapdir"
    printf 'engine_bin = "%s/llorch-engine"\nprovisioner_bin = "%s/engine-provisioner"\n' "$bindir" "$bindir"
    for p in first second; do
      printf '\n[[pools]]\nid = "%s"\nslots = 1\nctx = 1024\ndevices = %s\non_demand = true\n\n[pools.model]\nid = "%s"\nsource = "%s"\n' "$p" "$devices" "$p" "$MODEL"
    done
  } >"$swapdir/node.toml"
  LLORCH_LOG=info NO_COLOR=1 "$bindir/pool-managerd" --config "$swapdir/node.toml" >"$swapdir/pm.log" 2>&1 &
  engine_pid=$!
  node() { curl -sS --unix-socket "$swapdir/node.sock" "$@"; }
  for _ in $(seq 1 600); do
    [[ "$(node http://n/v2/pools 2>/dev/null | grep -o '"standby"' | wc -l)" == 2 ]] && break
    sleep 0.1
  done
  ask() { # ask POOL: a short greedy answer from the pool, which must end with its end event
    node -N -H 'content-type: application/json' -d '{"prompt":"The capital of France is","max_tokens":8,"temperature":0}' \
      "http://n/v2/pools/$1/generate" | grep -q '^event: end'
  }
  whole=1
  start=$(date +%s%N); ask first || whole=0; cold_ms=$(( ($(date +%s%N) - start) / 1000000 ))
  start=$(date +%s%N); ask second || whole=0; swap_ms=$(( ($(date +%s%N) - start) / 1000000 ))
  swaps="$(node http://n/v2/pools/first | python3 -c 'import json,sys; print(json.load(sys.stdin).get("swaps",0))')"
  check "swap" "$([[ $swaps == 1 && $whole == 1 ]] && echo 1 || echo 0)" "pool first unloaded for second ($swaps swaps); whole answers: $whole; first request (cold load) $cold_ms ms, second (unload first, load second) $swap_ms ms"
  if [[ $CPU == 0 ]]; then
    apps="$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l)"
    check "swap VRAM" "$([[ $apps == 1 ]] && echo 1 || echo 0)" "$apps engine process(es) on the GPU after the swap (want 1)"
  fi
  kill -TERM "$engine_pid" 2>/dev/null || true
  wait "$engine_pid" 2>/dev/null || true
  engine_pid=""
else
  check "swap" 0 "no pool-managerd and engine-provisioner next to $ENGINE"
fi

if [[ $fail == 0 ]]; then
  say "passed"
else
  say "FAILED; the engine's log:"
  grep -E 'buffer size|offload|Memory estimate|CUDA|error|ERROR' "$work/engine.log" | sed 's/^/  /' | tail -40
  exit 1
fi
