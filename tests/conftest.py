"""Shared fixtures: tiny random language models saved to disk with a real (tiny) tokenizer.

Session-scoped, built offline in a few seconds, and loaded through the same code as real models
(``load_lm(ModelConfig(name=<dir>))``), so other stages can test against them:

- ``tiny_tokenizer``: byte-level BPE (vocab ~300) trained on the first ~50 stories of the TinyStories sample,
  a ``PreTrainedTokenizerFast`` with BOS ``<s>``, EOS ``</s>`` and PAD ``<pad>`` (distinct ids) that prepends
  BOS when it encodes with special tokens, as LLaMA's does (so the default ``data.prepend_bos=auto`` is true).
- ``tiny_gpt2_dir`` / ``tiny_llama_dir``: directories holding a randomly initialised ``GPT2LMHeadModel``
  (3 layers, d_model 32, d_mlp 128, 64 positions) or ``LlamaForCausalLM`` (3 layers, d_model 32,
  d_mlp 96, GQA 4/2 heads, 64 positions) plus the tokenizer, via ``save_pretrained``.
- ``tiny_gpt2`` / ``tiny_llama``: those directories loaded as ``HookedLM`` on CPU. Treat them as read-only.
- ``tinystories_path``: the shared TinyStories sample file.

``pytest -m gpu`` on a machine without CUDA stops with an error instead of passing on skipped tests
(``pytest_configure``); in a run that does not ask for the GPU tests they are skipped, as in CI.

Under pytest-xdist (``make test``: two worker processes) each worker gets an equal share of the CPU
threads, and every test ends with the DDP rendezvous and seed variables Lightning writes into
``os.environ`` as they were before it, so no test depends on which tests its worker ran earlier.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# ../shared beside the checkout, as in CI (a fresh clone with shared/ next to it)
TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories-train-head.txt"
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# Written into this process's environment by Lightning: ddp_spawn's launcher sets MASTER_PORT (and its ranks
# MASTER_ADDR), seed_everything the PL_* seeds. A train.py started later from the same process inherits
# them: a stale MASTER_PORT makes its DDP ranks reuse a port that may no longer be free.
LIGHTNING_ENV = ("MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _asks_for_gpu_tests(markexpr: str) -> bool:
    """Whether ``-m markexpr`` selects the ``gpu`` tests and leaves out unmarked ones (``-m gpu``,
    ``-m "gpu and not slow"``), as opposed to a filter that merely lets them through (``-m "not slow"``)."""
    from _pytest.mark.expression import Expression

    expr = Expression.compile(markexpr)
    return expr.evaluate(lambda name, **_: name == "gpu") and not expr.evaluate(lambda name, **_: False)


def pytest_configure(config: pytest.Config) -> None:
    markexpr = config.getoption("markexpr", default="")
    if markexpr and _asks_for_gpu_tests(markexpr) and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"-m {markexpr!r} asks for the GPU tests, but torch {torch.__version__} finds no CUDA device "
            "(torch.cuda.is_available() is False), so every one of them would be skipped. Run them on a "
            "machine with a CUDA GPU and a CUDA build of torch.")
    workers = getattr(config, "workerinput", {}).get("workercount")  # set in an xdist worker only
    if workers and not any(name in os.environ for name in THREAD_ENV):
        _share_cpu_threads(workers)


def _share_cpu_threads(workers: int) -> None:
    """Give this worker ``cpus // workers`` threads (at least 1), in-process and for the processes its tests
    start: with every worker and its subprocesses at the default (one thread per core), OpenMP threads
    outnumber the cores and spin against each other."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cpus // workers)
    torch.set_num_threads(threads)
    for name in THREAD_ENV:
        os.environ[name] = str(threads)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Run a test (its fixtures' set-up and teardown included), then put back ``LIGHTNING_ENV``."""
    saved = {name: os.environ.get(name) for name in LIGHTNING_ENV}
    try:
        return (yield)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="session")
def tinystories_path() -> Path:
    return TINYSTORIES


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on 200 lines of TinyStories (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    with TINYSTORIES.open(encoding="utf-8") as f:
        lines = [line for line in itertools.islice(f, 200) if "<|endoftext|>" not in line]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    bos = SPECIALS["bos_token"]  # prepended by the tokenizer, as LLaMA's and Gemma's: prepend_bos=auto: true
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **SPECIALS)


def _save(model: torch.nn.Module, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _ids(tokenizer) -> dict[str, int]:
    return {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, n_positions=64, **_ids(tiny_tokenizer))
    return _save(GPT2LMHeadModel(config), tiny_tokenizer, tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                         **_ids(tiny_tokenizer))
    return _save(LlamaForCausalLM(config), tiny_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from sae_lightning.config import ModelConfig
    from sae_lightning.lm import load_lm

    return load_lm(ModelConfig(name=str(tiny_gpt2_dir)), device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from sae_lightning.config import ModelConfig
    from sae_lightning.lm import load_lm

    return load_lm(ModelConfig(name=str(tiny_llama_dir)), device="cpu")


@pytest.fixture(scope="session")
def check_saebench_core():
    """Validates a dict against SAEBench's published core-output schema (tests/data/README.md), with
    fields the schema does not declare forbidden, so names and nesting must match exactly."""
    import json

    import jsonschema

    schema = json.loads((Path(__file__).parent / "data" / "saebench_core_schema.json").read_text())
    for obj in [schema, *schema["$defs"].values()]:
        if "properties" in obj:
            obj["additionalProperties"] = False
    validator = jsonschema.Draft202012Validator(schema)
    return validator.validate
