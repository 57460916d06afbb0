# The two commands a new user runs: `make demo` and `make test`. Each sets itself up:
# a virtual environment in .venv, torch first (the CPU wheel, so no CUDA build is resolved),
# then the project.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all lint format bench clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e .
	touch $@

# dev tools, test oracles and Flower (its simulation extra: Ray), after torch as above
$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e '.[dev,flower-sim]'
	touch $@

demo: $(VENV)/.dev
	$(VENV)/bin/meanwise reproduce all --quick --out reports/

test: $(VENV)/.dev
	$(PY) -m pytest

test-all: $(VENV)/.dev
	$(PY) -m pytest -m ''

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

# every benchmark's quick run, each also writing bench-<name>.json (tens of minutes in all)
bench: $(VENV)/.dev
	set -e; for b in benchmarks/[a-z]*.py; do \
		$(PY) $$b --quick --json bench-$$(basename $$b .py).json; \
	done

clean:
	rm -rf $(VENV) reports build src/*.egg-info
