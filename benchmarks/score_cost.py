"""What the monosemanticity score adds to a sweep job: ``evaluate.enabled=true`` on a quickstart-sized job
(issue 40: under a fifth of the job's training time at the default number of scored units).

    python -m benchmarks.score_cost --cache-dir /work/cache-acts [--reps 2]

1. One sweep job as a user runs it: ``python train.py -m experiment=quickstart evaluate.enabled=true``
   (SmolLM2-135M layer 6, relu 2 x d_in, 160 steps of 2048 rows from the cache): its training seconds
   (``summary.json``) and its evaluation's (``eval_seconds`` in ``eval/metrics.json``).
2. ``python evaluate.py ckpt_path=<that job>`` with every default (downstream loss, report, the score at
   the default ``monosemanticity_units``) against the same with ``monosemanticity=false`` (the report without
   the score), alternated ``--reps`` times, whole processes: the score's cost is the difference of the
   medians.

Results: ``benchmarks/results/score_cost_cpu.txt`` (``--out``), written whole with the header of
``benchmarks.common.header``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import header, invocation
from sae_lightning.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {"default (downstream, report, score)": [],
            "no score (monosemanticity=false)": ["monosemanticity=false"]}


def timed(command: list[str], cwd: Path) -> float:
    """Wall seconds of a process, launch to exit; raises with its error output when it fails."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}")
    return seconds


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "activations"))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--train-overrides", nargs="*", default=[], help="more train.py overrides (smoke)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "score_cost_cpu.txt"))
    args = parser.parse_args()
    command = invocation("benchmarks.score_cost")
    with tempfile.TemporaryDirectory(prefix="score_cost-") as tmp:
        work = Path(tmp)
        sweep = work / "sweep"
        job_wall = timed([sys.executable, str(ROOT / "train.py"), "-m", "experiment=quickstart",
                          f"activations.cache_dir={args.cache_dir}", "logger=csv",
                          "trainer.progress_bar=false", "evaluate.enabled=true", f"hydra.sweep.dir={sweep}",
                          *args.train_overrides],
                         work)
        job = next(p for p in sweep.iterdir() if (p / "summary.json").is_file())
        summary = json.loads((job / "summary.json").read_text())
        metrics = json.loads((job / "eval" / "metrics.json").read_text())
        print(f"job: train_seconds={summary['train_seconds']} eval_seconds={metrics['eval_seconds']} "
              f"wall={job_wall:.1f}", flush=True)
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for rep in range(args.reps):
            for i, (name, extra) in enumerate(VARIANTS.items()):
                out_dir = work / f"eval_{rep}_{i}"
                times[name].append(timed([sys.executable, str(ROOT / "evaluate.py"), f"ckpt_path={job}",
                                          f"out_dir={out_dir}", *extra], work))
                print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    train = summary["train_seconds"]
    medians = {name: statistics.median(v) for name, v in times.items()}
    names = list(VARIANTS)
    score = medians[names[0]] - medians[names[1]]
    lines = [header(command).rstrip("\n"),
             f"# one sweep job: experiment=quickstart evaluate.enabled=true, {summary['steps']} steps, "
             f"d_sae {summary['d_sae']}; the score at monosemanticity_units=64 (the default), "
             f"{metrics.get('latent_scored')} latents and {metrics.get('neuron_scored')} neurons scored",
             "",
             f"job: training {train:.1f} s (summary train_seconds); its evaluation "
             f"{metrics['eval_seconds']:.1f} s (eval_seconds); whole process {job_wall:.1f} s",
             f"evaluate.py as a process, median [min-max] of {args.reps}, seconds:"]
    lines += [f"  {name:55s} {spread(times[name])}" for name in names]
    lines += ["",
              f"the score (default minus no score): {score:.1f} s = {score / train:.3f} x the job's training "
              f"time (target < 0.2)",
              f"the whole evaluation after the job: {metrics['eval_seconds']:.1f} s = "
              f"{metrics['eval_seconds'] / train:.3f} x the job's training time",
              f"score_seconds={score:.1f} train_seconds={train:.1f} score_over_train={score / train:.3f} "
              f"eval_seconds={metrics['eval_seconds']:.1f}"]
    text = "\n".join(lines) + "\n"
    atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main()
