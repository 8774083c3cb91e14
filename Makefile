# Two commands do all set-up on a fresh machine:
#   make book   install what is needed, build the executed book into _build/html
#   make test   install what is needed, run every check
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The machine's pip configuration points at local mirrors that print one warning per
# package; keep the log readable.
QUIET_PIP := grep -v "^WARNING: Location" || true
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONHASHSEED := 0

.PHONY: help venv book test unit nbval build-book browser-check experiments-check experiments benchmark chromium notebooks clean

help:
	@echo "make book         build the executed book into _build/html"
	@echo "make test         unit tests, doctests, notebook checks, book build, browser check"
	@echo "make experiments  run the full training study (slow) and store its results"
	@echo "make benchmark    quantize speed benchmark -> benchmarks/RESULTS.md"
	@echo "make notebooks    re-execute the chapters and store their outputs"

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, bitsandbytes, jupyter_book, nbval, fp4lib"
	touch $(STAMP)

venv: $(STAMP)

# Debian's chromium and its driver, for the browser check.
chromium:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# Always from scratch (--all and no cache): every chapter runs on the current code.
build-book: venv
	rm -rf _build
	$(VENV)/bin/jupyter-book build . --all -W --keep-going
	@echo "Book: $(CURDIR)/_build/html/index.html"

book: build-book

unit: venv
	$(PY) -m pytest -q -p no:cacheprovider

nbval: venv
	$(PY) -m pytest -q -p no:cacheprovider --nbval book/ --nbval-sanitize-with tests/nbval_sanitize.cfg

experiments-check: venv
	@if [ -f fp4lib/experiments.py ]; then $(PY) -m fp4lib.experiments check; fi

browser-check: chromium
	$(PY) tests/browser_check.py _build/html

test: venv chromium
	$(MAKE) unit
	$(MAKE) experiments-check
	$(MAKE) nbval
	$(MAKE) build-book
	$(MAKE) browser-check

experiments: venv
	$(PY) -m fp4lib.experiments run

benchmark: venv
	$(PY) benchmarks/quantize.py

# Re-execute every chapter and store its outputs in the .ipynb (what nbval compares).
notebooks: venv
	$(PY) tests/store_outputs.py

clean:
	rm -rf _build
