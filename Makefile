# Two commands do all set-up on a fresh machine (Python 3.11+ and pip are all it needs):
#   make quickstart   set up .venv/, then cache activations, train and evaluate an SAE on the offline default
#   make test         set up .venv/ with the dev extra, then run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR := outputs/quickstart/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: setup setup-dev quickstart test lint bench

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is installed first, pinned: on a CPU-only machine an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

quickstart: setup
	$(PY) train.py experiment=quickstart hydra.run.dir=$(RUN_DIR)
	$(PY) evaluate.py ckpt_path=$(RUN_DIR)/checkpoints/final.ckpt downstream_contexts=32
	@echo "Report: $(RUN_DIR)/eval/report.html"

test: setup-dev
	$(PY) -m pytest -q

lint: setup-dev
	$(VENV)/bin/ruff check .
