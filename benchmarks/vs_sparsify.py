"""Several layers' TopK SAEs from one live LM pass: our ``train.py`` (``activations=live``) against
EleutherAI's sparsify (``eai-sparsify``), each timed as a whole subprocess, then both sides' SAEs scored on
the same held-out rows.

Both sides train on the same model, tensor, text and sizes:
- model: SmolLM2-135M-Instruct as the project converts it from the PyPI GGUF wheel, loaded by our ``load_lm``
  on both sides: ours through ``experiment=quickstart`` (``experiment=plt`` with ``--transcode``); sparsify
  gets its base model (what its CLI loads with ``AutoModel`` for the ``fvu`` loss: no logits) on the CPU. Its
  CLI pins CUDA (``device_map={"": f"cuda:{rank}"}``) but its ``Trainer`` follows the model's device, so its
  worker drives ``Trainer`` from Python. (``AutoModel`` cannot read the project's kept copy: it holds the tied
  embedding only as ``lm_head.weight``, which the causal LM class ties back and the base class drops);
- tensor: the residual stream after blocks ``--layers`` (ours ``hook=resid_post``, sparsify its default
  hook points ``layers.N``, the decoder layers' outputs). sparsify hooks a module's output (or, for a
  transcoder, its input); LLaMA's MLP post-activation, the input of ``down_proj``, is no module's output
  (``act_fn`` gives ``silu(gate_proj x)`` before the product with ``up_proj x``), so the MLP hook of the
  other benchmarks is out of its reach. With ``--transcode`` both sides train transcoders of each MLP
  instead: ours ``hook=mlp_in target.name=mlp_out``, sparsify ``transcode=True`` on hook points
  ``layers.N.mlp`` (it reads that module's input and reconstructs its output: the same two tensors,
  checked on the held-out rows), and FVU is that of the MLP's output;
- text: the contexts of ``sae_lightning.live.contexts.TextContexts`` (the local TinyStories sample packed
  into rows of ``--context`` tokens joined by EOS), both sides leaving out the special-token positions
  (sparsify's ``exclude_tokens``). Ours (no validation or evaluation rows held out) trains on the first
  ``--tokens`` trained positions of the text in windows of ``--buffer-rows`` rows; sparsify gets the
  contexts that hold them, as a tokenized ``datasets.Dataset`` (``input_ids``), shuffled by its seed as its
  CLI shuffles;
- SAEs: TopK, same ``k`` and ``d_sae`` per layer; batch: ``--batch`` rows a step (sparsify: ``--batch /
  --context`` contexts, also our contexts per LM forward); our defaults otherwise (Adam at ``--lr``, by
  default our preset's rate, AuxK, its scaling); sparsify's defaults otherwise (no AuxK,
  ``auxk_alpha=0``), run twice: with its default optimizer (Signum, its own learning rate) and with Adam at
  ``--lr`` and ``--adam-warmup`` warm-up steps (its default 1000 is longer than these runs; it then decays
  the rate linearly to 0, which it always does).

sparsify runs the whole model for every batch; ours stops the forward after the last hooked block. The
optional contenders ``sparsify signum cut`` and ``sparsify adam cut`` give sparsify the model cut after that
block by hand (its blocks list and ``num_hidden_layers``), which leaves its SAEs' training unchanged and shows
what that part of the difference is (and halves the time of a quality comparison at a longer budget).

Measured: wall time of each whole process, from start to exit (model load, tokenization, training, saving
included), its CPU seconds and peak RSS; tokens/s = the rows the side trained on / wall. Then, outside any
timing, every SAE is scored on ``--eval-contexts`` contexts after the last one sparsify trained on (neither
side saw them), their trained positions only: FVU = sum ||x - x_hat||^2 / sum ||x - mean x||^2 over the set,
our ``ReconstructionStats``'s ``nmse`` (= 1 - ``explained_variance``), and L0. The activations are our
``HookedLM``'s, checked equal to the decoder layers' outputs (the tensor sparsify hooks) on the same rows.

Our command line is ``OURS_COMMON`` below with ``OURS_LAYERS`` (one process, one SAE per layer); with
``--ours-per-layer`` ``OURS_ONE_LAYER`` instead, one process per layer, their times summed (each pays the
model load and its own forward).

Contenders run in turns, the order rotated each seed. Reported: per contender the median and range over
seeds of wall, tokens/s and each layer's FVU; ours over each sparsify run; the last line ``key=value``.

The full run (about 20 minutes on 2 idle cores: sparsify runs all 30 blocks a token), under the timing lock:
    flock -x /tmp/cpu-bench.lock python -m benchmarks.vs_sparsify \
        --out benchmarks/results/vs_sparsify_cpu.txt
Per-layer transcoders against sparsify's (same layers, k, width and rows):
    flock -x /tmp/cpu-bench.lock python -m benchmarks.vs_sparsify --transcode \
        --out benchmarks/results/vs_sparsify_transcoders_cpu.txt
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, Report, Run, med_range, module_command, timed

# ---------------------------------------------------------------- our side: train.py's command line
# The overrides each of our runs gets; "{name}" fields are filled by ``ours_overrides``.
OURS_COMMON = [
    "experiment={preset}", "logger=csv", "trainer=cpu", "trainer.progress_bar=false", "hook=resid_post",
    "sae=topk", "sae.k={k}", "sae.d_sae={d_sae}",
    "activations=live", "activations.buffer_tokens={buffer_rows}",
    "activations.val_fraction=0", "activations.eval_fraction=0",  # no held-out rows: no validation
    "data.context_size={context}", "data.lm_batch_size={lm_batch}", "train_tokens={tokens}",
    "batch_size={batch}", "lr={lr}", "seed={seed}", "trainer.checkpoint_every_n_steps={no_step}",
    "hydra.run.dir={run_dir}",
]
OURS_LAYERS = ["layers=[{layers}]"]   # one process, an SAE per layer from one forward
OURS_TRANSCODE = ["hook.name=mlp_in", "target.name=mlp_out"]   # --transcode: a transcoder of each MLP
PRESETS = {False: "quickstart", True: "plt"}   # our preset by --transcode: the SAE's, the transcoders'


def preset_lr(transcode: bool) -> float:
    """The Adam rate our preset trains with (its ``lr``, else quickstart's): what ``--lr`` defaults to."""
    import yaml

    for name in (PRESETS[transcode], PRESETS[False]):
        preset = yaml.safe_load((REPO / "conf" / "experiment" / f"{name}.yaml").read_text())
        if "lr" in preset:
            return float(preset["lr"])
    raise ValueError("no preset sets lr")
OURS_ONE_LAYER = ["layer={layer}"]    # --ours-per-layer: one process per layer

# ---------------------------------------------------------------- contenders
SPARSIFY = {  # name -> (optimizer, the model cut after the last hooked block)
    "sparsify signum": ("signum", False),
    "sparsify adam": ("adam", False),
    "sparsify signum cut": ("signum", True),
    "sparsify adam cut": ("adam", True),
}
CONTENDERS = ["ours", *SPARSIFY]
DEFAULT_CONTENDERS = ["ours", "sparsify signum", "sparsify adam"]
SPARSIFY_RUN = "run"  # sparsify's run_name: it saves the SAE of hook point h in <save_dir>/run/<h>/


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[3, 6, 9])
    p.add_argument("--tokens", type=int, default=65_536,
                   help="training rows per SAE (a multiple of --batch)")
    p.add_argument("--batch", type=int, default=2048, help="rows per step (a multiple of --context)")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--buffer-rows", type=int, default=262_144,
                   help="our live window (shuffled) in rows; default: activations.buffer_tokens's")
    p.add_argument("--d-sae", type=int, default=4608, help="latents per SAE (8 x d_model)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lr", type=float, default=None,
                   help="Adam's rate, ours and sparsify's Adam run (default: our preset's, preset_lr)")
    p.add_argument("--adam-warmup", type=int, default=0, help="sparsify Adam's lr_warmup_steps")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--eval-contexts", type=int, default=64, help="held-out contexts scored, after training's")
    p.add_argument("--contenders", nargs="+", default=DEFAULT_CONTENDERS, choices=CONTENDERS,
                   help="'... cut': sparsify given the model cut after the last hooked block")
    p.add_argument("--ours-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more train.py overrides for our runs (after our list: they win)")
    p.add_argument("--transcode", action="store_true",
                   help="transcoders of each MLP: mlp_in -> mlp_out (sparsify: transcode=True, layers.N.mlp)")
    p.add_argument("--ours-per-layer", action="store_true",
                   help="one train.py per layer (times summed) instead of layers=[...]")
    p.add_argument("--text", type=Path,
                   default=REPO.parent / "shared" / "data" / "tinystories-train-head.txt")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a fresh temp dir)")
    p.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    p.add_argument("--worker", choices=sorted(SPARSIFY), help=argparse.SUPPRESS)
    p.add_argument("--worker-seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)  # sparsify's save_dir
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = preset_lr(args.transcode)
    if args.tokens <= 0 or args.tokens % args.batch or args.buffer_rows % args.batch:
        p.error(f"--tokens {args.tokens} and --buffer-rows {args.buffer_rows} must be positive multiples of "
                f"--batch {args.batch}: ours then trains on exactly the first --tokens rows of the text (its "
                "last window is cut to the rows it trains on)")
    if args.batch % args.context:
        p.error(f"--batch {args.batch} must be a multiple of --context {args.context} (sparsify's batch is "
                "whole contexts)")
    return args


# ---------------------------------------------------------------- inputs shared by both sides
def smollm2_config() -> Any:
    """The ``ModelConfig`` of ``experiment=quickstart``'s model (``conf/model/smollm2.yaml``) on the CPU."""
    from omegaconf import OmegaConf

    from sae_lightning.config import ModelConfig

    preset = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "smollm2.yaml"))
    return ModelConfig(**preset, device="cpu")


