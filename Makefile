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
WORKER ?= 1

.PHONY: serve worker test test-fast test-latest lint lock tools docker-images

# --no-deps: the lock is the whole set, resolved once by `make lock`; pip installs exactly it (hash-checked) and
# `pip check` proves it consistent with the torch installed before it.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# docker-compose is only needed to validate docker-compose.yml in the suite; Debian ships it. Chromium and its
# driver run the console's browser tests (tests/service/test_ui_browser.py).
tools:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
	  else echo "docker-compose not found: the compose-file test will be skipped"; fi; }
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium or chromedriver not found: the console's browser tests will be skipped"; fi; }

# The server and, beside it, one trainer worker (WORKER=0: none); Ctrl-C (or a TERM to make) stops both, and the
# worker stops when the server does. Without a Redis URL (PREFIXSERVE_REDIS_URL, in the environment or .env, read
# through the service's own settings) the worker starts once the server's embedded Redis answers on its socket, and
# is given that socket: it never starts a second Redis.
serve: $(STAMP)
	@trap 'kill -TERM $$server $$worker 2>/dev/null' INT TERM; \
	conf=$$($(BIN)/python -c 'from service.settings import ServiceSettings as S; s = S(); print(s.redis_url or ""); print(s.data_dir.resolve())'); \
	redis_url=$$(echo "$$conf" | sed -n 1p); data=$$(echo "$$conf" | sed -n 2p); \
	worker=; if [ "$(WORKER)" != 0 ] && [ -n "$$redis_url" ]; then \
	  $(BIN)/python -m trainer worker & worker=$$!; \
	elif [ "$(WORKER)" != 0 ]; then \
	  ( until $(BIN)/python -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' \
	      "$$data/redis.sock" 2>/dev/null; do sleep 1; done; \
	    PREFIXSERVE_REDIS_URL="unix://$$data/redis.sock" exec $(BIN)/python -m trainer worker ) & worker=$$!; \
	fi; \
	$(BIN)/python -m service --host $(HOST) --port $(PORT) & server=$$!; \
	wait $$server; status=$$?; \
	if kill -0 $$server 2>/dev/null; then wait $$server; status=$$?; fi; \
	if [ -n "$$worker" ]; then kill -TERM $$worker 2>/dev/null; wait $$worker; fi; \
	exit $$status

# One more trainer worker, on its own (`make serve` starts one): same PREFIXSERVE_* settings as the server. Without
# PREFIXSERVE_REDIS_URL it attaches to the embedded Redis of a `make serve` running here (or starts it).
worker: $(STAMP)
	$(BIN)/python -m trainer worker

# The Docker test (tests/test_docker.py) is its own step after the main suite: the first build of the images takes
# minutes, and a failure there should not hide the main suite's result. It skips where no Docker engine can start.
test: $(STAMP) tools lint
	$(BIN)/python -m pytest -q -m "not docker"
	$(BIN)/python -m pytest -q -m docker tests/test_docker.py

# The images docker-compose.yml runs (docker/build-base.sh): a Debian base made with debootstrap (no image registry
# needed; root), Redis 7, the service and the trainer. BASE_IMAGE=<image> builds on another base (a CUDA one keeps
# its torch).
docker-images:
	docker/build-base.sh

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
	PREFIXSERVE_TEST_LATEST=1 $(LATEST_VENV)/bin/python -m pytest -q -rxX -m "not docker"

# Re-resolves both lock files (runtime: the Docker images; dev: make serve/test). Existing pins are kept unless
# asked: `make lock UPGRADE=--upgrade`, or `make lock UPGRADE="--upgrade-package transformers"`.
LOCK_FLAGS = --quiet --generate-hashes --all-build-deps --unsafe-package torch --strip-extras \
  --no-emit-index-url --no-emit-find-links -c requirements/constraints.txt $(UPGRADE)
lock: $(STAMP)
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS) \
	  -o requirements/requirements-runtime.txt pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile $(LOCK_FLAGS) --extra dev \
	  -c requirements/requirements-runtime.txt -o requirements/requirements-dev.txt pyproject.toml
