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
# A second environment: a plain notebook kernel, with what Colab ships and what the
# chapters' setup cells install (requirements-plain.txt) but no Jupyter Book, myst-nb
# or Sphinx. The cross-kernel pass runs the chapters there.
PLAIN_VENV := .venv-plain
PLAIN_PY := $(PLAIN_VENV)/bin/python
PLAIN_STAMP := $(PLAIN_VENV)/.installed
# ... and it must stay plain: this fails if the book's tooling got into it.
PLAIN_GUARD := $(PLAIN_PY) -c "import importlib.util as u, sys; found = [m for m in ('myst_nb', 'jupyter_book', 'sphinx') if u.find_spec(m)]; sys.exit(f'$(PLAIN_VENV) is not a plain kernel: {found} installed' if found else 0)"
# The machine's pip configuration points at local mirrors that print one warning per
# package; keep the log readable.
QUIET_PIP := grep -v "^WARNING: Location" || true
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONHASHSEED := 0
# torch.compile's on-disk kernel cache does not tell ATen's CPU kernel sets apart, and a
# cache filled under one setting has produced NaN and crashes under another: one cache
# per setting (ATEN_CPU_CAPABILITY unset means the machine's own).
INDUCTOR_CACHE := $(CURDIR)/.cache/inductor
export TORCHINDUCTOR_CACHE_DIR ?= $(INDUCTOR_CACHE)/aten-$(or $(ATEN_CPU_CAPABILITY),native)
# The cross-kernel checks: other CPU kernels, as another machine would run them.
CROSS_KERNEL_ENV := ATEN_CPU_CAPABILITY=default TORCHINDUCTOR_CACHE_DIR=$(INDUCTOR_CACHE)/aten-default

# MathJax, served from the book's own _static: pages typeset their math with no request
# to another host. MathJax 3.2.2's files come from a pip package (requirements.txt), so
# no root, npm or network beyond PyPI is needed.
MATHJAX := book/_static/mathjax/tex-chtml.js

.PHONY: help venv venv-plain plain-guard mathjax book read test unit nbval build-book build-book-stored browser-check experiments-check study-checks cross-kernel cross-kernel-check cross-kernel-nbval experiments benchmark gpu-check chromium notebooks clean

help:
	@echo "make book         build the executed book into _build/html"
	@echo "make read         render the book from the outputs stored in the notebooks (no execution)"
	@echo "make test         unit tests, doctests, notebook checks, book build, browser check"
	@echo "make experiments  run the full training study (slow) and store its results"
	@echo "make benchmark    quantize speed benchmark -> benchmarks/RESULTS.md"
	@echo "make gpu-check    on a CUDA machine: CUDA tests, bitsandbytes CUDA vs fp4lib, bf16 fidelity, gpu-preset timings"
	@echo "make notebooks    re-execute the chapters and store their outputs"

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q -r requirements.txt 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(PY) -c "import torch, bitsandbytes, jupyter_book, nbval, fp4lib"
	touch $(STAMP)

venv: $(STAMP)

$(PLAIN_STAMP): requirements-plain.txt pyproject.toml
	test -x $(PLAIN_PY) || $(PYTHON) -m venv $(PLAIN_VENV)
	$(PLAIN_PY) -m pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)
	$(PLAIN_PY) -m pip install -q -r requirements-plain.txt 2>&1 | $(QUIET_PIP)
	$(PLAIN_PY) -m pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	$(PLAIN_PY) -c "import torch, bitsandbytes, torchao, nbval, fp4lib"
	$(PLAIN_GUARD)
	touch $(PLAIN_STAMP)

venv-plain: $(PLAIN_STAMP)

plain-guard: venv-plain
	$(PLAIN_GUARD)

# The browser check's Chromium (or Chrome) and chromedriver: the ones installed, else
# Debian's packages where this runs as root with apt-get, else a message that says
# what is missing and how to get it.
chromium:
	@if ! $(PY) tests/browser_check.py --find >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  fi; \
	  $(PY) tests/browser_check.py --find; \
	fi

$(MATHJAX): $(STAMP)
	rm -rf book/_static/mathjax
	mkdir -p book/_static/mathjax
	cp -r "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mathjax/static/mathjax/es5/." book/_static/mathjax/
	test -f $(MATHJAX)

mathjax: $(MATHJAX)

# Always from scratch (--all and no cache): every chapter runs on the current code.
build-book: venv mathjax
	rm -rf _build
	$(VENV)/bin/jupyter-book build . --all -W --keep-going
	@echo "Book: $(CURDIR)/_build/html/index.html"

book: build-book

