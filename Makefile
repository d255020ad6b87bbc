# Two commands do all set-up on a fresh machine (Python 3.11+ and pip are all it needs):
#   make quickstart   set up .venv/, then cache activations, train and evaluate an SAE on the offline default
#   make test         set up .venv/ with the dev extra, then run the test suite (2 workers; TEST_WORKERS=0: one)
#   make bench        every benchmark at a tiny size (a smoke run; results files: benchmarks/results/README.md)
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

# The tests run in TEST_WORKERS pytest-xdist processes. Most of their time goes to starting train.py and
# evaluate.py (single-threaded imports), so two workers overlap well even on 2 cores. --dist loadfile keeps
# each test file on one worker, so a module-scoped fixture (a trained run, a reference sweep) is built once.
# Kept out of pyproject's addopts: `pytest tests/x.py` stays a plain one-process run.
TEST_WORKERS ?= 2
test: setup-dev
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile

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

# Every benchmark at a tiny size, each as `python -m benchmarks.<name>`, its output under $(BENCH_OUT) (never
# benchmarks/results/): shows that they all run, measures nothing. The live and group ones load SmolLM2 (made
# by `make quickstart`); whole_run and many_saes cache read the quickstart cache, built if missing.
BENCH_OUT ?= /tmp/sae-lightning-bench
BENCH_CACHE ?= $(or $(SAE_LIGHTNING_CACHE),.cache/activations)
TINY_RUN := --d-sae 32 --train-rows 1000 --eval-rows 200 --batch 100 --steps 4 --b-dec-sample 500 --curve-points 2
bench: setup-dev
	@mkdir -p $(BENCH_OUT) && rm -rf $(BENCH_OUT)/quality.jsonl $(BENCH_OUT)/clt
	$(PY) -c "import numpy as np; np.save('$(BENCH_OUT)/acts.npy', np.random.default_rng(0).standard_normal((1200, 16)).astype('f4'))"
	$(PY) -m benchmarks.train_step --batch 64 --d-in 32 --relu-d-sae 64 --topk-d-sae 128 --k 4 --l0 8 --reps 1 --out $(BENCH_OUT)/train_step.txt
	$(PY) -m benchmarks.quality_vs_saelens --d-in 16 --features 64 --mean-active 4 $(TINY_RUN) --l1 3 --k 4 --curves "ours relu" "saelens standard" "ours topk" "saelens topk" --results $(BENCH_OUT)/quality.jsonl --out $(BENCH_OUT)/quality.txt
	$(PY) -m benchmarks.ablation --acts $(BENCH_OUT)/acts.npy --arch jumprelu --variants thr10 free_b0 --target-l0 8 $(TINY_RUN) --out $(BENCH_OUT)/ablation_jumprelu.txt
	$(PY) -m benchmarks.ablation --acts $(BENCH_OUT)/acts.npy --arch topk --variants rescale01 saelens --k 4 $(TINY_RUN) --out $(BENCH_OUT)/ablation_topk.txt
	$(PY) -m benchmarks.sparse_kernels penalised --batch 256 --d-in 64 --d-sae 256 --shares 0.05 --archs relu jumprelu gated --reps 1 --out $(BENCH_OUT)/kernels_penalised.txt
	$(PY) -m benchmarks.sparse_kernels batchtopk --batch 128 --d-in 64 --d-sae 256 --k 8 --reps 1 --out $(BENCH_OUT)/kernels_batchtopk.txt
	$(PY) -m benchmarks.sparse_kernels auxk --batch 128 --d-in 64 --d-sae 256 --k 8 --dead 0 64 --reps 1 --threads 1 --out $(BENCH_OUT)/kernels_auxk.txt
	$(PY) -m benchmarks.synthetic --archs topk relu --n-features 64 --d 16 --n-rows 4000 --steps 20 --batch-size 128 --out $(BENCH_OUT)/synthetic.txt
	$(PY) -m benchmarks.target_l0 --targets 10 --steps 50 --rows 4096 --d-sae 64 --batch-size 64 --out $(BENCH_OUT)/target_l0.txt
	$(PY) -m benchmarks.cache build --model pythia-70m --batches 2 --batch-size 2 --ctx 16 --out $(BENCH_OUT)/cache_build.txt
	$(PY) -m benchmarks.cache stream --rows 16384 --factor 2 --shard-rows 2048 --shuffle-buffer 2048 --batches 2 --out $(BENCH_OUT)/cache_stream.txt
	$(PY) -m benchmarks.group_memory --archs relu topk --d-in 64 --d-sae 256 --batch 256 --steps 1 --group 2 --out $(BENCH_OUT)/group_memory.txt
	$(PY) -m benchmarks.whole_run --cache-dir $(BENCH_CACHE) --d-sae 256 --batch 1024 --train-tokens 4096 --reps 1 --step-reps 1 --out $(BENCH_OUT)/whole_run.txt
	$(PY) -m benchmarks.many_saes cache --cache-dir $(BENCH_CACHE) --n 2 --d-sae 256 --batch 1024 --tokens 4096 --reps 1 --out $(BENCH_OUT)/many_saes_cache.txt
	$(PY) -m benchmarks.many_saes live --layers 1 2 --d-sae 256 --batch 1024 --tokens 4096 --reps 1 --out $(BENCH_OUT)/many_saes_live.txt
	$(PY) -m benchmarks.live throughput --d-sae 256 --batch 1024 --tokens 4096 --buffer 4096 --reps 1 --reps-step 1 --probe-rows 1024 --out $(BENCH_OUT)/live_throughput.txt
	$(PY) -m benchmarks.live quality --d-sae 256 --batch 512 --tokens 4096 --n-tokens 40000 --buffer 4096 --buffers 4096 --seeds 0 --eval-tokens 1000 --out $(BENCH_OUT)/live_quality.txt
	$(PY) -m benchmarks.live_vs_saelens --tokens 4096 --batch 1024 --context 64 --lm-batch 4 --buffer-rows 4096 --d-sae 256 --k 8 --reps 1 --contenders "ours relu_dn" "saelens standard" --out $(BENCH_OUT)/live_vs_saelens.txt
	$(PY) -m benchmarks.vs_sparsify --layers 1 --tokens 2048 --buffer-rows 2048 --batch 512 --context 64 --d-sae 64 --k 4 --seeds 0 --eval-contexts 4 --contenders ours "sparsify adam" --out $(BENCH_OUT)/vs_sparsify.txt
	$(PY) -m benchmarks.clt --layers 0,1 --ks 4 --kinds plt clt clt_jumprelu --dict-mult 1 --train-tokens 4096 --eval-contexts 4 --work $(BENCH_OUT)/clt --overrides batch_size=1024 --out $(BENCH_OUT)/clt.txt
	@echo "every benchmark ran; outputs in $(BENCH_OUT)"
