"""Quality at equal work: held-out normalized MSE against L0, our SAEs vs SAELens's, same data and steps.

Each SAE is trained by its own library's training step (``common.ours_trainer`` /
``common.saelens_trainer``: what ``SAEModule`` and SAELens's ``SAETrainer`` do per step, dead-latent
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
directory or, by default, synthetic activations (``common.synthetic``: ``activations=synthetic``'s
generator plus a constant offset). Rows are scaled so that ``E||x||^2 = d_in`` for both libraries.

``--results FILE`` keeps every finished run as a JSON line with its fingerprint: the settings (the data by
its file or cache key and its width, the training and scoring options, SAELens's version) and a hash of the
code the run measures (``measured_code``: for our curves the resolved preset, the architecture's modules,
the training step and the L0 controller; for every curve this script's training and scoring). A rerun trains
only what the file lacks; a run of the same settings with another fingerprint is stale: it is listed,
left out of the report and trained again when the command asks for it.

Run: ``python -m benchmarks.quality_vs_saelens`` (a few minutes on 2 cores); ``--out FILE`` writes the
report whole under the results header.
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
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import (
    Report,
    add_out_arg,
    add_run_args,
    append_result,
    code_hash,
    data_width,
    evaluate,
    load,
    ours_trainer,
    preset,
    saelens_trainer,
    source_name,
    train,
)
from sae_lightning.saes.matryoshka import default_prefixes


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
SYNTHETIC_ONLY = ("features", "mean_active")  # settings of the generated data, meaningless with --acts


def settings(args: argparse.Namespace) -> dict[str, object]:
    """What a result depends on besides (curve, value, seed) and the code: the data (a cache by its key,
    its real width; generated data by its parameters), the training and scoring options, SAELens's
    version."""
    import sae_lens

    values = {key: getattr(args, key) for key in SETTINGS} | {"acts": source_name(args.acts)}
    if args.acts:
        values |= {"d_in": data_width(args.acts)} | dict.fromkeys(SYNTHETIC_ONLY)
    return values | {"sae_lens": sae_lens.__version__}


def measured_code(curve: str) -> str:
    """The hash of what a run of ``curve`` measures: how it is trained and scored here (with
    ``metrics.ReconstructionStats``), and for our curves the preset as ``sae=<arch>`` resolves it (the
    preset's values on its schema's defaults), the architecture's code (every module of its class's
    bases, with the kernels and the initialisation), the training step, the L0 controller and the trainer
    defaults the step takes (``optim``, ``latents``). SAELens's code is fixed by its version (in
    :func:`settings`)."""
    import sae_lightning.metrics
    import sae_lightning.saes.init
    import sae_lightning.saes.sparse_ops
    import sae_lightning.train.sparsity
    import sae_lightning.train.step
    from sae_lightning.config import LatentsConfig, OptimConfig
    from sae_lightning.saes import sae_class

    lib, arch, _ = CURVES[curve]
    scoring = [run_ours, run_saelens, train, evaluate, common.load, common.synthetic, common.read_rows,
               sae_lightning.metrics]
    if lib == "saelens":
        return code_hash(*scoring, saelens_trainer)
    name = arch.split()[0]
    bases = [m for m in dict.fromkeys(c.__module__ for c in sae_class(name).__mro__)
             if m.startswith("sae_lightning.")]
    return code_hash(*scoring, ours_trainer, repr(common.preset(name)), repr(OptimConfig()),
                     repr(LatentsConfig()), *(sys.modules[m] for m in bases), sae_lightning.saes.init,
                     sae_lightning.saes.sparse_ops, sae_lightning.train.step, sae_lightning.train.sparsity)


def fingerprint(curve: str, fixed: dict[str, object]) -> dict[str, object]:
    """A run's fingerprint: the ``fixed`` settings (:func:`settings`) and the hash of the code it measures."""
    return fixed | {"code": measured_code(curve)}


def experiment(fingerprint: dict[str, object]) -> dict[str, object]:
    """What makes two runs the same experiment whatever the code: the settings but the code's hash, with the
    data named by its key (older rows held the cache's absolute path) and, for real data, without what
    older rows recorded of the unused synthetic options (``d_in`` among them)."""
    values = {k: v for k, v in fingerprint.items() if k != "code"}
    values["acts"] = source_name(values["acts"])
    if values["acts"]:
        values = {k: v for k, v in values.items() if k not in (*SYNTHETIC_ONLY, "d_in")}
    return values


