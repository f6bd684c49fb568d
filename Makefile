# Two entry points: `make serve` and `make test`. Both create .venv on first use and install torch first (a CPU
# build unless TORCH says otherwise), then the exact locked set of everything else, then the project itself.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
LOCK ?= requirements/requirements-dev.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
LATEST_VENV ?= .venv-latest

.PHONY: serve test test-fast test-latest lint lock tools

# --no-deps: the lock is the whole set, resolved once by `make lock`; pip installs exactly it (hash-checked) and
# `pip check` proves it consistent with the torch installed before it.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# docker-compose is only needed to validate docker-compose.yml in the suite; Debian ships it.
tools:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
	  else echo "docker-compose not found: the compose-file test will be skipped"; fi; }

serve: $(STAMP)
	$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: $(STAMP) tools lint
	$(BIN)/python -m pytest -q

# The tier that runs in seconds, for the edit-test loop: unit tests and the engine driven directly on tiny models.
# No Redis, no server, no training, no subprocess, no lint (the markers: pyproject.toml, tests/conftest.py).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not redis and not slow and not gpu"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# The same suite on the newest release of every dependency, ignoring the lock (torch stays at $(TORCH): a newer
# one would be a multi-GB CUDA download). Tests whose reference is PEFT become expected failures only when a probe
# shows PEFT itself broken on that transformers release; the golden-output tests must pass regardless.
test-latest: tools
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	echo "$(TORCH)" > $(LATEST_VENV)/torch-constraint.txt
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
	  -c $(LATEST_VENV)/torch-constraint.txt -e '.[dev]'
	$(LATEST_VENV)/bin/python -m pip check
	PREFIXSERVE_TEST_LATEST=1 $(LATEST_VENV)/bin/python -m pytest -q -rxX

# Re-resolves both lock files (runtime: the Docker images; dev: make serve/test). Existing pins are kept unless
# asked: `make lock UPGRADE=--upgrade`, or `make lock UPGRADE="--upgrade-package transformers"`.
LOCK_FLAGS = --quiet --generate-hashes --all-build-deps --unsafe-package torch --strip-extras \
  --no-emit-index-url --no-emit-find-links -c requirements/constraints.txt $(UPGRADE)
lock: $(STAMP)
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS) \
	  -o requirements/requirements-runtime.txt pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS) --extra dev \
	  -c requirements/requirements-runtime.txt -o requirements/requirements-dev.txt pyproject.toml
