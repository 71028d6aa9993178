# kdrun — common tasks. `make help` lists them.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
PYTEST_ARGS ?=

.PHONY: help install demo test test-all lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-10s %s\n", $$1, $$2}'

install:  ## install kdrun and its test tools (editable)
	$(PIP) install -e ".[dev]"

demo: install  ## install, then train the embedded default (digits, small_cnn) on this machine
	kdrun

test: install  ## install, then run the test suite (skips slow/gpu/slurm-only tests that cannot run)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

test-all: install  ## include tests marked slow
	$(PYTHON) -m pytest -q --runslow $(PYTEST_ARGS)

lint:  ## ruff lint + format check
	ruff check kdrun tests scripts benchmarks hydra_plugins
	ruff format --check kdrun tests scripts benchmarks hydra_plugins

format:  ## apply ruff formatting and safe fixes
	ruff check --fix kdrun tests scripts benchmarks hydra_plugins
	ruff format kdrun tests scripts benchmarks hydra_plugins

bench:  ## method overhead and metric benchmarks (ratios measured in one run)
	$(PYTHON) benchmarks/run.py

clean:  ## remove run outputs and caches
	rm -rf outputs/runs outputs/multiruns outputs/teachers .pytest_cache .ruff_cache
