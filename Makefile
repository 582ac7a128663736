# Tollgate: every target creates or reuses .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench lint clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tollgate dev

test: $(STAMP)
	$(PY) -m pytest

# Each benchmark prints one JSON line; see README "Benchmarks".
BENCHES := ledger streams inference gateway overspend
bench: $(STAMP)
	@for name in $(BENCHES); do $(PY) -m bench.$$name || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
