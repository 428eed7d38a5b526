# Two entry points: `make run` (the main job) and `make test` (the test suite). Each creates or reuses
# a virtual environment keyed by a hash of pyproject.toml's dependencies (.ci/env_key.py), so an
# unchanged environment is built once.

PYTHON ?= python3
VENV_ROOT ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ghostserve-sglang
VENV := $(VENV_ROOT)/venv-$(shell $(PYTHON) .ci/env_key.py)
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
RUN_PORT ?= 30000
# A stock SGLang server on the bundled tiny model (seeded weights and a tokenizer, generated at set-up),
# on CPU in float32, with SGLang's /metrics on.
CPU_SERVER := --model-path ghostserve_sglang/models/tiny-llama --device cpu --attention-backend torch_native \
	--disable-cuda-graph --dtype float32 --max-total-tokens 8192 --host 127.0.0.1 --enable-metrics

.PHONY: setup run test bench check-sglang

setup:
	@bash .ci/setup.sh "$(PYTHON)" "$(VENV)"

run: setup
	$(PY) -m ghostserve_sglang.launch $(CPU_SERVER) --tp-size 2 --port $(RUN_PORT) --ghost-code xor

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

# GhostServe against the paper's baselines on this machine: benchmarks/results/cpu/report.md and plots
# (about 20 minutes). The single benchmarks in benchmarks/ also run on their own.
bench: setup
	$(PY) benchmarks/report.py

# GhostServe against another SGLang release, in an environment of its own (created once, about ten
# minutes): the installed release against the declarations, then the TP=2 protected smoke test
# (about two minutes). Its output is kept in benchmarks/results/sglang-<release>-check.txt.
SGLANG ?= 0.5.22
check-sglang:
	bash -c 'set -o pipefail; bash .ci/check_sglang_release.sh "$(PYTHON)" "$(VENV_ROOT)" "$(SGLANG)" \
		| tee benchmarks/results/sglang-$(SGLANG)-check.txt'
