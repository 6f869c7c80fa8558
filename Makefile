# Quick start: `make demo` (the whole method on a CPU, ~15 min) and `make test` (sets up .venv on first use).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo demo-smoke clean-venv

setup: $(STAMP)

# One pip command over exact pins (requirements.txt) plus the package itself, editable. --no-compile: Python
# compiles only the modules it imports, on first import (halves the install: ~105 s -> ~55 s on 2 cores).
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements.txt -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# Everything except the end-to-end tests marked slow.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The whole method on easy-vqa's real images (urt demo): report in runs/demo/report.{json,md,png}.
demo: setup
	$(VENV)/bin/urt demo $(ARGS)

demo-smoke: setup
	$(VENV)/bin/urt demo demo=smoke $(ARGS)

clean-venv:
	rm -rf $(VENV)
