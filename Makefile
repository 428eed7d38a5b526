# Two entry points: `make run` (the main job) and `make test` (the test suite). Each creates or reuses
# a virtual environment keyed by a hash of pyproject.toml, so an unchanged environment is built once.

PYTHON ?= python3
VENV_ROOT ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ghostserve-sglang
VENV := $(VENV_ROOT)/venv-$(shell sha256sum pyproject.toml | cut -c1-16)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup run test bench

setup:
	@bash .ci/setup.sh "$(PYTHON)" "$(VENV)"

run: setup
	$(PY) -m ghostserve_sglang.codec.demo

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/codec_bench.py
	$(PY) benchmarks/drain_bench.py

