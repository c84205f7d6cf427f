# The human entry point. `make run` and `make test` are the two quick-start commands; both work
# on a fresh Debian or Ubuntu machine with a Rust toolchain (scripts/setup.sh installs the rest
# when run as root or with sudo, and fetches the default model once).

SHELL := /bin/bash
LLORCH_CACHE ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)/llama-orch
export LLORCH_CACHE
MODEL := $(LLORCH_CACHE)/default-model/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CARGO ?= cargo
# Where cargo puts what it builds (CARGO_TARGET_DIR when the user set one).
BIN_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: run demo test test-appliance build-cuda test-cloud test-faults soak fuzz setup build bench lint fmt deb repro repro-cuda

## Set up, build, and run the home stack on the default model at http://127.0.0.1:8080 until Ctrl-C.
run: build
	"$(BIN_DIR)/debug/llorch" up --model "$(MODEL)" --sha256 $(MODEL_SHA256) --model-id smollm2-135m

## The engine alone: stage the default model, stream one answer, stop.
demo: build
	"$(BIN_DIR)/debug/llorch" demo --model "$(MODEL)" --sha256 $(MODEL_SHA256)

## Set up, build, and run every test (unit, integration, end to end on the real model). A test
## that cannot run here (llorch_tests::skip) is counted as skipped, not passed; under CI=true
## it fails instead, since CI installs everything.
test: build
	@mkdir -p target
	rm -f target/skipped.log
	set -o pipefail; LLORCH_SKIP_LOG="$(CURDIR)/target/skipped.log" $(CARGO) test --workspace 2>&1 | tee target/test.log
	@touch target/skipped.log; awk -v s="$$(wc -l < target/skipped.log)" '/^test result:/ { p += $$4; f += $$6 } \
	  END { printf "tests: %d passed, %d failed, %d skipped\n", p - s, f, s }' target/test.log
	@if [ -s target/skipped.log ]; then echo "skipped:"; sed 's/^/  /' target/skipped.log; fi

## The Debian package from release binaries (target/llama-orch_VERSION_ARCH.deb), checked by
## lintian: `sudo apt install ./target/llama-orch_*.deb` (docs/OPERATIONS.md).
deb:
	$(CARGO) build --release --bins
	scripts/build-deb.sh --bins "$(BIN_DIR)/release"
	lintian --fail-on error target/llama-orch_*_$$(dpkg --print-architecture).deb

## Two release builds of this commit from fresh clones in different directories (own HOME and
## target directory each), every binary's sha256 side by side; exit 1 when any differs
## (scripts/repro.sh, about twice a release build; REPRO_DIR=<dir> keeps the builds).
repro:
	scripts/repro.sh

## The same check of the CUDA engine (make build-cuda), for one architecture by default
## (LLORCH_CUDA_ARCHS); about 35 minutes a build on 2 cores.
repro-cuda:
	scripts/repro.sh --cuda

## The appliance test alone: boot the units under a real systemd in systemd-nspawn.
test-appliance: build
	$(CARGO) test -p llorch-tests --test appliance -- --nocapture

## The cloud tests alone: a control plane and two workers in network namespaces, as processes
## and as containers booted with systemd (TLS, node tokens, lost links, restarts).
test-cloud: build
	$(CARGO) test -p llorch-tests --test cloud -- --nocapture

## The fault matrix alone: SIGKILLs at seeded points, model files deleted or replaced, the
## handoff directory removed, a full cache, under systemd with clients streaming (about 50 s).
## LLORCH_FAULT_SEED=N replays a run's kill points.
test-faults: build
	$(CARGO) test -p llorch-tests --test faults -- --nocapture

## A compressed soak: SOAK_MINUTES (default 20) at 80% of the measured capacity with mixed
## cancels; fails when a task is lost or a daemon's memory or descriptors grow.
SOAK_MINUTES ?= 20
soak: build
	SOAK_MINUTES=$(SOAK_MINUTES) $(CARGO) run -q -p llorch-tests --example soak

## Property tests of every parser of outside bytes, for FUZZ_MINUTES (default 2) each, in
## release: random inputs and mutations of the corpus in fuzz/corpus/. A failing input is kept
## by proptest in the crate's proptest-regressions/ (commit it: make test replays it first).
FUZZ_MINUTES ?= 2
FUZZ_TARGETS := "-p llorch-wire --test properties" "-p llorch-wire --test corpus" \
	"-p llorch-gguf --test properties" "-p orchestratord --lib auth::" \
	"-p orchestratord --lib admission::" "-p pool-managerd --lib config::"
fuzz: setup
	@for t in $(FUZZ_TARGETS); do $(CARGO) test --release --no-run $$t >/dev/null 2>&1 || exit 1; done
	@for t in $(FUZZ_TARGETS); do \
	  echo "fuzz: $$t for $(FUZZ_MINUTES) min"; \
	  PROPTEST_CASES=4000000000 timeout $(FUZZ_MINUTES)m $(CARGO) test --release -q $$t >/dev/null 2>target/fuzz.log; \
	  rc=$$?; if [ $$rc -ne 0 ] && [ $$rc -ne 124 ]; then cat target/fuzz.log; echo "fuzz: $$t failed"; exit 1; fi; \
	done; echo "fuzz: no failure"

setup:
	scripts/setup.sh >/dev/null

build: setup
	$(CARGO) build --workspace --bins

## The CUDA engine, built here without a GPU from NVIDIA's CUDA 13 wheels on PyPI (installed once
## into the cache): target/cuda/release/llorch-engine. LLORCH_CUDA_ARCHS picks the GPU
## architectures (default Ampere to Hopper; "90-real" alone for a quicker check). Not part of
## `make test`: llama.cpp's CUDA kernels take long on few cores (times in docs/OPERATIONS.md).
build-cuda: setup
	scripts/build-cuda.sh

## Engine throughput next to in-process llama.cpp, the stack's frontend tax, the control
## plane's capacity with a synthetic node, and the cold start of an on-demand pool (method and
## numbers in docs/PERFORMANCE.md).
bench: setup
	$(CARGO) build --release --bins
	$(CARGO) bench -p llorch-engine --bench throughput
	$(CARGO) bench -p orchestratord --bench frontend
	$(CARGO) bench -p orchestratord --bench capacity
	$(CARGO) bench -p orchestratord --bench nodes
	$(CARGO) bench -p pool-managerd --bench cold_start

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
