# The human entry point. `make run` and `make test` are the two quick-start commands; both work
# on a fresh Debian or Ubuntu machine with a Rust toolchain (scripts/setup.sh installs the rest
# when run as root or with sudo, and fetches the default model once).

SHELL := /bin/bash
LLORCH_CACHE ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)/llama-orch
export LLORCH_CACHE
MODEL := $(LLORCH_CACHE)/default-model/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
CARGO ?= cargo

.PHONY: run demo test test-appliance test-cloud setup build bench lint fmt

## Set up, build, and run the home stack on the default model at http://127.0.0.1:8080 until Ctrl-C.
run: build
	target/debug/llorch up --model "$(MODEL)" --sha256 $(MODEL_SHA256) --model-id smollm2-135m

## The engine alone: stage the default model, stream one answer, stop.
demo: build
	target/debug/llorch demo --model "$(MODEL)" --sha256 $(MODEL_SHA256)

## Set up, build, and run every test (unit, integration, end to end on the real model).
test: build
	set -o pipefail; $(CARGO) test --workspace 2>&1 | tee target/test.log
	@awk '/^test result:/ { p += $$4; f += $$6 } END { printf "tests: %d passed, %d failed\n", p, f }' target/test.log

## The appliance test alone: boot the units under a real systemd in systemd-nspawn.
test-appliance: build
	$(CARGO) test -p llorch-tests --test appliance -- --nocapture

## The cloud tests alone: a control plane and two workers in network namespaces, as processes
## and as containers booted with systemd (TLS, node tokens, lost links, restarts).
test-cloud: build
	$(CARGO) test -p llorch-tests --test cloud -- --nocapture

setup:
	scripts/setup.sh >/dev/null

build: setup
	$(CARGO) build --workspace --bins

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
