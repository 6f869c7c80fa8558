# Quick start: `make test` (sets up .venv on first use, then runs the tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast clean-venv

setup: $(STAMP)

# One pip command over exact pins (requirements.txt) plus the package itself, editable.
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# Everything except the end-to-end tests marked slow.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
