# kdrun — common tasks. `make help` lists them.
#
# Where kdrun is installed: inside an active virtual or conda environment ($VIRTUAL_ENV or
# $CONDA_PREFIX set), into that environment with $(PYTHON); otherwise into a project-local .venv
# made with $(PYTHON) -m venv (a stock Debian/Ubuntu Python is "externally managed", PEP 668, and
# refuses installs into itself). `make demo PYTHON=/usr/bin/python3` picks the interpreter.
PYTHON ?= python3
PYTEST_ARGS ?=
# `make test` spreads the suite over this many pytest-xdist workers (the CPU count, at most 4;
# 0 runs it in this one process). Each test file runs on one worker: module fixtures and the
# README's ordered command blocks stay together.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; [ $$n -lt 2 ] && n=0; echo $$n)
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadfile
BENCH_ARGS ?=
ACTIVE_ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX))

ifeq ($(ACTIVE_ENV),)
VENV := .venv
PY := $(VENV)/bin/python
else
VENV :=
PY := $(PYTHON)
endif

.PHONY: help install demo test test-all lint format bench gpu-check clean env

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

env:  ## make the .venv when no environment is active (install, demo and test do it first)
ifeq ($(ACTIVE_ENV),)
	@echo "make: no active virtual or conda environment: installing into the project's .venv"
	@if [ ! -x $(PY) ]; then \
	  $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "make: $(PYTHON) cannot create a virtual environment (no venv/ensurepip module): install it with 'sudo apt-get install python3-venv' (Debian/Ubuntu), or activate an environment of your own"; exit 1; }; \
	  $(PYTHON) -m venv $(VENV) || exit 1; \
	fi
else
	@echo "make: installing into the active environment $(ACTIVE_ENV)"
endif

install: env  ## install kdrun and its test tools (editable)
	$(PY) -m pip install -e ".[dev]"

demo: install  ## install, then train the embedded default (digits, small_cnn) on this machine
	$(PY) -m kdrun

test: install  ## install, then run the test suite on TEST_WORKERS processes (skips slow/gpu tests and slurm ones that cannot run)
	$(PY) -m pytest -q $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-all: install  ## include tests marked slow
	$(PY) -m pytest -q --runslow $(PYTEST_PARALLEL) $(PYTEST_ARGS)

lint:  ## ruff lint + format check
	$(PY) -m ruff check kdrun tests scripts benchmarks hydra_plugins
	$(PY) -m ruff format --check kdrun tests scripts benchmarks hydra_plugins

format:  ## apply ruff formatting and safe fixes
	$(PY) -m ruff check --fix kdrun tests scripts benchmarks hydra_plugins
	$(PY) -m ruff format kdrun tests scripts benchmarks hydra_plugins

bench:  ## method overhead and metric benchmarks (ratios measured in one run; BENCH_ARGS=...)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

gpu-check:  ## on a GPU machine: the GPU test tier and the throughput benchmark (scripts/gpu-check.sh)
	scripts/gpu-check.sh

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs/runs outputs/multiruns outputs/teachers outputs/optuna .pytest_cache .ruff_cache
