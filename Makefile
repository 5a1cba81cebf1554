# The README's commands live here. `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: setup demo repro test test-fast lint ui bench gpu-check gpu-check-smoke clean-results

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the build on this machine's disk (a CUDA build; runs on CPU too)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

## Quickstart 1: install, then run the whole pipeline on the embedded dataset
demo: setup
	dvc repro
	@echo
	@echo "Result table : results/tables/demo.md (CSV beside it), plot: results/plots/demo_miou_vs_labels.png"
	@echo "Metrics      : dvc metrics show"
	@echo "MLflow UI    : make ui   (= mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db), then open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"

repro: setup
	dvc repro

## Quickstart 2: install if needed, then the whole test suite (end-to-end tests included)
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint docker/Dockerfile

ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

bench: setup
	$(PY) bench/step.py

## The day a GPU is lent: one command, <= 8 min on one H100/H200, one JSON (bench/out/gpu_check.json)
gpu-check: setup
	$(PY) bench/gpu_check.py

## The same harness on a CPU at tiny sizes (CI runs it: tests/test_gpu_check.py)
gpu-check-smoke: setup
	$(PY) bench/gpu_check.py --cpu-smoke
