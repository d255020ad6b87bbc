"""How close ``sae.target_l0`` ends to its target: ``python train.py`` runs with ``sae.target_l0=N``.

Data: by default ``activations=synthetic`` (``sae_lightning/cache/synthetic.py``: ``--rows`` rows of width
``--d-in``, sparse codes over ``4 x d_sae`` random unit directions, each firing with the same probability,
about ``--active`` per row, log-normal magnitudes of mean and standard deviation 1, plus Gaussian noise).
With ``--experiment NAME`` the runs are ``train.py experiment=NAME`` instead (real
activations, e.g. ``tinystories_ref``: SmolLM2 layer-6 MLP, d_sae 3072; its cache is built or reused),
for ``--tokens`` training tokens each. Each target is one ``train.py`` run from the same start coefficient
(``l1``); the final L0 is the held-out ``val/l0`` of the run's last validation (``summary.json``), the
relative error ``|L0 - target| / target``. The last line is ``key=value`` pairs for scripts: the worst
relative error and the total time.

Run: ``python -m benchmarks.target_l0`` (about a minute per target on 2 CPU cores);
``python -m benchmarks.target_l0 --experiment tinystories_ref --targets 16 32 64`` (real activations,
1M tokens per target: about 10 minutes each on 2 cores). ``--out FILE`` writes the table whole under the
results header.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, Report, add_out_arg


def synthetic(args: argparse.Namespace) -> list[str]:
    """The ``train.py`` overrides of the default data (module docstring)."""
    s = "activations.synthetic."
    return ["activations=synthetic", f"{s}n_rows={args.rows}", f"{s}d={args.d_in}",
            f"{s}n_features={4 * args.d_sae}", f"{s}mean_active={args.active}", f"{s}freq_exponent=0",
            f"{s}magnitude_mean=1", f"{s}magnitude_std=1", f"{s}noise_std=0.05"]


def run(out: Path, target: float, args: argparse.Namespace) -> dict[str, float]:
    """One ``train.py`` run (on the synthetic data, or ``args.experiment``); its ``summary.json`` metrics."""
    over = ["logger=csv", "trainer.progress_bar=false", f"sae={args.sae}", f"sae.target_l0={target}",
            f"l1={args.l1}", f"hydra.run.dir={out}"]
    if args.experiment:
        over += [f"experiment={args.experiment}", f"train_tokens={args.tokens}"]
    else:
        over += [*synthetic(args), "trainer=cpu",
                 f"batch_size={args.batch_size}", f"train_tokens={args.batch_size * args.steps}",
                 f"sae.d_sae={args.d_sae}", f"lr={args.lr}",
                 f"trainer.val_every_n_steps={args.steps}", "trainer.limit_val_batches=8",
                 f"trainer.checkpoint_every_n_steps={args.steps}"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *over], capture_output=True, text=True,
                          cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed for target {target}:\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["metrics"]


def main(argv: list[str] | None = None) -> None:
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
    add_out_arg(parser)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    worst = 0.0
    say = Report(__spec__.name, argv)
    if args.experiment:
        say(f"sae={args.sae} experiment={args.experiment} tokens={args.tokens} start l1={args.l1}")
    else:
        say(f"sae={args.sae} d_in={args.d_in} d_sae={args.d_sae} steps={args.steps} "
            f"batch={args.batch_size} start l1={args.l1}")
    say(f"{'target':>8} {'val L0':>8} {'rel err':>8} {'final coeff':>12} {'val nmse':>9} {'s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            t = time.perf_counter()
            metrics = run(Path(tmp) / f"run_{target:g}", target, args)
            l0 = metrics["val/l0"]
            err = abs(l0 - target) / target
            worst = max(worst, err)
            say(f"{target:8g} {l0:8.2f} {err:8.1%} {metrics['train/sparsity_coeff']:12.4g} "
                f"{metrics['val/nmse']:9.4f} {time.perf_counter() - t:6.1f}")
    say(f"worst_rel_err={worst:.4f} targets={','.join(f'{t:g}' for t in args.targets)} "
        f"seconds={time.perf_counter() - t0:.0f}")
    say.write(args.out)


if __name__ == "__main__":
    main()
