# The README's two commands: `make run` (local dev setup) and `make test`.
# Both install what they need: system packages (scripts/install-system-deps.sh) and the Python
# packages into .venv (re-installed only when pyproject.toml is newer than the stamp).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help

.PHONY: help
help:
	@echo "make run    local dev setup: Redis + PostgreSQL, then the gateway (scripts/run-dev.sh)"
	@echo "make test   lint + the test suite (what CI runs via .ci/run)"
	@echo "make lint   ruff check, ruff format --check, mypy --strict app"
	@echo "make fmt    ruff format + ruff check --fix"
	@echo "make bench  gateway bench --compare (simulator, bare relay, gateway)"
	@echo "make deps   install redis-server / postgresql from Debian packages if missing"
	@echo "make venv   create .venv and pip install -e '.[dev]' when pyproject.toml changed"

.PHONY: deps
deps:
	@bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml | deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

.PHONY: venv
venv: $(STAMP)

.PHONY: lint
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict app

.PHONY: test
test: deps venv lint
	$(BIN)/pytest -q -p no:cacheprovider -rfEs

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
