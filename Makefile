# Two commands do all set-up on a fresh machine (Python 3.11+ and pip are all it needs):
#   make quickstart   set up .venv/, then cache activations, train and evaluate an SAE on the offline default
#   make test         set up .venv/ with the dev extra, then run the test suite
# CI (.ci/run) runs `make test`, then `make lint` (ruff check .).
# Every install is constrained by constraints.txt (the exact versions CI tested); `make lock` rewrites it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_DIR := outputs/quickstart/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: setup setup-dev quickstart test lint lock bench

PIP := $(PY) -m pip install -q --disable-pip-version-check
LOCK := constraints.txt
SETUP_LOG := $(VENV)/setup.log

# One set-up step: a line saying what is installed and how long it took. The tools' own output goes to
# $(SETUP_LOG) and is shown (its end) only when the step fails.
define step
	@mkdir -p $(VENV); printf '%-58s' "$(1)"; t0=$$(date +%s); \
	if { $(2); } >>$(SETUP_LOG) 2>&1; then echo " $$(( $$(date +%s) - t0 )) s"; \
	else echo " FAILED, end of $(SETUP_LOG):"; tail -n 40 $(SETUP_LOG); exit 1; fi
endef

$(VENV)/bin/python:
	$(call step,Creating $(VENV)/ and upgrading pip,$(PYTHON) -m venv $(VENV) && $(PIP) --upgrade pip)

# torch is installed first, pinned: on a CPU-only machine an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml $(LOCK) | $(VENV)/bin/python
	$(call step,Installing torch 2.13.0,$(PIP) -c $(LOCK) torch==2.13.0)
	$(call step,Installing sae-lightning and its dependencies,$(PIP) -c $(LOCK) -e .)
	@touch $@

# The export tests read our files with the tools themselves; these two pin transformers<4.57/<=4.57.3 and
# huggingface-hub<1 (which transformers 5 excludes), so they are installed without their dependencies:
# the parts the tests use (circuit-tracer's transcoder loaders, SAEDashboard's Neuronpedia classes) import
# without them.
NO_DEPS := circuit-tracer==0.5.0 sae-dashboard==0.8.0

$(VENV)/.installed-dev: $(VENV)/.installed
	$(call step,Installing the dev extra (pytest ruff sae-lens sweeps),$(PIP) -c $(LOCK) -e '.[dev]')
	$(call step,Installing $(NO_DEPS) without dependencies,$(PIP) --no-deps $(NO_DEPS))
	@touch $@

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

quickstart: setup
	$(PY) train.py experiment=quickstart hydra.run.dir=$(RUN_DIR)
	$(PY) evaluate.py ckpt_path=$(RUN_DIR)/checkpoints/final.ckpt downstream_contexts=32
	@echo "Report: $(RUN_DIR)/eval/report.html"

test: setup-dev
	$(PY) -m pytest -q -rs

lint: setup-dev
	$(VENV)/bin/ruff check .

# Rewrite constraints.txt from what .venv holds now (the project itself left out; torch's local build label,
# e.g. +cpu, dropped so the pin matches any build of that version). To move a pin: `.venv/bin/pip install -U
# <package>`, `make test`, then `make lock`, and commit constraints.txt.
lock: setup-dev
	@{ echo "# Exact versions of every package the dev set-up installs, as tested: made by \`make lock\` from"; \
	  echo "# .venv/ (see the Makefile), used by every install (\`pip install -c constraints.txt ...\`)."; \
	  $(PY) -m pip freeze --exclude-editable --disable-pip-version-check | sed -E 's/^(torch==[^+]*)\+.*/\1/'; \
	} > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	@touch $(VENV)/.installed $(VENV)/.installed-dev
	@echo "$(LOCK): $$(grep -c '==' $(LOCK)) pins"
