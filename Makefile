# Two commands from a fresh clone: `make demo` runs the main job end to end on
# the embedded defaults (local Ray, local files); `make test` runs the tests.
# Each sets itself up (.venv) on first use and is quick once set up.
#
# The install is locked: requirements.lock pins every release the test suite passed on
# (every extra included), and `make setup` installs exactly those with uv. `make lock`
# refreshes the lock; `make test-latest` tries the newest releases in a venv of its own.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VITRAY := $(VENV)/bin/vitray
LOCK := requirements.lock
# The one installer, pinned like the rest: it resolves and installs in seconds where pip takes minutes.
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv
# A machine with an NVIDIA driver gets PyPI's normal (CUDA) torch; one without
# gets torch 2.13.0, which on these CPU machines is a CPU build lying on disk.
# Elsewhere on a CPU machine: make setup TORCH_SPEC="torch==2.13.0" UV_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
# uv reads no pip configuration: a folder of wheels that pip is pointed at (such as a local
# CPU torch) is passed on.
PIP_LINKS = $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
FIND_LINKS = $(foreach d,$(PIP_LINKS),--find-links $(d))
DEMO ?= demo-out
# make demo VERBOSE=1: Ray's and the libraries' own logs too
V := $(if $(VERBOSE),--verbose,)

.PHONY: setup test test-fast test-latest test-lowest lock demo clean

setup: $(VENV)/.installed

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "uv==$(UV_VERSION)"

$(VENV)/.installed: pyproject.toml $(LOCK) | $(UV)
	$(UV) pip install -q --python $(PY) $(FIND_LINKS) "$(TORCH_SPEC)" -c $(LOCK) -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q --durations=15

# Unit tests and small integration (a real S3 server, no Ray cluster): a few minutes.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not ray"

# The newest release of every dependency that pyproject.toml allows (torch as TORCH_SPEC says),
# in a venv of its own: the releases that differ from the lock, then the fast lane, which
# includes one train -> evaluate -> score -> export from the command line. `make test-lowest`
# does the same with the lowest release each lower bound in pyproject.toml allows.
test-latest: LANE := .venv-latest
test-latest: RESOLUTION := highest
test-lowest: LANE := .venv-lowest
test-lowest: RESOLUTION := lowest-direct
test-latest test-lowest: | $(UV)
	test -x $(LANE)/bin/python || $(PYTHON) -m venv $(LANE)
	$(UV) pip install -q --python $(LANE)/bin/python --upgrade --resolution $(RESOLUTION) $(FIND_LINKS) \
	    "$(TORCH_SPEC)" -e ".[dev]"
	$(LANE)/bin/python -m vitray.versions
	$(LANE)/bin/python -m pytest -q -m "not slow and not ray"

# Re-resolve the lock: the newest releases pyproject.toml allows, for CPython 3.11 on x86-64
# Linux (CI's), every extra included. torch is left out (TORCH_SPEC chooses its build); it is
# resolved as the CPU build so that no CUDA libraries are pinned. Run the suite after it.
lock: | $(UV)
	echo "torch==2.13.0" > $(VENV)/torch-for-lock.txt
	$(UV) pip compile -q pyproject.toml --all-extras --upgrade --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 $(FIND_LINKS) -c $(VENV)/torch-for-lock.txt \
	    --no-emit-package torch --custom-compile-command "make lock" -o $(LOCK)
	! grep -q '^nvidia-' $(LOCK) || { echo "make lock: CUDA libraries were pinned: point PIP_FIND_LINKS or UV_INDEX at a CPU torch" >&2; exit 1; }

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
