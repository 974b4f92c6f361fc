# Two commands for a new user: `make dev` runs everything, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup dev test test-all lint format migration clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

dev: $(STAMP)
	$(BIN)/journeys dev

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Regenerates the initial schema migration from core/tables.py (before the first release).
migration: $(STAMP)
	rm -f migrations/versions/0001_initial.py /tmp/journeys-migration.db
	JOURNEYS_DATABASE_URL=sqlite:////tmp/journeys-migration.db $(BIN)/alembic -c alembic.ini revision --autogenerate --rev-id 0001 -m initial
	$(BIN)/ruff format -q migrations/versions

clean:
	rm -rf $(VENV) .journeys .pytest_cache
