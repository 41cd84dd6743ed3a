# The two commands of the README. Everything they need is installed from here:
# Debian packages through apt (when missing), Python packages into .venv through pyproject.toml.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the tests and the embedded lab use (git for the knowledge domain; curl for the
# download benchmark). Checked with dpkg first, so a machine that has them makes no apt call.
APT_PACKAGES := git curl

.PHONY: up test bench install system-deps clean-state

install: system-deps $(STAMP)

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# llama-cpp-python compiles llama.cpp on its first install (~10-20 min on 2 cores); pip keeps the built
# wheel in its cache, so later installs (and CI's fresh clones on this machine) take seconds.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@pip_wheels=$$($(PY) -m pip cache list llama_cpp_python 2>/dev/null | grep -c whl || true); \
	if [ "$$pip_wheels" = 0 ] && ! $(PY) -c 'import llama_cpp' 2>/dev/null; then \
	  echo "installing Python packages; the first time compiles llama.cpp for llama-cpp-python (10-20 min on 2 cores)"; \
	fi
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q -e '.[dev]'
	@touch $@

up: install
	$(VENV)/bin/idp up

# pytest exits 5 when it collects no test: that fails here like any other non-zero exit.
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install
	@set -e; for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f; done

clean-state:
	rm -rf .idp