# The test build renders the outputs stored in the notebooks, which nbval has just
# compared with a fresh run under two sets of CPU kernels; `make book` executes them.
build-book-stored: venv mathjax
	rm -rf _build
	mkdir -p _build
	# (the copy lives in _build/, and local extensions are found relative to the config)
	sed -e 's/^  execute_notebooks: force$$/  execute_notebooks: "off"/' \
	    -e 's|^    colab_buttons: book/_ext$$|    colab_buttons: ../book/_ext|' _config.yml > _build/_config_stored.yml
	grep -q 'execute_notebooks: "off"' _build/_config_stored.yml
	grep -q 'colab_buttons: ../book/_ext' _build/_config_stored.yml
	$(VENV)/bin/jupyter-book build . --all -W --keep-going --config _build/_config_stored.yml

unit: venv
	$(PY) -m pytest -q -p no:cacheprovider

nbval: venv
	PYTHONPATH=tests $(PY) -m pytest -q -p no:cacheprovider -p nbval_cells --nbval book/*.ipynb --nbval-sanitize-with tests/nbval_sanitize.cfg

experiments-check: venv
	$(PY) -m fp4lib.study check

# The checks that compare numbers across machines, once more with ATen's portable
# (non-vector) CPU kernels and a kernel cache of their own. The chapters run here in the
# plain environment, as a reader's notebook kernel (Colab's) runs them: a chapter that
# needs Jupyter Book, myst-nb or Sphinx, or a package its setup cell does not install,
# fails this pass.
cross-kernel: venv plain-guard
	$(MAKE) cross-kernel-check
	$(MAKE) cross-kernel-nbval

cross-kernel-check: venv
	$(CROSS_KERNEL_ENV) $(PY) -m fp4lib.study check

cross-kernel-nbval: venv plain-guard
	$(CROSS_KERNEL_ENV) PYTHONPATH=tests $(PLAIN_PY) -m pytest -q -p no:cacheprovider -p nbval_cells --nbval --nbval-current-env book/*.ipynb --nbval-sanitize-with tests/nbval_sanitize.cfg

# The study's check under the machine's CPU kernels, then under ATen's portable ones.
study-checks: venv
	$(MAKE) experiments-check
	$(MAKE) cross-kernel-check

browser-check: venv chromium
	$(PY) tests/browser_check.py _build/html

test: venv
	$(MAKE) chromium
	# The unit tests beside the study's checks under both sets of CPU kernels (the checks
	# run their training at one thread), then the plain environment of the second pass.
	$(MAKE) -j2 --output-sync=target unit study-checks plain-guard
	# The notebooks under the machine's own CPU kernels and under ATen's portable ones,
	# side by side (each is mostly one busy core; each has its own kernel cache).
	$(MAKE) -j2 --output-sync=target nbval cross-kernel-nbval
	$(MAKE) build-book-stored
	$(MAKE) browser-check

# The study, one thread per run (as stored), the gradient-fidelity study, then the re-run check's reference runs
# under ATen's other CPU kernel sets, so that `check` is exact under each of them.
experiments: venv
	$(PY) -m fp4lib.study run --threads 1
	$(PY) -m fp4lib.study gradients --threads 1 --jobs 2
	$(CROSS_KERNEL_ENV) $(PY) -m fp4lib.study reference
	if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then \
	  ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CACHE_DIR=$(INDUCTOR_CACHE)/aten-avx2 $(PY) -m fp4lib.study reference; fi
	$(PY) benchmarks/study_report.py

# On a machine whose own Python already has a CUDA build of torch (Colab), use it: the
# venv would install requirements.txt's CPU-pinned torch beside it and never see the GPU.
# pyproject.toml's torch range leaves the running torch in place. Elsewhere, the venv.
gpu-check:
	@if $(PYTHON) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then \
	  echo "make gpu-check: $(PYTHON)'s own torch sees CUDA; using it (no $(VENV))"; \
	  $(PYTHON) -m pip install -q -e ".[bnb]" "pytest>=8" "hypothesis>=6.100" 2>&1 | $(QUIET_PIP); \
	  $(PYTHON) benchmarks/gpu_check.py; \
	else \
	  $(MAKE) venv && $(PY) benchmarks/gpu_check.py; \
	fi

benchmark: venv
	$(PY) benchmarks/quantize.py

# Re-execute every chapter and store its outputs in the .ipynb (what nbval compares).
notebooks: venv
	$(PY) tests/store_outputs.py

# The book as stored (the outputs saved in the notebooks), rendered without executing
# anything: a minute, no training.
read: build-book-stored
	@echo "Book (stored outputs): $(CURDIR)/_build/html/index.html"

clean:
	rm -rf _build
