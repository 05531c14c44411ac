# The README's two commands: `make run` (local dev setup) and `make test`.
# Both install what they need: system packages (scripts/install-system-deps.sh) and the Python
# packages into .venv, from the hashed lock (re-installed only when it is newer than the stamp).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Every package and its hashes: the image installs LOCK, the venv DEV_LOCK (LOCK's versions plus
# the dev extras). `make lock` writes both from pyproject.toml.
LOCK     := requirements.lock
DEV_LOCK := requirements-dev.lock
# uv's universal resolution from Python 3.11 up: one lock for Linux/CPython 3.11 (CI, the image)
# that keeps the markers (uvloop not on win32, async-timeout only below 3.11.3). Pins already in
# a lock stay unless LOCK_FLAGS says otherwise: --upgrade, or --upgrade-package NAME.
LOCK_FLAGS ?=
COMPILE = $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command "make lock" --quiet $(LOCK_FLAGS)

.DEFAULT_GOAL := help

.PHONY: help
help:
	@echo "make run    local dev setup: Redis + PostgreSQL, then the gateway (scripts/run-dev.sh)"
	@echo "make test   lint + the test suite, then its key-store part on a Redis Cluster (CI)"
	@echo "make lint   ruff check, ruff format --check, mypy --strict app tests scripts"
	@echo "make fmt    ruff format + ruff check --fix"
	@echo "make bench  gateway bench --compare (simulator, bare relay, gateway)"
	@echo "make deps   install redis-server / postgresql from Debian packages if missing"
	@echo "make venv   create .venv, install $(DEV_LOCK) (hashes checked) and the project"
	@echo "make lock   write $(LOCK) and $(DEV_LOCK) from pyproject.toml (LOCK_FLAGS=--upgrade)"

.PHONY: deps
deps:
	@bash scripts/install-system-deps.sh

# The project itself without dependencies (the lock has them) and without build isolation (the
# lock's setuptools builds it).
$(STAMP): $(DEV_LOCK) pyproject.toml | deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r $(DEV_LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check  # a lock that no longer meets pyproject.toml: run make lock
	@touch $(STAMP)

.PHONY: venv
venv: $(STAMP)

.PHONY: lock
lock: venv
	$(COMPILE) --extra build -o $(LOCK)
	$(COMPILE) --extra build --extra dev -c $(LOCK) -o $(DEV_LOCK)

.PHONY: lint
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict app tests scripts

# The whole suite on one Redis server (Sentinel tests start their own primary, replica and
# Sentinels), then the key store's tests again on a throwaway six-node Redis Cluster.
.PHONY: test
test: deps venv lint
	$(BIN)/pytest -q -p no:cacheprovider -rfEs
	$(MAKE) --no-print-directory test-sentinel test-cluster

# The key store's tests on a throwaway six-node Redis Cluster, and on a primary with a replica
# under three Sentinels (tests/services.py); about a minute each, the servers' start included.
CLUSTER_TESTS = tests/test_ws_handshake.py tests/test_admin_api.py tests/test_admin_live.py \
	tests/test_admin_races.py tests/test_session_limits.py tests/test_hot_path_parts.py \
	tests/test_guard.py tests/test_secrets.py tests/test_keystore_layout.py tests/test_spend.py

.PHONY: test-cluster
test-cluster: venv
	TEST_REDIS_TOPOLOGY=cluster $(BIN)/pytest -q -p no:cacheprovider -rfEs $(CLUSTER_TESTS)

.PHONY: test-sentinel
test-sentinel: venv
	TEST_REDIS_TOPOLOGY=sentinel $(BIN)/pytest -q -p no:cacheprovider -rfEs $(CLUSTER_TESTS)

.PHONY: run
run: deps venv
	bash scripts/services.sh ensure
	set -a && . ./var/services.env && set +a && exec bash scripts/run-dev.sh

.PHONY: fmt
fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: bench
bench: deps venv
	$(BIN)/gateway bench --compare
