"""Quality at equal work: held-out normalized MSE against L0, our SAEs vs SAELens's, same data and steps.

Each SAE is trained by its own library's training step (``train_step.ours_trainer`` /
``train_step.saelens_trainer``: what ``SAEModule`` and SAELens's ``SAETrainer`` do per step, dead-latent
tracking included) on the same batches in the same order, with the same Adam learning rate and number
of steps. Our SAEs are built from the presets ``sae=relu``, ``sae=relu_dn``, ``sae=topk``
(``conf/sae/*.yaml``), so the benchmark measures what those options train, initialisation included
(``relu``/``topk``: ``b_dec`` at the geometric median of a sample; ``relu_dn``: zero biases as in
Anthropic's April 2024 update); SAELens keeps its own (zeros). Curves: a few L1 coefficients for the L1
SAEs (SAELens ``standard`` uses the decoder-norm L1, like ``relu_dn``), a few k for TopK. Scored on
held-out rows by ``metrics.ReconstructionStats`` (``nmse``, ``l0``).

Frontiers are compared both ways and every point is kept: each of our points against SAELens's curve AND
each SAELens point against ours (``other nmse @ same L0``: the other curve at that L0, linear in log L0
between its two neighbours; outside its L0 range: ``-``, not dropped). A chord of a convex frontier lies
above it, so interpolation flatters the point being compared; doing it both ways shows that bias on
both sides. The count of points *dominated* by the other curve (a point of the other with no higher L0
and no higher nmse, one of them strictly lower) needs no interpolation at all.

Held-out rows: from an activation cache, the rows of the last context rows (``doc``), so no context is
split between training and evaluation; from an ``.npy`` (no context ids), the last rows.

``--seeds 0 1 2`` trains every SAE once per initialisation seed (the data order stays the same) and
compares the curves of the means; the ``spread`` column (max - min nmse over seeds) is the
seed-to-seed noise a difference should be read against.

Data: ``--acts file.npy`` ([n, d_in] activations, e.g. SmolLM2 layer-6 mlp_post) or an activation cache
directory or, by default, synthetic activations: sparse non-negative combinations of a ground-truth
dictionary (Zipf-like firing frequencies, exponential magnitudes) plus a constant offset and Gaussian
noise. Rows are scaled so that ``E||x||^2 = d_in`` for both libraries.

Run: ``python benchmarks/quality_vs_saelens.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ours_trainer, saelens_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled
from omegaconf import OmegaConf

from sae_lightning.metrics import ReconstructionStats
from sae_lightning.saes import SAEConfig, config_from_dict

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "sae"


def preset(name: str, **overrides: object) -> SAEConfig:
    """The config that ``sae=<name>`` composes (its schema's defaults, then the preset's values), with
    ``overrides`` (d_sae, k) on top."""
    values = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
    values.pop("defaults", None)
    return config_from_dict({"architecture": name, **values, **overrides})


def synthetic(n: int, d_in: int, n_features: int, mean_active: float, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative codes over a random unit-norm dictionary, plus an offset and noise [n, d_in]."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n_features, d_in, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    freq = 1.0 / torch.arange(1, n_features + 1).float() ** 0.7  # Zipf-like firing frequencies
    freq *= mean_active / freq.sum()
    fires = torch.rand(n, n_features, generator=g) < freq.clamp(max=1.0)
    scale = 1 + torch.rand(n_features, generator=g)
    magnitude = torch.empty(n, n_features).exponential_(generator=g) * scale
    offset = torch.randn(d_in, generator=g) * 0.5
    return (fires * magnitude) @ dictionary + offset + 0.05 * torch.randn(n, d_in, generator=g)


def read_rows(path: str, n: int) -> np.ndarray:
    """The first rows of an ``.npy`` array (``n``) or of an activation cache directory (the whole context
    rows among its first ``n`` rows, so a split after any of them splits no context), as float32."""
    if not Path(path).is_dir():
        return np.asarray(np.load(path, mmap_mode="r")[:n], dtype=np.float32)
    from sae_lightning.cache.reader import open_source

    source, parts, docs, left = open_source(path), [], [], n
    for shard, size in enumerate(source.shard_sizes):
        if left <= 0:
            break
        idx = np.arange(min(size, left))
        parts.append(source.read_rows(shard, idx))
        docs.append(source.read_where(shard, idx)[1])
        left -= len(idx)
    rows, doc = np.concatenate(parts), np.concatenate(docs)
    whole = doc != doc[-1] if left <= 0 else np.ones(len(doc), bool)  # drop the last, maybe partial, context
    return rows[whole].astype(np.float32, copy=False)


def load(path: str | None, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) activations scaled to ``E||x||^2 = d_in``: the eval rows come after the train rows in
    the source (whole context rows for a cache: ``read_rows`` stops at a context boundary), and only the
    train rows are shuffled."""
    n = args.train_rows + args.eval_rows
    x = torch.from_numpy(read_rows(path, n)) if path else synthetic(n, args.d_in, args.features,
                                                                     args.mean_active)
    x = x * math.sqrt(x.shape[1] / x.pow(2).sum(1).mean())
    train, held_out = x[: -args.eval_rows], x[-args.eval_rows:]
    return train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(1))], held_out