def text_contexts(args: argparse.Namespace, tokenizer: Any) -> Any:
    """Our live runs' contexts of ``--text`` (``data=tinystories_local`` at ``--context``)."""
    from sae_lightning.config import DataConfig
    from sae_lightning.live.contexts import TextContexts

    data = DataConfig(source="files", path=str(args.text), separator="<|endoftext|>",
                      context_size=args.context)
    return TextContexts(data, tokenizer)


def split_contexts(args: argparse.Namespace, tokenizer: Any, n_after: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """The contexts holding the first ``--tokens`` trained positions of the text ``[M, ctx]``, the
    ``n_after`` contexts that follow them, and the trained positions of the first ``M``."""
    text = text_contexts(args, tokenizer)
    train: list[np.ndarray] = []
    after: list[np.ndarray] = []
    rows = 0
    for tokens in text:
        if rows < args.tokens:
            train.append(tokens)
            rows += int(text.kept(tokens).sum())
        elif len(after) < n_after:
            after.append(tokens)
        else:
            break
    if rows < args.tokens or len(after) < n_after:
        raise ValueError(f"{args.text} holds {rows} trained positions and {len(after)} contexts after them: "
                         f"fewer than --tokens {args.tokens} and --eval-contexts {n_after}")
    empty = np.empty((0, args.context), np.int64)
    return np.stack(train), np.stack(after) if after else empty, rows


# ---------------------------------------------------------------- sparsify's side
def run_sparsify_worker(args: argparse.Namespace) -> None:
    """One sparsify training run in this process (what the timed subprocess does). The model is the one
    our runs load (``load_lm``), given as its base model: what sparsify's CLI loads (``AutoModel``) for its
    ``fvu`` loss, so its forward computes no logits."""
    from datasets import Dataset
    from sparsify import SaeConfig, TrainConfig, Trainer

    from sae_lightning.lm import load_lm
    from sae_lightning.lm.text import special_token_ids

    optimizer, cut = SPARSIFY[args.worker]
    lm = load_lm(smollm2_config())
    model = lm.model.base_model
    if cut:  # what a user can do by hand: sparsify finds the blocks by num_hidden_layers
        model.layers = model.layers[:max(args.layers) + 1]
        model.config.num_hidden_layers = len(model.layers)
    contexts, _, _ = split_contexts(args, lm.tokenizer)
    dataset = Dataset.from_dict({"input_ids": contexts}).shuffle(seed=args.worker_seed).with_format("torch")
    where = ({"hookpoints": [sparsify_hookpoint(args, layer) for layer in args.layers]} if args.transcode
             else {"layers": args.layers})
    cfg = TrainConfig(
        SaeConfig(k=args.k, num_latents=args.d_sae, transcode=args.transcode),
        batch_size=args.batch // args.context,
        optimizer=optimizer, lr=args.lr if optimizer == "adam" else None,
        lr_warmup_steps=args.adam_warmup, **where,
        exclude_tokens=special_token_ids(lm.tokenizer), init_seeds=[args.worker_seed],
        save_every=len(contexts) + 1, log_to_wandb=False, save_dir=str(args.worker_out),
        run_name=SPARSIFY_RUN)
    Trainer(cfg, dataset, model).fit()


def sparsify_command(args: argparse.Namespace, name: str, seed: int, out: Path) -> list[str]:
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("tokens", "batch", "context", "buffer_rows", "d_sae", "k", "lr", "adam_warmup", "text")]
    return module_command("vs_sparsify", *passed, "--layers", *map(str, args.layers),
                          *(["--transcode"] if args.transcode else []), "--worker", name,
                          "--worker-seed", str(seed), "--worker-out", str(out))


