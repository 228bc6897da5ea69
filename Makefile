# triton-hybrid: two commands on a fresh machine.
#   make demo   set up, build the models and the repository, start the local stack, run a scenario
#   make test   set up, then the whole test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/triton-hybrid
PROFILE ?= full
# Debian packages the stack runs: HAProxy, Prometheus (+promtool), libb64 for perf_analyzer,
# iproute2 for the network-namespace drills; iptables (a Service VIP's DNAT rules) and curl (its
# probes) for the entry rolling-update drill (control/drills/rolling.py).
APT_PACKAGES := haproxy prometheus libb64-0d iproute2 iptables curl
PYTEST_ARGS ?=

.PHONY: demo test install system-deps venv models repo up down status bench clean-run

demo: install models repo
	$(CLI) down >/dev/null 2>&1 || true
	$(CLI) up
	$(PY) -m control.local.demo
	@echo
	@echo "The stack keeps running. Look: triton-hybrid status | stop: make down"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

install: system-deps venv

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != "0" ]; then \
	    echo "error: missing Debian packages:$$missing. Not root, so not installing them: run" \
	         "'sudo apt-get install -y$$missing' and then this command again." >&2; exit 1; \
	  fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would pull GBs of CUDA wheels.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

models: install
	@if [ -z "$$(ls -A artifacts/exports 2>/dev/null)" ]; then $(CLI) export --profile $(PROFILE); \
	else echo "export exists: $$(ls artifacts/exports | sort -n | tail -1) (run 'triton-hybrid export' for a new one)"; fi

repo: install
	@if [ -d model_repository/generated/cpu/search_ranking ]; then \
	  echo "repository exists: model_repository/generated/cpu ('triton-hybrid repo build' adds a new version)"; \
	else $(CLI) repo build --target cpu; fi

up: install
	$(CLI) up

down:
	@test -x $(CLI) && $(CLI) down || true

status:
	$(CLI) status

bench: install models repo
	$(PY) -m bench.run --out BENCHMARKS.md
