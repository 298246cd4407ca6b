# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# Both create the virtual environment on first use (.venv, Python 3.10+), installing accel from pyproject.toml
# with every version pinned by the committed lock, constraints.txt (`make lock` refreshes it).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.accel-installed
LOCK := constraints.txt
LOCK_VENV := .venv-lock

.PHONY: install run test test-slow lint lock unpinned-check

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c $(LOCK) -e ".[dev]"
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

# Resolve everything afresh (newest releases), run the test suite on it, and replace the lock only if it passes.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -e ".[dev]"
	$(LOCK_VENV)/bin/python -m pytest -q
	$(LOCK_VENV)/bin/python .ci/write_lock.py $(LOCK)
	rm -rf $(LOCK_VENV)

# CI's second job: a fresh, unpinned, non-editable install used from outside the repository.
unpinned-check:  ## CI's second job, by hand
	python3 .ci/unpinned.py
