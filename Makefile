# nanoforge — two commands for a fresh machine: `make demo` and `make test`.
# Everything else here is what those two need, plus a few shortcuts.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
DVC_ENV := $(VENV)/tools/dvc
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done

# CPU torch where there is no CUDA: pytorch's CPU index (an unpinned torch from
# PyPI is a multi-GB CUDA build). Machines with a local wheel cache use it first.
TORCH_CPU ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DVC_SPEC ?= dvc[s3]==3.67.1
# team mode's S3 server (moto's standalone server), in a tool env of its own like DVC
S3_ENV := $(VENV)/tools/s3
MOTO_SPEC ?= moto[server]==5.2.5
TEAM_STAMP := $(VENV)/.team-setup-done

export DVC_NO_ANALYTICS := 1
export DAGSTER_HOME ?= $(CURDIR)/.dagster
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test ui mlflow repro bench clean help team-setup team-up team-down team-status test-team test-slurm

help:
	@echo "make demo   install everything, then run the whole pipeline on the tiny preset"
	@echo "make test   install everything, then run the test suite"
	@echo "make ui     open Dagster (http://127.0.0.1:3000) on this repo"
	@echo "make mlflow open MLflow (http://127.0.0.1:5000) on the embedded store"
	@echo "make repro  dvc repro (the pipeline without Dagster)"
	@echo "make bench  run the benchmarks in bench/"
	@echo "make team-up / team-down / team-status   the team stack: Postgres, S3, MLflow server, Dagster daemon + webserver"
	@echo "make test-team  the team-mode tests (they start and stop their own stack)"
	@echo "make test-slurm the Slurm launcher on a real one-node cluster (apt-installs slurm-wlm and munge when missing), multi-node torchrun and the other slow runs"

setup: $(STAMP)

# Two environments: DVC's hydra-core pins antlr4 4.9, which breaks Dagster's
# asset-selection parser (needs 4.13), so DVC lives in its own tool env and
# .venv/bin/dvc points at its script (whose shebang keeps its own interpreter).
$(STAMP): pyproject.toml constraints.txt Makefile
	@set -e; start=$$(date +%s); \
	echo "setup: building $(VENV) (first time: 2-4 minutes and ~1.5 GB; later runs only check it)"; \
	if [ ! -x $(BIN)/python ]; then $(PYTHON) -m venv $(VENV); fi; \
	if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    echo "setup: [1/3] CUDA found, torch comes from PyPI with the project (a few GB: several minutes)"; \
	  else \
	    echo "setup: [1/3] no CUDA, installing the CPU build of torch ($(TORCH_CPU), ~200 MB)"; \
	    PIP_RETRIES=1 $(BIN)/pip install --quiet "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX); \
	  fi; \
	else echo "setup: [1/3] torch is installed"; fi; \
	echo "setup: [2/3] the project and its pinned dependencies (mlflow, dagster, rustbpe, tiktoken...): about a minute"; \
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,team]'; \
	if [ ! -x $(DVC_ENV)/bin/dvc ]; then \
	  echo "setup: [3/3] DVC ($(DVC_SPEC)) in its own tool env $(DVC_ENV): about a minute"; \
	  $(PYTHON) -m venv $(DVC_ENV); \
	  $(DVC_ENV)/bin/pip install --quiet '$(DVC_SPEC)'; \
	else echo "setup: [3/3] DVC is installed"; fi; \
	ln -sf "$(CURDIR)/$(DVC_ENV)/bin/dvc" $(BIN)/dvc; \
	$(BIN)/dvc --version >/dev/null; \
	touch $@; \
	echo "setup: done in $$(( $$(date +%s) - start ))s  (activate with: source $(BIN)/activate)"

demo: setup
	$(BIN)/python -m pipelines.demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

ui: setup
	$(BIN)/dagster dev -h 127.0.0.1 -p $${PORT:-3000}

mlflow: setup
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} -h 127.0.0.1 -p $${MLFLOW_PORT:-5000}

repro: setup
	source $(BIN)/activate && dvc repro

bench: setup
	$(BIN)/python -m bench $(BENCH)

# Team mode: PostgreSQL from the distribution (apt, as root, when missing) and moto's S3 server.
team-setup: $(TEAM_STAMP)

$(TEAM_STAMP): $(STAMP)
	@set -e; \
	if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 && ! command -v pg_ctl >/dev/null 2>&1; then \
	  echo "team-setup: installing postgresql with apt-get"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	else echo "team-setup: postgresql is installed"; fi; \
	if [ ! -x $(S3_ENV)/bin/moto_server ]; then \
	  echo "team-setup: moto's S3 server ($(MOTO_SPEC)) in its own tool env $(S3_ENV)"; \
	  $(PYTHON) -m venv $(S3_ENV); \
	  $(S3_ENV)/bin/pip install --quiet '$(MOTO_SPEC)'; \
	else echo "team-setup: moto is installed"; fi; \
	touch $@

team-up: team-setup
	$(BIN)/python -m team up

team-down:
	$(BIN)/python -m team down

team-status: setup
	$(BIN)/python -m team status

test-team: team-setup
	$(BIN)/python -m pytest -m team tests/team $(PYTEST_ARGS)

# tests/slurm/cluster.py installs slurm-wlm + munge with apt (as root) when missing, starts munged,
# slurmctld and slurmd in a temp dir and stops them after; skipped with the reason where they can't run
test-slurm: setup
	$(BIN)/python -m pytest -m "slurm or cluster" tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
