# Every target bootstraps what it needs: uv (installed into .tools/ when it is not on PATH),
# then the locked environment in .venv. Only Python 3.11+ has to be there already.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := $(or $(shell command -v uv 2>/dev/null),$(CURDIR)/.tools/bin/uv)
RUN := $(UV) run --locked --all-extras

.PHONY: help demo airflow test test-fast lint format bench sync clean browser dashboard

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# DEMO_ARGS: more options of `overnight demo`, e.g. make demo DEMO_ARGS="--port 8100 --console-port 8101"
DEMO_ARGS ?=
demo: sync ## Generate sample data, run the nightly pipeline, serve it (embedded Postgres if none is configured)
	$(RUN) overnight demo $(DEMO_ARGS)

airflow: sync ## A local Airflow 3 for the DAGs (UI on http://127.0.0.1:8080; the admin login is printed)
	$(RUN) overnight airflow

# Three processes, each taking whole files in collection order (the long end-to-end files first): much
# of the suite waits on Airflow, services, object storage and sockets rather than computing, so three
# overlap well even on two cores (two took 20.5 min on 2026-12-07, over CI's 20-minute budget).
TEST_WORKERS ?= 3
test: sync ## Run every test (unit, integration, end-to-end) against a real Postgres, in TEST_WORKERS processes
	$(RUN) python -m compileall -q jobs serving console sql common dags
	$(RUN) pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: sync ## Unit tests only (no services)
	$(RUN) pytest tests/unit

lint: sync ## ruff (lint and format check) and mypy
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

format: sync ## Apply ruff's formatting and safe fixes
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

bench: sync ## Time `overnight run` on MovieLens 100K (needs ../shared/data/ml-100k)
	$(RUN) python benchmarks/movielens_run.py

dashboard: sync ## The demo over five nights, then the service and the console: dashboard at http://127.0.0.1:8001/dashboard
	$(RUN) overnight demo --nights 5 $(DEMO_ARGS)

# The dashboard's browser test drives Debian's chromium through its chromedriver (Selenium).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
browser: ## Install chromium and chromium-driver (apt) when missing, for the dashboard's browser test
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "chromium and chromedriver are installed"; \
	else \
	  echo "installing chromium and chromium-driver for the dashboard's browser test"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; \
	fi

# Bytecode compiled once at install: with PYTHONDONTWRITEBYTECODE set (as on CI's machines) nothing
# caches it later, and every `overnight` and Airflow task process compiled ~1,000 modules again
# (3.8 of a score task's 7.6 s, measured 2026-12-07).
sync: $(UV) ## Create or update .venv from uv.lock
	$(UV) sync --locked --all-extras --compile-bytecode

$(CURDIR)/.tools/bin/uv:
	@echo "uv is not installed: installing uv $(UV_VERSION) into .tools/"
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(CURDIR)/.tools
	$(CURDIR)/.tools/bin/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

clean: ## Stop the embedded Postgres, remove the environment, the bootstrap tools and local data (var/)
	-[ -x .venv/bin/overnight ] && .venv/bin/overnight -q db stop
	rm -rf .venv .tools var .pytest_cache .mypy_cache .ruff_cache
