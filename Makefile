# Two commands: `make run` sets everything up and trains FCE; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch goes in first, so that the project's `torch>=2.6` is already met and
# pip never pulls a multi-GB CUDA build. Elsewhere, e.g. for a GPU:
#   make setup TORCH_SPEC='torch' TORCH_INDEX=<your wheel index>
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP_INDEX := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: setup run test lint clean notebooks ui-check cluster-install cluster-up cluster-down test-cluster

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)' $(PIP_INDEX)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip check
	touch $@

run: setup
	$(PY) run.py $(ARGS)

# Every test, the slow ones too (about 20 minutes on 2 cores: 541 tests used 19.4 minutes of
# CPU), but not the cluster's (they need its servers: `make test-cluster`, about 4 more).
# `.venv/bin/pytest` alone runs the fast default suite (about 6 minutes).
test: setup
	$(PY) -m pytest -m "not cluster" $(ARGS)

# A throwaway PostgreSQL + MLflow tracking server + one-node SLURM cluster on 127.0.0.1, run by
# sweeps/cluster/cluster.sh from Debian's packages (installed as root where missing). State,
# logs and the `env` file to source live in $(CLUSTER_DIR). See docs/scaling-out.md.
CLUSTER_DIR ?= $(CURDIR)/.cluster
CLUSTER := FCE_CLUSTER_DIR=$(CLUSTER_DIR) FCE_PYTHON=$(CURDIR)/$(PY) sweeps/cluster/cluster.sh

cluster-install: setup
	sweeps/cluster/install.sh $(PY)

cluster-up: cluster-install
	$(CLUSTER) up

cluster-down:
	$(CLUSTER) down

# Starts the cluster, runs tests/cluster against it, and takes it down even when they fail;
# fails too if any of its processes is left behind.
test-cluster: cluster-install
	@status=0; $(CLUSTER) up || status=$$?; \
	if [ $$status -eq 0 ]; then \
		FCE_CLUSTER_DIR=$(CLUSTER_DIR) $(PY) -m pytest -m cluster tests/cluster $(ARGS) || status=$$?; \
	fi; \
	$(CLUSTER) down || status=1; \
	$(CLUSTER) check-clean || status=1; \
	exit $$status

# JupyterLab on the analysis notebooks; installs it into .venv the first time (the `notebooks`
# extra). Options go through ARGS, e.g. make notebooks ARGS="--no-browser --port 8890"; as root
# (a container) it adds --allow-root, which Jupyter otherwise asks for.
notebooks: $(VENV)/.notebooks
	$(VENV)/bin/jupyter lab analysis/ $(if $(filter 0,$(shell id -u)),--allow-root) $(ARGS)

$(VENV)/.notebooks: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,notebooks]'
	touch $@

# The MLflow UI in a headless browser on a fresh run (needs chromium:
# analysis/install_chromium.sh); about a minute.
ui-check: setup
	$(PY) analysis/ui_check.py $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
