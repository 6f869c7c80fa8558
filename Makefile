# Quick start: `make demo` (the whole method on a CPU, ~10 min) and `make test` (sets up .venv on first use).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo demo-smoke clean-venv

# Let Python keep compiled modules (.pyc) in .venv: where the environment turns that off, every process (each test
# that runs the CLI in a subprocess, each DDP rank) compiles torch, transformers and lightning from source again
# (imports 18.6 s instead of 7.1 s on 2 cores).
unexport PYTHONDONTWRITEBYTECODE

setup: $(STAMP)

# One install over exact pins (requirements.txt) plus the package itself, editable, by uv: it unpacks each wheel
# once into its cache and links it into every later venv (the 6 GB torch/CUDA set: ~85 s with pip, ~30 s with
# uv on a cold cache, ~7 s warm, on 2 cores). Where uv cannot be installed or fails, pip does it (--no-compile: Python
# compiles only the modules it imports). UV=0 forces pip.
UV ?= 1
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	if [ "$(UV)" = 1 ] && $(PY) -m pip install -q uv==0.13.9 \
	    && $(VENV)/bin/uv pip install -q --python $(PY) -r requirements.txt -e .; then :; \
	else \
	  $(PY) -m pip install -q --upgrade pip && $(PY) -m pip install -q --no-compile -r requirements.txt -e .; \
	fi
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