def sparsify_hookpoint(args: argparse.Namespace, layer: int) -> str:
    """The module sparsify hooks: the decoder layer's output, or (``--transcode``) the MLP's input and
    output, from the base model's root."""
    return f"layers.{layer}.mlp" if args.transcode else f"layers.{layer}"


def sparsify_saes(args: argparse.Namespace, out: Path) -> dict[int, Any]:
    """The SAEs a sparsify run saved, by layer, loaded with its own API."""
    from sparsify import SparseCoder

    return {layer: SparseCoder.load_from_disk(out / SPARSIFY_RUN / sparsify_hookpoint(args, layer))
            for layer in args.layers}


# ---------------------------------------------------------------- our side
def ours_overrides(args: argparse.Namespace, seed: int, run_dir: Path, layer: int | None) -> list[str]:
    """The ``train.py`` overrides of our run: every layer in one process (``layer=None``) or one layer."""
    values = {"preset": PRESETS[args.transcode], "k": args.k, "d_sae": args.d_sae,
              "buffer_rows": args.buffer_rows, "context": args.context,
              "lm_batch": args.batch // args.context, "tokens": args.tokens, "batch": args.batch,
              "lr": args.lr, "seed": seed, "no_step": args.tokens // args.batch + 1, "run_dir": run_dir,
              "layers": ",".join(map(str, args.layers)), "layer": layer}
    template = [*OURS_COMMON, *(OURS_LAYERS if layer is None else OURS_ONE_LAYER),
                *(OURS_TRANSCODE if args.transcode else [])]
    return [item.format(**values) for item in template] + args.ours_overrides


