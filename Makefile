# The two commands of the README. Everything they need is installed from here:
# Debian packages through apt (when missing), Python packages into .venv through pyproject.toml.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the tests and the embedded lab use (git for the knowledge domain; curl for the
# download benchmark; cmake and g++ build llama.cpp's tools; exfat-fuse and exfatprogs for the backup test
# on a real exFAT target; e2fsprogs for the ext4 volumes of the power-cut tests). Checked with dpkg first,
# so a machine that has them makes no apt call.
APT_PACKAGES := git curl cmake g++ make nginx prometheus openssl rsync openssh-server docker.io busybox-static \
                exfat-fuse exfatprogs e2fsprogs

.PHONY: up test bench install system-deps llama-cpp clean-state

install: system-deps $(STAMP) llama-cpp

# llama.cpp's own llama-server / llama-quantize, built once per machine into a cache
# outside the checkout (fresh clones and CI reuse it); the script says when it compiles and how long.
llama-cpp: system-deps
	@dir=$$(scripts/build-llama-cpp.sh --dir); \
	if [ ! -x "$$dir/llama-server" ]; then \
	  echo "llama.cpp's llama-server and llama-quantize are not built on this machine yet: compiling them once"; \
	  echo "(about 10 min on two cores, up to 20 when they are busy; every later make, and every fresh clone here, reuses $$dir)"; \
	fi; \
	PYTHON=$(PYTHON) scripts/build-llama-cpp.sh >/dev/null

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
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
