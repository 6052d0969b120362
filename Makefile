# Each target sets up its own virtualenv: `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is pinned for the venv only (a CPU wheel); the package itself supports torch>=2.11.
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/sparsefx demo $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider --hypothesis-profile=ci

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PY) benchmarks/step_time.py