def ours_commands(args: argparse.Namespace, seed: int, run_dir: Path) -> list[list[str]]:
    train = [sys.executable, str(REPO / "train.py")]
    if not args.ours_per_layer:
        return [[*train, *ours_overrides(args, seed, run_dir, None)]]
    return [[*train, *ours_overrides(args, seed, run_dir / f"layer{layer}", layer)] for layer in args.layers]


def ours_saes(run_dir: Path, layers: list[int]) -> dict[int, Any]:
    """Our run's SAEs by layer: every ``sae/`` folder under ``run_dir``, its layer read from its config."""
    from sae_lightning.saes import SAE

    found: dict[int, Any] = {}
    for cfg_file in sorted(run_dir.rglob("sae/cfg.json")):
        layer = json.loads(cfg_file.read_text())["metadata"]["train_config"]["layer"]
        found[layer] = SAE.load(cfg_file.parent)
    if sorted(found) != sorted(layers):
        raise RuntimeError(f"{run_dir} holds SAEs of layers {sorted(found)}, not {sorted(layers)}")
    return found


# ---------------------------------------------------------------- held-out FVU
def eval_activations(args: argparse.Namespace, contexts: np.ndarray) -> dict[int, tuple[Any, Any]]:
    """Each layer's (input, target) on the trained positions of ``contexts`` (``[n, d]`` each): ``resid_post``
    twice, or (``--transcode``) ``mlp_in`` and ``mlp_out``; checked equal to the input and output of the
    module sparsify hooks on the same rows."""
    import torch

    from sae_lightning.lm import HookPoint, load_lm

    lm = load_lm(smollm2_config())
    tokens = torch.from_numpy(contexts)
    kept = torch.from_numpy(text_contexts(args, lm.tokenizer).kept(contexts))
    names = ("mlp_in", "mlp_out") if args.transcode else ("resid_post", "resid_post")
    hooks = {layer: [HookPoint(layer, name) for name in names] for layer in args.layers}
    ours = lm.activations(tokens, [h for pair in hooks.values() for h in pair])
    seen: dict[int, tuple[Any, Any]] = {}

    def keep(layer: int) -> Any:
        def hook(_module: Any, inputs: Any, out: Any) -> None:
            seen[layer] = (inputs[0], out[0] if isinstance(out, tuple) else out)
        return hook

    base = lm.model.base_model
    handles = [base.get_submodule(sparsify_hookpoint(args, layer)).register_forward_hook(keep(layer))
               for layer in args.layers]
    with torch.inference_mode():
        lm.model.base_model(tokens)
    for handle in handles:
        handle.remove()
    for layer, (x_hook, y_hook) in hooks.items():
        if args.transcode:
            torch.testing.assert_close(ours[x_hook], seen[layer][0])
        torch.testing.assert_close(ours[y_hook], seen[layer][1])
    return {layer: (ours[x][kept].float(), ours[y][kept].float()) for layer, (x, y) in hooks.items()}


