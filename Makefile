# apriel-jax developer entry points.
#
#   make quickstart   create .venv (if missing), install, run the main job: the demo pipeline
#                     (the whole Apriel recipe on a tiny model, a few minutes on a CPU)
#   make test         create .venv (if missing), install, run the test suite (what CI runs; not the slow tests)
#                     in PYTEST_WORKERS processes (pytest-xdist, one test file per worker at a time; 0: serial)
#   make test-slow    the tests marked slow: the 15B dress rehearsal on 4 processes (tests/test_rehearsal.py)
#   make install      create .venv (if missing) and `pip install -e '.[test]'`
#
# The install step is guarded by a stamp file inside .venv, so it only re-runs
# when setup.py (or the package's __init__.py) changed or the venv is new.
#
# Extra pytest arguments:  make test PYTEST_ARGS='-k config -x'

SHELL := /bin/bash

VENV        ?= .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.apriel-jax-install.stamp
EXTRAS      ?= test
PIP_FLAGS   ?= --progress-bar off
PYTEST_ARGS ?=
# Two workers on CI's 2 cores: most tests wait on single-threaded XLA compiles or on their subprocesses,
# so two files at a time take ~0.65x the serial wall time (measured on a 2-core host: 18 min vs 27 min).
PYTEST_WORKERS ?= 2

# Re-install when the package metadata changes, or when the top-level package
# appears (the editable finder maps the packages found at install time).
INSTALL_DEPS := setup.py $(wildcard setup.cfg) $(wildcard pyproject.toml) \
                $(wildcard apriel_jax/__init__.py)

.PHONY: quickstart test test-slow install venv clean-venv

quickstart: install
	$(VENV)/bin/apriel-jax pipeline

test: install
	$(PY) -m pytest -q tests -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q tests -m slow $(PYTEST_ARGS)

install: $(STAMP)

venv: $(PY)

# Prefer python3.11 (the version the pins are validated on); fall back to
# python3 when python3.11 is absent or broken (e.g. a dangling pyenv shim).
$(PY):
	@set -e; \
	if command -v python3.11 >/dev/null 2>&1 && python3.11 -c 'import sys' >/dev/null 2>&1; then \
	  boot=python3.11; \
	else \
	  boot=python3; \
	fi; \
	echo "Creating $(VENV) with $$boot ($$($$boot --version 2>&1))"; \
	$$boot -m venv $(VENV)

$(STAMP): $(INSTALL_DEPS) | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[$(EXTRAS)]'
	@touch $@

clean-venv:
	rm -rf $(VENV)
