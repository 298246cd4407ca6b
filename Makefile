# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# Both create the virtual environment on first use (.venv, Python 3.10+, everything from pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.accel-installed

.PHONY: install run test test-slow lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## the main job: baseline vs every registered accelerator on the default model
	$(BIN)/accel-run

test: $(STAMP)  ## the default test suite (slow tests excluded)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## every test, the slow ones too
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check .