@torch.no_grad()
def evaluate(encode_decode, x: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """(held-out L0, normalized MSE) of ``encode_decode(x) -> (z, x_hat)`` over ``x``, by ``metrics.py``."""
    stats = ReconstructionStats()
    for xs in x.split(chunk):
        z, x_hat = encode_decode(xs)
        stats.update(xs, x_hat, z)
    values = stats.compute()
    return values["l0"], values["nmse"]


def train(trainer, train_x: torch.Tensor, args: argparse.Namespace) -> torch.nn.Module:
    """Run ``args.steps`` steps on consecutive batches (wrapping around), the same for every SAE."""
    sae, step = trainer
    sae.train()
    for i in range(args.steps):
        start = (i * args.batch) % (train_x.shape[0] - args.batch + 1)
        step(train_x[start:start + args.batch])
    return sae


def run_ours(cfg: SAEConfig, coeff: float, train_x: torch.Tensor, eval_x: torch.Tensor,
             args: argparse.Namespace) -> tuple[float, float]:
    sae, step = ours_trainer(cfg, train_x.shape[1], coeff, lr=args.lr,
                             dead_window_tokens=args.dead_window * args.batch)
    sae.init_b_dec(train_x[:args.b_dec_sample])
    train((sae, step), train_x, args)
    return evaluate(lambda xs: (z := sae.encode(xs), sae.decode(z)), eval_x)


def run_saelens(arch: str, coeff: float, train_x: torch.Tensor, eval_x: torch.Tensor,
                args: argparse.Namespace, **kw: object) -> tuple[float, float]:
    sae = train(saelens_trainer(arch, train_x.shape[1], args.d_sae, coeff, lr=args.lr,
                                dead_window_steps=args.dead_window, **kw), train_x, args)
    return evaluate(lambda xs: (z := sae.encode(xs), sae.decode(z)), eval_x)


def interpolate(l0: float, curve: list[tuple[float, float]]) -> float | None:
    """NMSE of ``curve`` [(L0, nmse)] at ``l0``, linear in log L0; None outside its L0 range."""
    pts = sorted(p for p in curve if p[0] > 0)
    for (a0, a1), (b0, b1) in itertools.pairwise(pts):
        if a0 <= l0 <= b0:
            t = (math.log(l0) - math.log(a0)) / (math.log(b0) - math.log(a0)) if b0 > a0 else 0.0
            return a1 + t * (b1 - a1)
    return None


def dominated(point: tuple[float, float], curve: list[tuple[float, float]]) -> bool:
    """Whether a point of ``curve`` has no higher L0 and no higher nmse than ``point``, one strictly lower."""
    return any(o[0] <= point[0] and o[1] <= point[1] and o != point for o in curve)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--acts", help=".npy [n, d_in] of real activations, or an activation cache directory "
                                  "(default: synthetic)")
    p.add_argument("--d-in", type=int, default=64, help="synthetic data only")
    p.add_argument("--features", type=int, default=512, help="synthetic ground-truth dictionary size")
    p.add_argument("--mean-active", type=float, default=8.0, help="synthetic features active per row")
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--train-rows", type=int, default=100_000)
    p.add_argument("--eval-rows", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dead-window", type=int, default=200, help="steps unfired => dead")
    p.add_argument("--b-dec-sample", type=int, default=8192)
    p.add_argument("--l1", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.0, 10.0])
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="initialisation seeds per SAE")
    p.add_argument("--threads", type=int, default=1, help="small matmuls: one thread wastes least on sync")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    train_x, eval_x = load(args.acts, args)
    print(f"data: {args.acts or 'synthetic'}, d_in {train_x.shape[1]}, d_sae {args.d_sae}, "
          f"{args.steps} steps x {args.batch} rows, lr {args.lr}, eval rows {eval_x.shape[0]}")

    t0 = time.perf_counter()
    runs: dict[str, list[list[tuple[float, float]]]] = {}  # name -> per sweep value -> per seed (L0, nmse)
    data = (train_x, eval_x, args)
    for name, sweep, run in [
        ("ours relu", args.l1, lambda c: run_ours(preset("relu", d_sae=args.d_sae), c, *data)),
        ("ours relu_dn", args.l1, lambda c: run_ours(preset("relu_dn", d_sae=args.d_sae), c, *data)),
        ("saelens standard", args.l1, lambda c: run_saelens("standard", c, *data)),
        ("ours topk", args.k, lambda k: run_ours(preset("topk", d_sae=args.d_sae, k=k), 0.0, *data)),
        ("saelens topk", args.k, lambda k: run_saelens("topk", 0.0, *data, k=k)),
    ]:
        runs[name] = []
        for v in sweep:
            runs[name].append([])
            for seed in args.seeds:
                torch.manual_seed(seed)
                runs[name][-1].append(run(v))
                l0, nmse = runs[name][-1][-1]
                print(f"  [{time.perf_counter() - t0:5.0f} s] {name} {v:g} seed {seed}: L0 {l0:.2f}, "
                      f"nmse {nmse:.4f}", flush=True)
    n_trained = sum(len(per_seed) for points in runs.values() for per_seed in points)
    print(f"trained {n_trained} SAEs in {time.perf_counter() - t0:.0f} s\n")
    report(runs, args)


