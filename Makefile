# Two commands from a fresh clone: `make demo` runs the main job end to end on
# the embedded defaults (local Ray, local files); `make test` runs the tests.
# Each sets itself up (.venv) on first use and is quick once set up.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VITRAY := $(VENV)/bin/vitray
# A machine with an NVIDIA driver gets PyPI's normal (CUDA) torch; one without
# gets torch 2.13.0, which on these CPU machines is a CPU build lying on disk.
# Elsewhere on a CPU machine: make setup TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
DEMO ?= demo-out
# make demo VERBOSE=1: Ray's and the libraries' own logs too
V := $(if $(VERBOSE),--verbose,)

.PHONY: setup test test-fast demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q --durations=15

# Unit tests and small integration (a real S3 server, no Ray cluster): a few minutes.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not ray"

demo: setup
	rm -rf $(DEMO)
	$(VITRAY) synth $(DEMO)/data --n 3000 --seed 1 $(V)
	$(VITRAY) synth $(DEMO)/test --n 300 --seed 2 --passed-fraction 0.2 $(V)
	$(VITRAY) train --data $(DEMO)/data --out $(DEMO)/run --epochs 25 --workers 2 $(V)
	$(VITRAY) evaluate --model $(DEMO)/run/model --data $(DEMO)/test --out $(DEMO)/eval $(V)
	$(VITRAY) score --model $(DEMO)/run/model --input $(DEMO)/test --output $(DEMO)/scores --attention defects $(V)
	@echo "demo outputs in $(DEMO)/: run/ (model, metrics, plots), eval/, scores/ (predictions, report.html)"

clean:
	rm -rf $(DEMO) .pytest_cache
