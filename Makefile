# The two commands of README.md: `make demo` (the main job) and `make test` (the suite).
# Both create .venv when it is missing and install everything the project needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0

.PHONY: setup demo test lint validate schema clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[site,scale,dev]"
	@touch $(STAMP)

# The main job: check the catalog, run every smoke reproduction that is not up to date (a failed one is
# reported and the rest go on), build the site and serve it on localhost.
demo: setup
	$(VENV)/bin/vlmdefense validate
	$(VENV)/bin/vlmdefense run --all --profile smoke || echo "some reproductions failed: see the summary above"
	$(VENV)/bin/vlmdefense site serve

# The site's browser tests drive the system's Chromium; install it (apt-get, as root) only when missing.
CHROMIUM := /usr/bin/chromium
chromium: $(CHROMIUM)
$(CHROMIUM):
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

test: setup chromium
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks docs
	$(VENV)/bin/ruff format --check src tests benchmarks docs
	$(VENV)/bin/mypy

validate: setup
	$(VENV)/bin/vlmdefense validate

schema: setup
	$(VENV)/bin/vlmdefense schema --write

clean:
	rm -rf $(VENV) site .pytest_cache
