# lm-pipeline: `make run` runs the whole pipeline on the embedded default, `make test` runs the tests.
# Both install what they need into local virtual environments first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
AIRFLOW_VENV := .venv-airflow
BIN := $(VENV)/bin

# Offline data mirror: the shared corpora beside the checkout, unless set by the caller.
export LMPIPE_DATA_MIRROR ?= $(abspath ../shared/corpora)
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONDONTWRITEBYTECODE :=
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install install-airflow run test test-fast bench lint lint-docker kfp clean-outputs help images base-image

help:
	@echo "make run     - whole pipeline on the default params (dvc repro), CPU"
	@echo "make test    - lint, then all tests (installs both environments first)"
	@echo "make lint    - ruff format --check and ruff check (config in pyproject.toml)"
	@echo "make bench   - benchmarks (tables + JSON under bench/results/)"
	@echo "make images  - task + Airflow images, offline from wheelhouses (BASE_IMAGE=python:3.11.11-slim-bookworm"
	@echo "               where a registry is reachable; default: the Debian base of 'make base-image')"
	@echo "make base-image - Debian base image from the apt mirror (debootstrap, root): air-gapped sites, CI"

$(BIN)/.installed: requirements/tasks.txt requirements/dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/tasks.txt -r requirements/dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -c "import evidently, kfp; assert kfp.__version__.startswith('2.'), kfp.__version__"
	touch $@

$(AIRFLOW_VENV)/.installed: requirements/orchestration.txt pyproject.toml
	test -x $(AIRFLOW_VENV)/bin/python || $(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/python -m pip install -q -r requirements/orchestration.txt
	# the package itself (PyYAML only) so DAGs and the node driver can read dvc.yaml/params
	$(AIRFLOW_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

install: $(BIN)/.installed
install-airflow: $(AIRFLOW_VENV)/.installed

run: install
	@test -d "$(LMPIPE_DATA_MIRROR)" || { echo "LMPIPE_DATA_MIRROR=$(LMPIPE_DATA_MIRROR) is not a folder: point it at the offline data mirror (../shared/corpora)"; exit 2; }
	$(BIN)/dvc repro
	@echo "== summary (full metrics: dvc metrics show)"
	@$(BIN)/lmpipe summary

test: install install-airflow lint
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test-fast: install
	$(BIN)/python -m pytest tests -m "not slow and not airflow and not containers"

base-image:
	docker/build-base.sh

images: install
	docker/build-images.sh

lint-docker: install
	$(BIN)/hadolint docker/Dockerfile.tasks docker/Dockerfile.tasks-cuda docker/Dockerfile.airflow

kfp: install
	mkdir -p build && $(BIN)/lmpipe kfp-compile --output build/lm_pipeline.kfp.yaml

bench: install
	for b in bench/[!_]*.py; do $(BIN)/python $$b || exit 1; done
