# Each target sets up its own virtualenv: `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is pinned for the venv only (a CPU wheel); the package itself supports torch>=2.11.
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench venv browser

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/sparsefx demo $(ARGS)

# The HTML report's test opens it in headless Chromium (Debian's package): installed here when
# missing and this runs as root with apt-get; otherwise that one test fails saying what to install.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "note: chromium is not installed; the HTML report's browser test needs it (apt-get install chromium)"

# pytest-xdist: one worker per core, at most 4 (each worker starts its own Inductor compile pool)
test: $(VENV)/.installed browser
	$(PY) -m pytest -q -p no:cacheprovider --hypothesis-profile=ci -n auto --maxprocesses=4

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PY) benchmarks/step_time.py