def fvu(x: Any, x_hat: Any, latents: Any) -> dict[str, float]:
    """Our ``ReconstructionStats`` over one set: ``nmse`` (the FVU) and ``l0``."""
    from sae_lightning.metrics import ReconstructionStats

    stats = ReconstructionStats()
    stats.update(x, x_hat, latents)
    out = stats.compute()
    return {"fvu": out["nmse"], "l0": out["l0"]}


def score(args: argparse.Namespace, name: str, run_dir: Path,
          acts: dict[int, tuple[Any, Any]]) -> dict[int, dict[str, float]]:
    """Held-out FVU (of the target: the input itself for an SAE) and L0 of each layer's SAE of one run."""
    import torch

    scores = {}
    with torch.no_grad():
        if name == "ours":
            for layer, sae in ours_saes(run_dir, args.layers).items():
                x, y = acts[layer]
                z = sae.encode(x)
                scores[layer] = fvu(y, sae.decode(z, x), z)
        else:
            for layer, sae in sparsify_saes(args, run_dir).items():
                x, y = acts[layer]
                out = sae(x, y)
                fired = torch.zeros(sae.num_latents).index_add_(
                    0, out.latent_indices.flatten(), (out.latent_acts.flatten() != 0).float())
                scores[layer] = fvu(y, out.sae_out, fired)
    return scores


# ---------------------------------------------------------------- report
@dataclass
class Result:
    run: Run
    rows: int                                 # rows trained on (per SAE)
    scores: dict[int, dict[str, float]]


def report(args: argparse.Namespace, results: dict[str, list[Result]]) -> list[str]:
    """Per contender: wall, tokens/s, CPU, RSS and each layer's FVU (median and range over seeds); ours over
    each sparsify run; the last line key=value."""
    lines = [f"{'contender':16s} {'wall s':>22s} {'tokens/s':>22s} {'cpu s':>8s} {'peak GB':>8s}  "
             + "  ".join(f"{f'FVU L{layer}':>24s}" for layer in args.layers) + "  L0"]
    keys = [f"tokens={args.tokens}", f"ours_per_layer={int(args.ours_per_layer)}"]
    tps = {n: [r.rows / r.run.wall for r in rs] for n, rs in results.items()}
    for name, rs in results.items():
        l0 = statistics.median(r.scores[layer]["l0"] for r in rs for layer in args.layers)
        wall, fvus = [r.run.wall for r in rs], [[r.scores[layer]["fvu"] for r in rs] for layer in args.layers]
        lines.append(f"{name:16s} {med_range(wall, '7.1f', paren=True)} "
                     f"{med_range(tps[name], '6.0f', paren=True)} "
                     f"{statistics.median(r.run.cpu for r in rs):8.1f} {max(r.run.rss_gb for r in rs):8.2f}  "
                     + "  ".join(med_range(f, '.4f', paren=True) for f in fvus) + f"  {l0:.1f}")
        key = name.replace(" ", "_")
        keys.append(f"tokens_per_s_{key}={statistics.median(tps[name]):.0f}")
        keys += [f"fvu_L{layer}_{key}={statistics.median(r.scores[layer]['fvu'] for r in rs):.4f}"
                 for layer in args.layers]
    if "ours" in results:
        for name in (n for n in results if n != "ours"):
            ratio = statistics.median(tps["ours"]) / statistics.median(tps[name])
            spread = (min(tps["ours"]) / max(tps[name]), max(tps["ours"]) / min(tps[name]))
            by_cpu = (statistics.median(r.run.cpu / r.rows for r in results[name])
                      / statistics.median(r.run.cpu / r.rows for r in results["ours"]))
            lines.append(f"ours / {name}: whole-process tokens/s {ratio:.2f}x (worst-best pairing "
                         f"{spread[0]:.2f}-{spread[1]:.2f}x; by CPU seconds a token {by_cpu:.2f}x)")
            for layer in args.layers:
                ours_f = [r.scores[layer]["fvu"] for r in results["ours"]]
                theirs = [r.scores[layer]["fvu"] for r in results[name]]
                diff = statistics.median(ours_f) - statistics.median(theirs)
                verdict = ("lower" if max(ours_f) < min(theirs) else "higher" if min(ours_f) > max(theirs)
                           else "ranges overlap")
                lines.append(f"  layer {layer}: FVU ours - {name} = {diff:+.4f} "
                             f"({diff / statistics.median(theirs):+.1%}; ours {verdict})")
            keys += [f"ours_vs_{name.replace(' ', '_')}={ratio:.3f}"]
    return [*lines, " ".join(keys)]


