# Two entry points: `make demo` (the main job on its defaults) and `make test` (the suite).
# Both create .venv and install aeshield into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aeshield-installed

.PHONY: demo test lint install bench audit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/aeshield data fetch mnist
	$(BIN)/aeshield reproduce demo --profile quick --no-progress --out runs/results

test: $(STAMP)
	$(BIN)/aeshield data fetch mnist
	$(BIN)/python -m pytest -q

# The layer contract (pyproject's [tool.importlinter]) and the linter; CI runs both.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python benchmarks/pgd_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