PAIRS = {"ours relu": "saelens standard", "ours relu_dn": "saelens standard", "ours topk": "saelens topk"}


def report(runs: dict[str, list[list[tuple[float, float]]]], args: argparse.Namespace) -> None:
    """Every point (means over seeds), each compared with the other library's curve, then per pair of
    curves: points dominated each way and the worst nmse difference each way."""
    curves = {name: [tuple(float(v) for v in torch.tensor(per_seed).mean(0)) for per_seed in points]
              for name, points in runs.items()}
    print(f"{'sae':18s} {'l1/k':>6s} {'L0':>8s} {'nmse':>8s} {'spread':>7s} {'vs':>16s} "
          f"{'other nmse @ same L0':>21s} {'dominated':>9s}")
    max_spread = 0.0
    others = {**PAIRS, "saelens standard": "ours relu_dn", "saelens topk": "ours topk"}
    for name, pts in curves.items():
        sweep = args.k if "topk" in name else args.l1
        other = curves[others[name]]
        for i, (coef, point) in enumerate(zip(sweep, pts, strict=True)):
            spread = max(r[1] for r in runs[name][i]) - min(r[1] for r in runs[name][i])
            max_spread = max(max_spread, spread)
            at = interpolate(point[0], other)
            shown = f"{at:21.4f}" if at is not None else f"{'-':>21s}"
            print(f"{name:18s} {coef:6g} {point[0]:8.2f} {point[1]:8.4f} {spread:7.4f} {others[name]:>16s} "
                  f"{shown} {'yes' if dominated(point, other) else 'no':>9s}")
    print(f"\n(means over seeds {args.seeds}; 'other nmse @ same L0' interpolates the other curve, which "
          "flatters the compared point on a convex frontier; 'dominated' needs no interpolation)")
    figures = []
    for ours, theirs in PAIRS.items():
        a, b = curves[ours], curves[theirs]
        ours_dom, theirs_dom = sum(dominated(p, b) for p in a), sum(dominated(p, a) for p in b)
        diff_ours = [p[1] - at for p in a if (at := interpolate(p[0], b)) is not None]
        diff_theirs = [p[1] - at for p in b if (at := interpolate(p[0], a)) is not None]
        worst = max(diff_ours, default=math.nan)
        best_theirs = min(diff_theirs, default=math.nan)  # their most negative: where they beat us most
        print(f"{ours} vs {theirs}: ours dominated {ours_dom}/{len(a)}, theirs dominated "
              f"{theirs_dom}/{len(b)}; worst ours-minus-theirs {worst:+.4f}, "
              f"best theirs-minus-ours {best_theirs:+.4f}")
        key = ours.replace("ours ", "")
        figures += [f"{key}_dominated={ours_dom}/{len(a)}", f"{key}_dominates={theirs_dom}/{len(b)}",
                    f"{key}_worst_nmse_diff={worst:+.4f}", f"{key}_saelens_best_nmse_diff={best_theirs:+.4f}"]
    print(" ".join(figures) + f" max_seed_spread={max_spread:.4f}")


if __name__ == "__main__":
    main()
