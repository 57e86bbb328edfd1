# The two commands of README.md: `make demo` (the main job) and `make test` (the suite).
# Both create .venv when it is missing and install everything the project needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONHASHSEED := 0

.PHONY: setup demo test lint validate schema clean chromium mutation

KERNEL := $(VENV)/share/jupyter/kernels/vlmdefense/kernel.json

setup: $(STAMP) $(KERNEL)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[site,scale,dev,jupyter]"
	@touch $(STAMP)

# The project's Jupyter kernel, installed inside .venv (nothing lands in the user's home): the runner executes
# notebooks on it and `vlmdefense open` opens scratch copies with it.
$(KERNEL): $(STAMP)
	$(PY) -m ipykernel install --sys-prefix --name vlmdefense --display-name "VLM Defense Atlas (.venv)"

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

# Mutation testing (on demand, not in CI): mutmut over the modules that compute numbers ([tool.mutmut] in
# pyproject.toml), with the fast tests that pin them, in a scratch copy of the committed tree so mutants never
# touch this one. mutmut forks each mutant's test run from a process that has run torch: with more than one
# torch thread the fork inherits a dead OpenMP pool and hangs until mutmut's timeout, which counts it as killed.
# One thread keeps every verdict honest (and the run fast). Narrow only_mutate for a quicker pass. The small CLIP
# is trained once into .cache/mutation-model.
MUTATION_DIR ?= .cache/mutation-tree
mutation: setup
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	git archive HEAD | tar -x -C $(MUTATION_DIR)
	cd $(MUTATION_DIR) && PYTHONPATH=tests VLMDEFENSE_MUTATION_CACHE=$(CURDIR)/.cache/mutation-model \
		OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 VLMDEFENSE_THREADS=1 $(CURDIR)/$(VENV)/bin/mutmut run; $(PY) tests/mutation_score.py $(MUTATION_DIR) --survivors

clean:
	rm -rf $(VENV) site .pytest_cache
