"""How close ``sae.target_l0`` ends to its target: ``python train.py`` runs with ``sae.target_l0=N``.

Data: by default a synthetic [n, d_in] array written to a temporary ``.npy`` (sparse non-negative codes
over a random dictionary, about ``--active`` features per row, plus Gaussian noise), trained with
``activations=file``. With ``--experiment NAME`` the runs are ``train.py experiment=NAME`` instead (real
activations, e.g. ``tinystories_ref``: SmolLM2 layer-6 MLP, d_sae 3072; its cache is built or reused),
for ``--tokens`` training tokens each. Each target is one ``train.py`` run from the same start coefficient
(``l1``); the final L0 is the held-out ``val/l0`` of the run's last validation (``summary.json``), the
relative error ``|L0 - target| / target``. The last line is ``key=value`` pairs for scripts: the worst
relative error and the total time.

Run: ``python benchmarks/target_l0.py`` (about a minute per target on 2 CPU cores);
``python benchmarks/target_l0.py --experiment tinystories_ref --targets 16 32 64`` (real activations,
1M tokens per target: about 10 minutes each on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TRAIN = Path(__file__).resolve().parents[1] / "train.py"


def synthetic(path: Path, n: int, d_in: int, n_features: int, active: float, seed: int = 0) -> Path:
    """Rows ``codes @ dictionary + noise``; codes exponential on a random ``active / n_features`` of them."""
    g = np.random.default_rng(seed)
    dictionary = g.normal(size=(n_features, d_in)) / np.sqrt(d_in)
    codes = g.exponential(size=(n, n_features)) * (g.random((n, n_features)) < active / n_features)
    x = codes @ dictionary + 0.05 * g.normal(size=(n, d_in))
    np.save(path, x.astype(np.float32))
    return path


def run(acts: Path | None, out: Path, target: float, args: argparse.Namespace) -> dict[str, float]:
    """One ``train.py`` run (on the synthetic ``acts``, or ``args.experiment`` when ``acts`` is None); its
    ``summary.json`` metrics."""
    over = ["logger=csv", "trainer.progress_bar=false", f"sae={args.sae}", f"sae.target_l0={target}",
            f"l1={args.l1}", f"hydra.run.dir={out}"]
    if acts is None:
        over += [f"experiment={args.experiment}", f"train_tokens={args.tokens}"]
    else:
        over += ["activations=file", f"activations.path={acts}", "trainer=cpu",
                 f"batch_size={args.batch_size}", f"train_tokens={args.batch_size * args.steps}",
                 f"sae.d_sae={args.d_sae}", f"lr={args.lr}",
                 f"trainer.val_every_n_steps={args.steps}", "trainer.limit_val_batches=8",
                 f"trainer.checkpoint_every_n_steps={args.steps}"]
    proc = subprocess.run([sys.executable, str(TRAIN), *over], capture_output=True, text=True,
                          cwd=TRAIN.parent if acts is None else out.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed for target {target}:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[10, 30, 60])
    parser.add_argument("--sae", default="relu")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--d-in", type=int, default=32)
    parser.add_argument("--d-sae", type=int, default=256)
    parser.add_argument("--active", type=float, default=30.0, help="mean active true features per row")
    parser.add_argument("--rows", type=int, default=32_768)
    parser.add_argument("--l1", type=float, default=5.0, help="the start coefficient")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--experiment", help="train.py experiment=NAME on its real activations instead")
    parser.add_argument("--tokens", type=int, default=1_048_576,
                        help="training tokens per run (with --experiment)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        if args.experiment:
            acts = None
            print(f"sae={args.sae} experiment={args.experiment} tokens={args.tokens} start l1={args.l1}")
        else:
            acts = synthetic(Path(tmp) / "acts.npy", args.rows, args.d_in, 4 * args.d_sae, args.active)
            print(f"sae={args.sae} d_in={args.d_in} d_sae={args.d_sae} steps={args.steps} "
                  f"batch={args.batch_size} start l1={args.l1}")
        print(f"{'target':>8} {'val L0':>8} {'rel err':>8} {'final coeff':>12} {'val nmse':>9} {'s':>6}")
        for target in args.targets:
            t = time.perf_counter()
            metrics = run(acts, Path(tmp) / f"run_{target:g}", target, args)
            l0 = metrics["val/l0"]
            err = abs(l0 - target) / target
            worst = max(worst, err)
            print(f"{target:8g} {l0:8.2f} {err:8.1%} {metrics['train/sparsity_coeff']:12.4g} "
                  f"{metrics['val/nmse']:9.4f} {time.perf_counter() - t:6.1f}", flush=True)
    print(f"worst_rel_err={worst:.4f} targets={','.join(f'{t:g}' for t in args.targets)} "
          f"seconds={time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    main()
