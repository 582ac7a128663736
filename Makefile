# Tollgate: every target creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test simulate bench lint clean-venv

# pip: -qq shows errors only (no build backend or setuptools chatter, no root-user or new-version notices).
PIP_INSTALL := $(PY) -m pip install -qq --disable-pip-version-check --root-user-action=ignore --no-warn-script-location

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (the first time takes a few minutes)"
	@$(PIP_INSTALL) --upgrade pip
	@$(PIP_INSTALL) -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tollgate dev

test: $(STAMP)
	$(PY) -m pytest

# The processor simulation (tests/simulation/): `make simulate SEEDS=N` runs seeds 0..N-1 (`FIRST=S` to
# start elsewhere); `make simulate SEED=S` replays one seed exactly and prints its steps.
SEEDS ?= 2000
FIRST ?= 0
simulate: $(STAMP)
	$(PY) -m tests.simulation $(if $(SEED),--seed $(SEED),--seeds $(SEEDS) --first $(FIRST))

# Each benchmark prints one JSON line; see README "Benchmarks".
BENCHES := ledger scoped streams replay inference gateway overspend soak finance responses audit console
bench: $(STAMP)
	@for name in $(BENCHES); do $(PY) -m bench.$$name || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
