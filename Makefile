# Two commands: `make run` sets everything up and trains FCE; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first, the build TORCH_BUILD names: `auto` (the default) takes the CUDA build
# where `nvidia-smi -L` lists a GPU and the CPU build elsewhere (`torch==<locked>+cpu`, from
# PyTorch's CPU index or, where that does not answer, pip's own sources), so a machine without
# a GPU never downloads the CUDA build. sweeps/install.py says which it chose and installed.
# Any other build (the project asks for torch>=2.13):
#   make setup TORCH_SPEC='torch==2.13.0' TORCH_INDEX=<your wheel index>
TORCH_BUILD ?= auto
TORCH_SPEC ?=
TORCH_INDEX ?=
# The lock (pip constraints): every package at the version the suite is tested with; `make lock`
# remakes it. torch's line is left out of what the installs see, so that the torch installed
# first (whichever TORCH_SPEC chose) stays.
LOCK := constraints.txt
LOCKED := $(VENV)/constraints.txt

.PHONY: setup run test lint clean lock notebooks ui-check cluster-install cluster-up cluster-down test-cluster

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	grep -iv '^torch==' $(LOCK) > $(LOCKED)
	$(PY) -m pip install --quiet --upgrade -c $(LOCKED) pip setuptools
	$(PY) sweeps/install.py torch --build '$(TORCH_BUILD)' --spec '$(TORCH_SPEC)' \
		--index '$(TORCH_INDEX)' --constraint $(LOCKED)
	$(PY) -m pip install --quiet -c $(LOCKED) -e '.[dev]'
	$(PY) -m pip check
	touch $@

# Remakes the lock from a fresh venv: the CPU build of the locked torch (TORCH_VERSION=<release>
# for another), then the project with every extra at the newest versions pip finds; with
# KEEP=1 every package the lock lists stays at its pin and only new ones (a dependency just
# added) come at their newest.
LOCK_VENV ?= /tmp/fce-lock-venv
TORCH_VERSION ?=
KEEP ?=
KEPT := $(if $(KEEP),-c $(LOCK_VENV)/kept.txt)
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	grep -iv '^torch==' $(LOCK) > $(LOCK_VENV)/kept.txt
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade $(KEPT) pip setuptools
	$(LOCK_VENV)/bin/python sweeps/install.py torch --build cpu --version '$(TORCH_VERSION)' \
		$(if $(KEEP),--constraint $(LOCK_VENV)/kept.txt)
	$(LOCK_VENV)/bin/python -m pip install --quiet $(KEPT) -e '.[dev,cluster,notebooks]'
	$(LOCK_VENV)/bin/python -m pip check
	$(LOCK_VENV)/bin/python sweeps/install.py freeze --out $(LOCK)
	rm -rf $(LOCK_VENV)

run: setup
	$(PY) run.py $(ARGS)

# Every test, the slow ones too (the end-to-end runs of run.py, tune.py and the scripts), but
# not the cluster's (they need its servers: `make test-cluster`). `.venv/bin/pytest` alone runs
# the fast default suite. What each takes: docs/performance.md, "The test suite".
# The notebooks extra goes in first: its test (`make notebooks`) would otherwise reinstall the
# project while other test workers import it.
test: setup $(VENV)/.notebooks
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
		FCE_CLUSTER_DIR=$(CLUSTER_DIR) $(PY) -m pytest -n 0 -m cluster tests/cluster $(ARGS) || status=$$?; \
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
	$(PY) -m pip install --quiet -c $(LOCKED) -e '.[dev,notebooks]'
	touch $@

# The MLflow UI in a headless browser on a fresh run (needs chromium:
# analysis/install_chromium.sh); about a minute.
ui-check: setup
	$(PY) analysis/ui_check.py $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