def load_results(path: Path | None, fingerprints: dict[str, dict[str, object]]
                 ) -> tuple[list[dict], list[dict]]:
    """(the runs in ``path`` made with these fingerprints (curve -> fingerprint), the stale ones: runs of
    those curves in the same experiment whose fingerprint differs, made with other code or by older
    versions of this script, and not yet trained again). Runs of other experiments (other settings) are
    neither."""
    if path is None or not path.exists():
        return [], []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    same = {curve: experiment(f) for curve, f in fingerprints.items()}
    ours = [r for r in rows if r["curve"] in fingerprints and experiment(r["settings"]) == same[r["curve"]]]
    done = [r for r in ours if r["settings"] == fingerprints[r["curve"]]]
    have = {(r["curve"], r["value"], r["seed"]) for r in done}
    stale = [r for r in ours if r["settings"] != fingerprints[r["curve"]]
             and (r["curve"], r["value"], r["seed"]) not in have]
    return done, stale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    p.add_argument("--results", type=Path,
                   help="JSONL of finished runs: runs found there with the same fingerprint (settings and "
                        "the code they measure) are not trained again, stale ones are; the report covers "
                        "every curve in it")
    p.add_argument("--plot", type=Path, help="also draw each pair's frontiers and training paths (png, svg)")
    add_out_arg(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")
    fixed = settings(args)
    fingerprints = {name: fingerprint(name, fixed) for name in CURVES}
    done, stale = load_results(args.results, fingerprints)
    if stale:
        print(f"{len(stale)} stale runs in {args.results} (same settings, other code or an older version of "
              "this script): left out of the report, and trained again where asked for:")
        for r in stale:
            print(f"  {r['curve']} {r['value']:g} seed {r['seed']}")
    have = {(r["curve"], r["value"], r["seed"]) for r in done}
    todo = [(name, v, seed) for name in args.curves for v in getattr(args, CURVES[name][2])
            for seed in args.seeds if (name, v, seed) not in have]
    train_x, eval_x = load(args.acts, args) if todo else (None, None)
    if todo:
        print(f"data: {source_name(args.acts) or 'synthetic'}, d_in {train_x.shape[1]}, train rows "
              f"{train_x.shape[0]}, d_sae {args.d_sae}, {args.steps} steps x {args.batch} rows, "
              f"lr {args.lr}, eval rows {eval_x.shape[0]}; {len(todo)} runs to train, {len(done)} found in "
              f"{args.results}")
    t0 = time.perf_counter()
    for name, v, seed in todo:
        lib, arch, _ = CURVES[name]
        torch.manual_seed(seed)
        t1 = time.perf_counter()
        curve = (run_ours if lib == "ours" else run_saelens)(arch, v, train_x, eval_x, args)
        row = {"curve": name, "value": v, "seed": seed, "l0": curve[-1][1], "nmse": curve[-1][2],
               "curve_points": curve, "seconds": round(time.perf_counter() - t1, 1),
               "settings": fingerprints[name]}
        done.append(row)
        append_result(args.results, row)
        print(f"  [{time.perf_counter() - t0:5.0f} s] {name} {v:g} seed {seed}: L0 {row['l0']:.2f}, "
              f"nmse {row['nmse']:.4f}", flush=True)
    say = Report(__spec__.name, argv)
    report(done, say)
    say.write(args.out)
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


def report(rows: list[dict], say: Callable[[str], None] = print) -> None:
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
    say(f"{'sae':23s} {'value':>6s} {'seeds':>5s} {'L0':>8s} {'nmse':>8s} {'spread':>7s} {'last-q':>7s} "
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
            say(f"{name:23s} {value:6g} {len(rs):5d} {point[0]:8.2f} {point[1]:8.4f} {spread:7.4f} "
                  f"{last_q:7.4f} {l0_q:7.1%} {others[name]:>23s} {shown} {dom:>9s}")
    band = max(spreads, default=math.nan)
    say("\n(means over seeds; 'spread' = max - min nmse over seeds; 'last-q' = nmse drop over the last "
          "quarter of training, 'L0 l-q' = how much higher L0 was a quarter before the end; 'other nmse @ "
          "L0' interpolates the other curve linearly in log L0, which flatters the compared point on a "
          "convex frontier; 'dominated' needs no interpolation)")
    say(f"noise band (largest seed spread of a point of {', '.join(sorted(BAND_CURVES & set(runs)))}, "
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
        say(f"{ours} vs {theirs}: ours dominated {ours_dom}/{len(a)}, theirs dominated "
              f"{theirs_dom}/{len(b)}; worst ours-minus-theirs {worst:+.4f}, best theirs-minus-ours "
              f"{best_theirs:+.4f}; worst gap {max(gaps, default=math.nan):+.2%} of their nmse: {verdict} "
              f"(band {band:.2%})")
        key = ours.replace("ours ", "")
        if theirs.replace("saelens ", "") not in (key, "standard"):  # ours against another of their curves
            key += f" vs saelens {theirs.replace('saelens ', '')}"
        key = key.replace(" ", "_")
        figures += [f"{key}_dominated={ours_dom}/{len(a)}", f"{key}_dominates={theirs_dom}/{len(b)}",
                    f"{key}_worst_nmse_diff={worst:+.4f}", f"{key}_saelens_best_nmse_diff={best_theirs:+.4f}"]
    say(" ".join(figures) + f" max_relative_seed_spread={band:.4f}")
    if "ours relu" in curves and "saelens standard" in curves:
        say("(ours relu is plain L1 with a unit-norm decoder, which SAELens does not have: its line is for "
              "reference; SAELens's standard SAE (L1 weighted by decoder norms) is our relu_dn)")


if __name__ == "__main__":
    main()
