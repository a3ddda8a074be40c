# The two commands of the README. Both create .venv when it is missing and are idempotent:
# a stamp file per install step records what was installed, and pyproject.toml changes redo it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: run test lint format browser clean-venv

# pip compiles what it installs to bytecode one file after another; compileall does it on every
# core (a fresh .venv here: 75.7 s against 105.9 s). Installed files need their .pyc: where
# PYTHONDONTWRITEBYTECODE is set, as in this workplace, a file left uncompiled is compiled again
# by every process that imports it. compileall exits 1 when a file does not compile (torch ships
# one for Python 3.12 only); pip ignores those too.
PIP_INSTALL := $(BIN)/pip install -q --no-compile
COMPILE := $(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
# The project's own modules too, at every run and test (an editable install leaves them in src/):
# the test suite starts some 300 Python processes, and each compiled what it imported (about
# 60 ms for the trainer, server and exporter modules).
# A file edited since is compiled again in memory, as without this.
COMPILE_SRC := $(BIN)/python -m compileall -qq -j 0 src

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: it takes the CPU build on disk instead of a multi-GB CUDA download.
$(VENV)/.torch: | $(BIN)/python
	$(PIP_INSTALL) $(TORCH)
	$(COMPILE)
	touch $@

$(VENV)/.runtime: pyproject.toml $(VENV)/.torch
	$(PIP_INSTALL) -e .
	$(COMPILE)
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.torch
	$(PIP_INSTALL) -e '.[dev]'
	$(COMPILE)
	touch $@

run: $(VENV)/.runtime
	@$(COMPILE_SRC)
	$(BIN)/crosschip run --config configs/default.toml

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(VENV)/.dev
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# The report test renders run reports in headless Chromium (Debian's package; no browser download).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
	  || echo "chromium missing and not installable here: the report rendering test will fail"; }

# The suite in two parts. Most tests spend their time in one Python thread (process start-up,
# ONNX tracing, tiny models), so they run on one pytest worker per core at one torch thread
# each. Tests marked solo (the default run's 5-minute learning check and the tests of the
# model it trains) run afterwards with the machine to themselves. Both parts always
# run; the target fails if either does. A plain `pytest` runs everything in one process.
# On a new machine the browser's Debian packages and the .venv's pip packages install side by side.
TEST_WORKERS ?= auto
test:
	@$(MAKE) --no-print-directory -j 2 lint browser
	@$(COMPILE_SRC)
	@status=0; \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not solo" || status=1; \
	$(BIN)/python -m pytest -m solo || status=1; \
	exit $$status

clean-venv:
	rm -rf $(VENV)
