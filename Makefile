# batchd: `make run` starts the daemon on the embedded default; `make test` runs every test.
# Both create the virtualenv (.venv) and install pinned versions (constraints.txt) first.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: run test lint services venv clean

$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  echo "installing python3-venv"; apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	@touch $@

$(VENV)/.test-installed: $(VENV)/.run-installed
	$(PIP) -e '.[test]'
	@touch $@

venv: $(VENV)/.test-installed

run: $(VENV)/.run-installed
	$(BIN)/batchd serve $(ARGS)

services:
	bash tests/services/ensure.sh

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(VENV)/.test-installed services lint
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
