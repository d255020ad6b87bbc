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
seed-to-seed noise. The noise band a difference is read against is the largest spread of the plain L1
and TopK curves (``BAND_CURVES``), not of the architecture being judged, as a fraction of that point's
nmse; a difference is likewise read as a fraction of the other curve's nmse at that L0 (``report``).

Data: ``--acts file.npy`` ([n, d_in] activations, e.g. SmolLM2 layer-6 mlp_post) or an activation cache
directory or, by default, synthetic activations: sparse non-negative combinations of a ground-truth
dictionary (Zipf-like firing frequencies, exponential magnitudes) plus a constant offset and Gaussian
noise. Rows are scaled so that ``E||x||^2 = d_in`` for both libraries.

Run: ``python benchmarks/quality_vs_saelens.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ours_trainer, preset, saelens_trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled
from sae_lightning.metrics import ReconstructionStats
from sae_lightning.saes.matryoshka import default_prefixes


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


def train(step, train_x: torch.Tensor, args: argparse.Namespace, score) -> list[tuple[int, float, float]]:
    """Run ``args.steps`` steps on consecutive batches (wrapping around: several passes when the train rows
    are fewer than steps x batch), the same for every SAE; ``score()`` -> (L0, nmse) on the held-out rows
    after each ``args.steps / args.curve_points`` steps. Returns the curve [(tokens, L0, nmse)]."""
    curve, every = [], max(1, args.steps // args.curve_points)
    for i in range(args.steps):
        start = (i * args.batch) % (train_x.shape[0] - args.batch + 1)
        step(train_x[start:start + args.batch])
        if (i + 1) % every == 0 or i + 1 == args.steps:
            curve.append(((i + 1) * args.batch, *score()))
    return curve


def train_counting_fires(sae: torch.nn.Module, step, train_x: torch.Tensor, eval_x: torch.Tensor,
                         args: argparse.Namespace
                         ) -> tuple[list[tuple[int, float, float]], torch.Tensor, int]:
    """:func:`train` scored through ``sae.encode``/``decode`` (ours or SAELens's), also counting how often
    each latent fires on the held-out rows: (curve, each latent's firing frequency at the last point,
    seconds)."""
    fires = torch.zeros(args.d_sae)

    def encode_decode(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = sae.encode(xs)
        fires.add_((z.to_dense() if z.is_sparse else z).ne(0).sum(0))
        return z, sae.decode(z)

    def score() -> tuple[float, float]:
        sae.eval()
        fires.zero_()
        result = evaluate(encode_decode, eval_x)
        sae.train()
        return result

    sae.train()
    t0 = time.perf_counter()
    curve = train(step, train_x, args, score)
    return curve, fires / eval_x.shape[0], round(time.perf_counter() - t0)


def frequency_summary(freq: torch.Tensor) -> dict[str, object]:
    """How the latents' held-out firing frequencies spread: the fraction that never fire (``dead``), fire on
    under 1 % of rows (``rare``) or on over half (``dense``), and the 5 / 50 / 95 % quantiles
    (``freq_quantiles``). Two SAEs at one L0 can split it very differently."""
    quantiles = torch.quantile(freq.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return {"dead": (freq == 0).float().mean().item(), "rare": (freq < 0.01).float().mean().item(),
            "dense": (freq > 0.5).float().mean().item(), "freq_quantiles": quantiles.tolist()}


def run_ours(arch: str, value: float, train_x: torch.Tensor, eval_x: torch.Tensor,
             args: argparse.Namespace) -> list[tuple[int, float, float]]:
    """Our ``sae=<arch>`` preset (``value``: k for the TopK family, else the sparsity coefficient;
    ``jumprelu target``: the ``sae.target_l0`` that steers the preset's coefficient)."""
    k_arch = arch in K_ARCHS
    own = {"jumprelu": {"l0_coeff": value}, "jumprelu target": {"target_l0": value}}.get(arch, {})
    cfg = preset(arch.split()[0], d_sae=args.d_sae, **({"k": int(value)} if k_arch else own))
    coeff = 0.0 if k_arch else cfg.l0_coeff if arch == "jumprelu target" else value
    sae, step = ours_trainer(cfg, train_x.shape[1], coeff, lr=args.lr,
                             dead_window_tokens=args.dead_window * args.batch)
    sae.init_from_data(train_x[:args.b_dec_sample])
    sae.train()

    def score() -> tuple[float, float]:
        sae.eval()
        result = evaluate(lambda xs: (z := sae.encode(xs), sae.decode(z)), eval_x)
        sae.train()
        return result

    return train(step, train_x, args, score)


def run_saelens(arch: str, value: float, train_x: torch.Tensor, eval_x: torch.Tensor,
                args: argparse.Namespace) -> list[tuple[int, float, float]]:
    """SAELens's ``arch`` with its defaults, scored as its users get it: saved for inference and loaded
    back (BatchTopK and Matryoshka become JumpReLU with the learned threshold). ``jumprelu target``: its
    JumpReLU with the quadratic L0 loss around ``target_l0 = value``."""
    from sae_lens import SAE as SAELensSAE

    kw: dict[str, object] = {}
    coeff = 0.0 if arch in K_ARCHS else value
    if arch in K_ARCHS:
        kw["k"] = int(value)
    if arch == "matryoshka":
        kw["matryoshka_widths"] = default_prefixes(args.d_sae)
    if arch == "jumprelu target":  # its documented way to ask for an L0 (Gemma Scope 2), default coefficient
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig

        kw |= {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": value}
        coeff = JumpReLUTrainingSAEConfig.l0_coefficient
    sae, step = saelens_trainer(arch.split()[0], train_x.shape[1], args.d_sae, coeff,
                                lr=args.lr, dead_window_steps=args.dead_window, **kw)
    sae.train()

    def score() -> tuple[float, float]:
        with tempfile.TemporaryDirectory() as tmp:
            sae.save_inference_model(tmp)
            inference = SAELensSAE.load_from_disk(tmp, device="cpu")
        return evaluate(lambda xs: (z := inference.encode(xs), inference.decode(z)), eval_x)

    return train(step, train_x, args, score)


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


# curve name -> (library, architecture, the option giving its sweep values)
CURVES = {"ours relu": ("ours", "relu", "l1"), "ours relu_dn": ("ours", "relu_dn", "l1"),
          "saelens standard": ("saelens", "standard", "l1")}
SWEPT_BY = {"topk": "k", "batchtopk": "k", "matryoshka": "k", "gated": "l1", "jumprelu": "l0_coeff"}
CURVES |= {f"{lib} {arch}": (lib, arch, option) for arch, option in SWEPT_BY.items()
           for lib in ("ours", "saelens")}
# each library's way to ask for an L0: our sae.target_l0, SAELens's quadratic L0 loss around its target_l0
CURVES |= {f"{lib} jumprelu target": (lib, "jumprelu target", "target_l0") for lib in ("ours", "saelens")}
K_ARCHS = {"topk", "batchtopk", "matryoshka"}
# (ours, SAELens's) curves compared; a curve may be in several pairs, the first one naming it is its default
PAIRS = [("ours relu_dn", "saelens standard"), ("ours relu", "saelens standard"),
         ("ours topk", "saelens topk"), ("ours batchtopk", "saelens batchtopk"),
         ("ours matryoshka", "saelens matryoshka"), ("ours gated", "saelens gated"),
         ("ours jumprelu target", "saelens jumprelu target"), ("ours jumprelu target", "saelens jumprelu"),
         ("ours jumprelu", "saelens jumprelu")]
# the curves whose seed spread is the noise band (the three-seed curves): a noisier architecture's
# own spread does not widen the band its comparison is judged against
BAND_CURVES = {"ours relu", "saelens standard", "ours topk", "saelens topk"}
SETTINGS = ("acts", "d_in", "features", "mean_active", "d_sae", "train_rows", "eval_rows", "batch", "steps",
            "lr", "dead_window", "b_dec_sample", "curve_points")


def settings(args: argparse.Namespace) -> dict[str, object]:
    """What a result depends on besides (curve, value, seed): a stored result is reused only if equal."""
    import sae_lens

    return ({key: getattr(args, key) for key in SETTINGS} | {"acts": source_name(args.acts)}
            | {"sae_lens": sae_lens.__version__})


def source_name(acts: str | None) -> str | None:
    """The data's file or cache folder name (a cache's name holds its key hash), not where it lies."""
    return Path(acts).name if acts else None


def append_result(path: Path | None, row: dict) -> None:
    """Append ``row`` as one JSON line to ``path`` (nothing when None): a run is kept as soon as it ends."""
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def load_results(path: Path | None, fingerprint: dict[str, object]) -> list[dict]:
    """The runs in ``path`` made with these settings."""
    if path is None or not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["settings"] | {"acts": source_name(r["settings"]["acts"])} == fingerprint]


def add_run_args(p: argparse.ArgumentParser, *, d_sae: int, train_rows: int, eval_rows: int, batch: int,
                 steps: int, threads: int) -> None:
    """The options that fix how every SAE is trained and scored, with these defaults (here and in the
    ablation scripts, which train as this script trains)."""
    p.add_argument("--d-sae", type=int, default=d_sae)
    p.add_argument("--train-rows", type=int, default=train_rows)
    p.add_argument("--eval-rows", type=int, default=eval_rows)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dead-window", type=int, default=200, help="steps unfired => dead")
    p.add_argument("--b-dec-sample", type=int, default=8192)
    p.add_argument("--curve-points", type=int, default=4, help="held-out scores during training (the curve)")
    p.add_argument("--threads", type=int, default=threads, help="torch threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--acts", help=".npy [n, d_in] of real activations, or an activation cache directory "
                                  "(default: synthetic)")
    p.add_argument("--d-in", type=int, default=64, help="synthetic data only")
    p.add_argument("--features", type=int, default=512, help="synthetic ground-truth dictionary size")
    p.add_argument("--mean-active", type=float, default=8.0, help="synthetic features active per row")
    add_run_args(p, d_sae=512, train_rows=100_000, eval_rows=10_000, batch=512, steps=300, threads=1)
    p.add_argument("--l1", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.0, 10.0],
                   help="L1 coefficients (relu, relu_dn, standard, gated)")
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16], help="k (topk, batchtopk, matryoshka)")
    p.add_argument("--l0-coeff", type=float, nargs="+", default=[1.0, 3.0, 10.0],
                   help="jumprelu L0 coefficients")
    p.add_argument("--target-l0", type=float, nargs="+", default=[],
                   help="target L0s of the 'jumprelu target' curves (ours sae.target_l0, SAELens quadratic)")
    p.add_argument("--curves", nargs="+", default=list(CURVES)[:5], choices=list(CURVES), metavar="CURVE",
                   help=f"which to train (default the first five); of: {', '.join(CURVES)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="initialisation seeds per SAE")
    p.add_argument("--results", type=Path, help="JSONL of finished runs: runs found there (same settings) "
                                                "are not trained again; the report covers every curve in it")
    p.add_argument("--plot", type=Path, help="also draw each pair's frontiers and training paths (png, svg)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    fingerprint = settings(args)
    done = load_results(args.results, fingerprint)
    have = {(r["curve"], r["value"], r["seed"]) for r in done}
    todo = [(name, v, seed) for name in args.curves for v in getattr(args, CURVES[name][2])
            for seed in args.seeds if (name, v, seed) not in have]
    train_x, eval_x = load(args.acts, args) if todo else (None, None)
    if todo:
        print(f"data: {args.acts or 'synthetic'}, d_in {train_x.shape[1]}, train rows {train_x.shape[0]}, "
              f"d_sae {args.d_sae}, {args.steps} steps x {args.batch} rows, lr {args.lr}, "
              f"eval rows {eval_x.shape[0]}; {len(todo)} runs to train, {len(done)} found in {args.results}")
    t0 = time.perf_counter()
    for name, v, seed in todo:
        lib, arch, _ = CURVES[name]
        torch.manual_seed(seed)
        t1 = time.perf_counter()
        curve = (run_ours if lib == "ours" else run_saelens)(arch, v, train_x, eval_x, args)
        row = {"curve": name, "value": v, "seed": seed, "l0": curve[-1][1], "nmse": curve[-1][2],
               "curve_points": curve, "seconds": round(time.perf_counter() - t1, 1), "settings": fingerprint}
        done.append(row)
        append_result(args.results, row)
        print(f"  [{time.perf_counter() - t0:5.0f} s] {name} {v:g} seed {seed}: L0 {row['l0']:.2f}, "
              f"nmse {row['nmse']:.4f}", flush=True)
    report(done)
    if args.plot:
        plot(done, args.plot)


def plot(rows: list[dict], path: Path) -> None:
    """One panel per pair of curves (ours, SAELens's) with runs: each run's held-out path during training
    (thin, L0 falling and nmse with it) ending at its final point, and the frontier through the means over
    seeds (thick), so how far from converged a run is shows beside where the curves cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {r["curve"] for r in rows}
    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    alone = sorted(names - {c for pair in pairs for c in pair})  # a curve whose counterpart has no runs yet
    pairs += list(dict.fromkeys(next(pair for pair in PAIRS if c in pair) for c in alone))
    cols = min(len(pairs), 3)
    rows_ = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.6 * cols, 3.8 * rows_), squeeze=False)
    for ax in axes.flat[len(pairs):]:
        ax.set_axis_off()
    for ax, pair in zip(axes.flat, pairs, strict=False):
        for name, color in zip(pair, ("tab:blue", "tab:orange"), strict=True):
            runs = [r for r in rows if r["curve"] == name]
            for r in runs:
                ax.plot([p[1] for p in r["curve_points"]], [p[2] for p in r["curve_points"]], color=color,
                        alpha=0.3, lw=0.8, marker=".", ms=2)
            seeds = [[r for r in runs if r["value"] == v] for v in {r["value"] for r in runs}]
            means = sorted((statistics.mean(r["l0"] for r in rs), statistics.mean(r["nmse"] for r in rs))
                           for rs in seeds)
            if means:
                ax.plot(*zip(*means, strict=True), color=color, lw=2, marker="o", label=name)
        ax.set(xscale="log", xlabel="held-out L0", ylabel="held-out normalized MSE", title=" vs ".join(pair))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def report(rows: list[dict]) -> None:
    """Every point (means over its seeds), each compared with the other library's curve, then per pair of
    curves: points dominated each way and the worst nmse difference each way, against the seed spread.

    The band and the differences are relative to the nmse where they are measured: a seed spread of 0.003 at
    nmse 0.30 (L0 ~6) is 1 %, and the same 0.003 at nmse 0.04 (L0 ~1200) would be 7 %, so an absolute band
    taken from the sparse end would pass a consistent gap at the dense end."""
    runs: dict[str, dict[float, list[dict]]] = {}
    for r in rows:
        runs.setdefault(r["curve"], {}).setdefault(r["value"], []).append(r)
    curves = {name: [(statistics.mean(r["l0"] for r in rs), statistics.mean(r["nmse"] for r in rs))
                     for _, rs in sorted(points.items())] for name, points in runs.items()}
    # each curve's points against one curve of the other library: the first paired with it that has runs
    paired = {name: [b if a == name else a for a, b in PAIRS if name in (a, b)] for name in curves}
    others = {name: next((o for o in paired[name] if o in curves), paired[name][0]) for name in curves}
    print(f"{'sae':23s} {'value':>6s} {'seeds':>5s} {'L0':>8s} {'nmse':>8s} {'spread':>7s} {'last-q':>7s} "
          f"{'L0 l-q':>7s} {'vs':>23s} {'other nmse @ L0':>15s} {'dominated':>9s}")
    spreads = []
    for name in (n for n in CURVES if n in runs):
        other = curves.get(others[name], [])
        for (value, rs), point in zip(sorted(runs[name].items()), curves[name], strict=True):
            spread = max(r["nmse"] for r in rs) - min(r["nmse"] for r in rs)
            if len(rs) > 1 and name in BAND_CURVES:
                spreads.append(spread / point[1])
            # how far from converged: nmse drop over the last quarter of training, mean over seeds
            pairs = [(r["curve_points"][-2], r["curve_points"][-1]) for r in rs if len(r["curve_points"]) > 1]
            last_q = statistics.mean(a[2] - b[2] for a, b in pairs) if pairs else math.nan
            l0_q = statistics.mean(a[1] / b[1] - 1 for a, b in pairs) if pairs else math.nan
            at = interpolate(point[0], other)
            shown = f"{at:15.4f}" if at is not None else f"{'-':>15s}"
            dom = "yes" if dominated(point, other) else "no"
            print(f"{name:23s} {value:6g} {len(rs):5d} {point[0]:8.2f} {point[1]:8.4f} {spread:7.4f} "
                  f"{last_q:7.4f} {l0_q:7.1%} {others[name]:>23s} {shown} {dom:>9s}")
    band = max(spreads, default=math.nan)
    print("\n(means over seeds; 'spread' = max - min nmse over seeds; 'last-q' = nmse drop over the last "
          "quarter of training, 'L0 l-q' = how much higher L0 was a quarter before the end; 'other nmse @ "
          "L0' interpolates the other curve linearly in log L0, which flatters the compared point on a "
          "convex frontier; 'dominated' needs no interpolation)")
    print(f"noise band (largest seed spread of a point of {', '.join(sorted(BAND_CURVES & set(runs)))}, "
          f"over its nmse): {band:.2%}")
    figures = []
    for ours, theirs in PAIRS:
        if ours not in curves or theirs not in curves:
            continue
        a, b = curves[ours], curves[theirs]
        ours_dom, theirs_dom = sum(dominated(p, b) for p in a), sum(dominated(p, a) for p in b)
        diff_ours = [p[1] - at for p in a if (at := interpolate(p[0], b)) is not None]
        diff_theirs = [p[1] - at for p in b if (at := interpolate(p[0], a)) is not None]
        worst = max(diff_ours, default=math.nan)
        best_theirs = min(diff_theirs, default=math.nan)  # their most negative: where they beat us most
        # > 0: we are worse there, over their nmse at that L0
        gaps = [(p[1] - at) / at for p in a if (at := interpolate(p[0], b)) is not None]
        gaps += [(at - p[1]) / p[1] for p in b if (at := interpolate(p[0], a)) is not None]
        verdict = ("L0 ranges do not overlap" if not gaps else "no seed band yet" if math.isnan(band) else
                   "no worse beyond the band" if max(gaps) <= band else "WORSE beyond the band")
        print(f"{ours} vs {theirs}: ours dominated {ours_dom}/{len(a)}, theirs dominated "
              f"{theirs_dom}/{len(b)}; worst ours-minus-theirs {worst:+.4f}, best theirs-minus-ours "
              f"{best_theirs:+.4f}; worst gap {max(gaps, default=math.nan):+.2%} of their nmse: {verdict} "
              f"(band {band:.2%})")
        key = ours.replace("ours ", "")
        if theirs.replace("saelens ", "") not in (key, "standard"):  # ours against another of their curves
            key += f" vs saelens {theirs.replace('saelens ', '')}"
        key = key.replace(" ", "_")
        figures += [f"{key}_dominated={ours_dom}/{len(a)}", f"{key}_dominates={theirs_dom}/{len(b)}",
                    f"{key}_worst_nmse_diff={worst:+.4f}", f"{key}_saelens_best_nmse_diff={best_theirs:+.4f}"]
    print(" ".join(figures) + f" max_relative_seed_spread={band:.4f}")
    if "ours relu" in curves and "saelens standard" in curves:
        print("(ours relu is plain L1 with a unit-norm decoder, which SAELens does not have: its line is for "
              "reference; SAELens's standard SAE (L1 weighted by decoder norms) is our relu_dn)")


if __name__ == "__main__":
    main()