def tensors(args: argparse.Namespace) -> str:
    """What each side's SAEs read (and reconstruct)."""
    if args.transcode:
        return "transcoders mlp_in -> mlp_out (sparsify: transcode=True on layers.N.mlp)"
    return "SAEs on resid_post (sparsify: layers.N)"


def settings(args: argparse.Namespace, sparsify_rows: int) -> list[str]:
    from importlib.metadata import version
    from importlib.util import find_spec

    ours = "layers=[...] (one process)" if not args.ours_per_layer else "one process per layer, times summed"
    extra = f" {' '.join(args.ours_overrides)}" if args.ours_overrides else ""
    return [f"# sparsify: eai-sparsify {version('eai-sparsify')}, triton "
            f"{'present' if find_spec('triton') else 'absent (eager sparse decoder)'}",
            f"# setting: SmolLM2-135M-Instruct (converted from the PyPI GGUF), {tensors(args)} of layers "
            f"{args.layers}, TopK k {args.k}, d_sae {args.d_sae}, "
            f"context {args.context}, batch {args.batch} rows ({args.batch // args.context} contexts), "
            f"ours buffer {args.buffer_rows} rows, lr {args.lr} (ours; sparsify adam, warm-up "
            f"{args.adam_warmup} steps), "
            f"sparsify signum at its own lr, seeds {args.seeds}",
            f"# rows trained per SAE: ours {args.tokens}, sparsify {sparsify_rows} (the contexts holding "
            f"our rows); held-out: {args.eval_contexts} contexts after them",
            f"# ours: train.py {ours}{extra}; wall = the whole process (model load included)"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_sparsify_worker(args)
        return
    from sae_lightning.lm import load_tokenizer

    work = args.work or Path(tempfile.mkdtemp(prefix="vs_sparsify-"))
    work.mkdir(parents=True, exist_ok=True)
    _, held_out, sparsify_rows = split_contexts(args, load_tokenizer(smollm2_config()), args.eval_contexts)
    say = Report(__spec__.name, argv, stamp=True)
    for line in settings(args, sparsify_rows):
        say(line)
    runs: list[tuple[str, int, Run, Path]] = []
    for i, seed in enumerate(args.seeds):
        shift = i % len(args.contenders)
        for name in args.contenders[shift:] + args.contenders[:shift]:
            run_dir = work / f"{name.replace(' ', '_')}-seed{seed}"
            cmds = (ours_commands(args, seed, run_dir) if name == "ours"
                    else [sparsify_command(args, name, seed, run_dir)])
            parts = [timed(cmd, work / f"{run_dir.name}-{j}.log") for j, cmd in enumerate(cmds)]
            run = Run(sum(p.wall for p in parts), sum(p.cpu for p in parts), max(p.rss_gb for p in parts))
            runs.append((name, seed, run, run_dir))
            say(f"#   seed {seed} {name:16s} {run.wall:7.1f} s wall, {run.cpu:7.1f} s CPU, "
                f"{run.rss_gb:.2f} GB peak RSS")
    acts = eval_activations(args, held_out)
    results: dict[str, list[Result]] = {name: [] for name in args.contenders}
    for name, seed, run, run_dir in runs:
        scores = score(args, name, run_dir, acts)
        results[name].append(Result(run, args.tokens if name == "ours" else sparsify_rows, scores))
        say(f"#   seed {seed} {name:16s} FVU " + " ".join(
            f"L{layer} {s['fvu']:.4f} (L0 {s['l0']:.1f})" for layer, s in scores.items()))
    for line in ["", *report(args, results)]:
        say(line)
    say.write(args.out)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
