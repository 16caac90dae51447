# Two entry points: `make demo` (the main job on its defaults) and `make test` (the suite).
# Both create .venv and install aeshield into it first: demo the `attacks` extra (what it runs:
# its audit column is the audit's battery, whose AutoAttack parts come from pyautoattack), test
# and lint the `test` extra (the suite's own packages and the extras it exercises).
# `make docs` builds the user pages and the API reference (the `docs` extra) into site/.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# One stamp per install; each is redone when pyproject.toml changes.
CORE := $(VENV)/.aeshield-core
DEMO := $(VENV)/.aeshield-demo
TEST := $(VENV)/.aeshield-test
DOCS := $(VENV)/.aeshield-docs

.PHONY: demo test lint docs install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(CORE): pyproject.toml | $(BIN)/python
	$(PIP) -e .
	touch $(CORE)

$(DEMO): pyproject.toml | $(BIN)/python
	$(PIP) -e '.[attacks]'
	touch $(DEMO)

$(TEST): pyproject.toml | $(BIN)/python
	$(PIP) -e '.[test]'
	touch $(TEST)

$(DOCS): pyproject.toml | $(BIN)/python
	$(PIP) -e '.[docs]'
	touch $(DOCS)

install: $(CORE)

demo: $(DEMO)
	$(BIN)/aeshield data fetch mnist
	$(BIN)/aeshield reproduce demo --profile quick --no-progress --out runs/results

test: $(TEST)
	$(BIN)/aeshield data fetch mnist
	$(BIN)/python -m pytest -q

# The layer contract (pyproject's [tool.importlinter]) and the linter; CI runs both.
lint: $(TEST)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports

# --strict: a warning (a broken link, a docstring whose parameters do not match the signature,
# a `:::` directive naming nothing) fails the build; CI runs it. Not --quiet: it hides the
# warnings from the count, and the build then passes whatever they say.
docs: $(DOCS)
	$(BIN)/mkdocs build --strict --site-dir site

bench: $(CORE)
	$(PIP) -e '.[bench]'
	$(BIN)/python benchmarks/pgd_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache site
