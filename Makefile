# decnet-attr — the entry points the README names.
#   make run    set up if needed, then run the main job (embedded default)
#   make test   set up if needed, then cargo test + pytest
#   make lint   ruff, mypy, stubtest (_core.pyi against the built module),
#               cargo fmt --check, cargo clippy -D warnings
#   make bench  benchmarks (pytest-benchmark + criterion); see benches/RESULTS.md

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
export PATH := $(HOME)/.cargo/bin:$(PATH)
export CARGO_TERM_COLOR := never

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := .build
SO := python/decnet_attr/_core.abi3.so
RUST_SRC := $(shell find rust -name '*.rs' 2>/dev/null) Cargo.toml python/decnet_attr/data/primitives.json
DATA_DIR ?= .data
# axe-core (npm) for the dashboard's accessibility check in Chromium
AXE_VERSION := 4.10.3
AXE := $(STAMP)/npm/node_modules/axe-core/axe.min.js

.PHONY: setup system run test test-rust test-py lint bench clean

setup: system $(SO) $(AXE)

# apt packages: checked every time (quick), installed only when missing.
system:
	@scripts/setup-system.sh

.cargo/config.toml: scripts/cargo-config.sh
	@scripts/cargo-config.sh

$(STAMP)/venv: pyproject.toml
	@mkdir -p $(STAMP)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check "maturin>=1.4,<2"
	@touch $@

$(AXE):
	@mkdir -p $(STAMP)/npm
	@npm install --silent --no-audit --no-fund --prefix $(STAMP)/npm "axe-core@$(AXE_VERSION)"
	@test -f $@

# The extension, built in release mode and installed editable into .venv
# together with the runtime and dev dependencies.
$(SO): $(RUST_SRC) pyproject.toml .cargo/config.toml $(STAMP)/venv
	@echo "setup: building decnet_attr._core (release)"
	@mkdir -p $(STAMP)
	@VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release --extras dev \
		> $(STAMP)/build.log 2>&1 || { cat $(STAMP)/build.log >&2; echo "setup: build failed (log above)" >&2; exit 1; }
	@touch $@

# The main job: API + SSE + dashboard + worker on the embedded default
# (in-process bus + SQLite in $(DATA_DIR)). First start prints the admin
# password once. Ctrl-C stops it gracefully.
run: setup
	$(VENV)/bin/decnet-attr serve --data-dir $(DATA_DIR)

test: setup test-rust test-py

test-rust: .cargo/config.toml
	cargo test --release -q

test-py: setup
	$(VENV)/bin/pytest -q

lint: setup
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest decnet_attr._core
	cargo fmt --check
	cargo clippy --release --all-targets -q -- -D warnings
	cargo clippy --release --features extension-module -q -- -D warnings

bench: setup
	$(VENV)/bin/pytest benches -q --benchmark-enable --benchmark-only --benchmark-columns=min,median,mean,ops,rounds
	cargo bench --bench core

clean:
	rm -rf $(STAMP) target $(SO)
