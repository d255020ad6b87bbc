"""Whole-run throughput from the activation cache: ``python train.py`` as a process against its own step.

The question: what share of a whole training run (launch to exit) is the training step itself? One run of
this script measures both, on the same machine and in alternation, so a change of load hits both:

- **the step alone**: ``common.ours_trainer`` (``step.train_step`` with the
  trainer's gradient clipping, dead window and coefficient) on the SAE that the runs' overrides compose,
  with the cache's norm scale, fed a fixed batch of real training rows of the cache, each step from the SAE's
  start (``step_timer``); median seconds per
  step over ``--step-reps`` repetitions with their spread (min-max) and process CPU seconds;
- **whole runs**: ``python train.py <overrides>`` as a subprocess, ``--reps`` times: wall seconds from
  launch to exit, tokens/s = train tokens / wall, CPU seconds of the process (``RUSAGE_CHILDREN``), and
  the run's own logged ``tok/s`` (its last value in ``csv/metrics.csv``: steps since the end of the first
  step over the time since then).

The order is step block, run, step block, run, ..., step block. Where a run's time goes is read from its own
log timestamps and ``summary.json`` (no instrumentation in the trainer): launch -> ``Seed set`` (interpreter,
imports, Hydra, config), -> ``GPU available`` (cache open, datamodule, SAE, loggers, trainer), the fit
(``train_seconds``: data-init sample and decoder-bias start, the steps, the data loading, logging,
validation and checkpoints inside the fit), fit end -> ``Run finished`` (final validation, final
checkpoint, SAE folder, summary), -> exit. "steps" in that table is ``max_steps`` x the step's median.

SAELens's whole-process training is not timed here (its trainer would need our cache wrapped as its data
provider); ``python -m benchmarks.train_step`` compares the steps.

Run: ``python -m benchmarks.whole_run`` (needs the quickstart cache: ``python -m sae_lightning.cache build
experiment=quickstart``; ``SAE_LIGHTNING_CACHE`` or ``--cache-dir`` says where it is). ``--help`` for
sizes. The output is also written whole to ``--out``, under the results header.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    REPO,
    RESULTS,
    Report,
    add_out_arg,
    compose,
    gemm_steps,
    med_range,
    ours_trainer,
    time_in_turns,
)

LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^]]*\]\[[A-Z]+\] - (.*)$")
MARKS = {"start": "Seed set to", "trainer": "GPU available", "fit_end": "`Trainer.fit` stopped",
         "finished": "Run finished"}


def gemm_rate(batch: int, d_in: int, d_sae: int) -> float:
    """Best fp32 GFLOP/s of the step's three GEMM shapes (median of 3 calls each)."""
    secs, _ = time_in_turns(gemm_steps(batch, d_in, d_sae), 3)
    return max(2 * batch * d_in * d_sae / statistics.median(s) for s in secs.values()) / 1e9


def step_timer(cfg):
    """(d_in, one call of the trainer's step on a fixed batch of real training rows of the cache, a reset to
    the SAE's start). Every timed step starts from the same weights: trained again and again on one batch,
    the SAE would turn sparse within a few calls and its step would take the sparse kernels, while the
    runs' steps (from the start, on fresh rows) stay on the dense path."""
    import copy

    from sae_lightning.cache.datamodule import ActivationDataModule
    from sae_lightning.saes import build_sae

    dm = ActivationDataModule.from_config(cfg)
    sae = build_sae(cfg.sae, dm.d_in)
    sae.set_input_scale(dm.norm_scale)
    _, step = ours_trainer(cfg.sae, dm.d_in, sae.base_coeff(cfg.l1), lr=cfg.lr, sae=sae,
                           dead_window_tokens=cfg.latents.dead_window_tokens,
                           l1_warmup_steps=cfg.optim.l1_warmup_steps, clip_scope=cfg.optim.grad_clip_scope)
    x = dm.sample(cfg.batch_size, seed=1)
    start = copy.deepcopy(sae.state_dict())
    return dm.d_in, lambda: step(x), lambda: sae.load_state_dict(start)


def time_steps(step, reset, reps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``reps`` calls, each after ``reset()`` (not timed)."""
    wall, cpu = [], []
    for _ in range(reps):
        reset()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def log_marks(path: Path) -> dict[str, float]:
    """Epoch seconds of the first log line holding each of ``MARKS``."""
    found: dict[str, float] = {}
    for line in path.read_text().splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        for name, text in MARKS.items():
            if name not in found and m.group(2).startswith(text):
                stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                found[name] = stamp.timestamp()
    return found


def logged_rate(run_dir: Path) -> float:
    """The run's last logged ``tok/s``."""
    with (run_dir / "csv" / "metrics.csv").open() as f:
        values = [float(r["tok/s"]) for r in csv.DictReader(f) if r.get("tok/s")]
    return values[-1] if values else float("nan")


def whole_run(overrides: list[str], run_dir: Path, env: dict[str, str]) -> dict[str, float]:
    """One ``python train.py`` from launch to exit: wall, CPU, logged tok/s and the parts of its time."""
    cmd = [sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
           "trainer.progress_bar=false"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launch = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    end = launch + wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    marks = log_marks(run_dir / "train.log")
    fit = float(summary["train_seconds"])
    return {"wall": wall, "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "logged": logged_rate(run_dir), "tokens": summary["tokens"], "steps": summary["steps"],
            "startup": marks["start"] - launch, "setup": marks["trainer"] - marks["start"], "fit": fit,
            "after_fit": marks["finished"] - marks["trainer"] - fit, "exit": end - marks["finished"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", default="quickstart")
    p.add_argument("--arch", default="relu")
    p.add_argument("--d-sae", type=int, default=6144)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--train-tokens", type=int, default=299_008)
    p.add_argument("--reps", type=int, default=3, help="whole train.py runs")
    p.add_argument("--step-reps", type=int, default=2, help="step repetitions before and after each run")
    p.add_argument("--cache-dir", default=os.environ.get("SAE_LIGHTNING_CACHE"),
                   help="activation cache root (default: SAE_LIGHTNING_CACHE, else the config's)")
    add_out_arg(p, RESULTS / "whole_run_cpu.txt")
    p.add_argument("overrides", nargs="*", help="more train.py overrides, for the runs and the step alike")
    args = p.parse_args(argv)
    overrides = [f"experiment={args.experiment}", f"sae={args.arch}", f"sae.d_sae={args.d_sae}",
                 f"batch_size={args.batch}", f"train_tokens={args.train_tokens}", "logger=csv",
                 *args.overrides]
    if args.cache_dir:
        overrides.append(f"activations.cache_dir={args.cache_dir}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = Report(__spec__.name, argv)
    cfg = compose(overrides)[0]
    d_in, step, reset = step_timer(cfg)
    tokens_per_step = cfg.batch_size
    rate = gemm_rate(args.batch, d_in, args.d_sae)
    out(f"# {os.cpu_count()} CPUs, fp32 GEMM of the step's shapes {rate:.0f} GFLOP/s, "
        f"load average {os.getloadavg()[0]:.1f}")
    out(f"# train.py {' '.join(overrides)}")
    out(f"# {cfg.max_steps} steps x {tokens_per_step} tokens; SAELens whole-process run: skipped "
        "(module docstring)")
    step()  # warm-up, as time_in_turns does
    walls, cpus, runs = [], [], []
    with tempfile.TemporaryDirectory(prefix="whole_run-") as tmp:
        for i in range(args.reps + 1):
            w, c = time_steps(step, reset, args.step_reps)
            walls += w
            cpus += c
            out(f"step block {i}: {' '.join(f'{s:.2f}' for s in w)} s")
            if i == args.reps:
                break
            r = whole_run(overrides, Path(tmp) / f"run{i}", env)
            runs.append(r)
            out(f"run {i}: wall {r['wall']:.1f} s, {r['tokens'] / r['wall']:.0f} tok/s, cpu {r['cpu']:.1f} "
                f"s, logged {r['logged']:.0f} tok/s, fit {r['fit']:.1f} s, load {os.getloadavg()[0]:.1f}")
    step_s = statistics.median(walls)
    step_rate = tokens_per_step / step_s
    n_steps = runs[0]["steps"]
    out()
    out(f"step alone ({len(walls)} reps): {med_range(walls, '.3f')} s/step, {step_rate:.0f} tok/s, "
        f"cpu {statistics.median(cpus):.3f} s/step")
    whole = [r["tokens"] / r["wall"] for r in runs]
    logged = [r["logged"] for r in runs]
    out(f"whole run ({len(runs)} reps): wall {med_range([r['wall'] for r in runs], '.1f')} s, "
        f"{med_range(whole, '.0f')} tok/s; logged tok/s {med_range(logged, '.0f')}")
    ratio, logged_ratio = statistics.median(whole) / step_rate, statistics.median(logged) / step_rate
    own = statistics.median([w / g for w, g in zip(whole, logged, strict=True)])
    cpu_ratio = statistics.median([n_steps * statistics.median(cpus) / r["cpu"] for r in runs])
    out(f"whole-run / step tokens/s = {ratio:.3f} (by CPU seconds {cpu_ratio:.3f}); logged / step = "
        f"{logged_ratio:.3f}; whole-run / its own logged tok/s = {own:.3f}")
    out()
    out("where a run's time goes (median over runs, seconds; share of the wall)")
    parts = {"start-up: interpreter, imports, Hydra, config": "startup",
             "setup: cache open, datamodule, SAE, loggers, trainer": "setup"}
    rows = {name: statistics.median([r[key] for r in runs]) for name, key in parts.items()}
    fit = statistics.median([r["fit"] for r in runs])
    rows[f"fit: the steps ({n_steps} x step alone)"] = n_steps * step_s
    rows["fit: the rest (data init, data loading, logging, in-fit val/ckpt, loop)"] = fit - n_steps * step_s
    rows["after fit: final validation, final.ckpt, sae/, summary"] = statistics.median(
        [r["after_fit"] for r in runs])
    rows["exit: interpreter shutdown"] = statistics.median([r["exit"] for r in runs])
    wall = statistics.median([r["wall"] for r in runs])
    for name, secs in rows.items():
        out(f"  {name:74s} {secs:7.1f} {secs / wall:6.1%}")
    out(f"  {'sum of parts / median wall':74s} {sum(rows.values()):7.1f} {sum(rows.values()) / wall:6.1%}")
    out()
    out(f"step_tok_s={step_rate:.0f} whole_tok_s={statistics.median(whole):.0f} "
        f"logged_tok_s={statistics.median(logged):.0f} whole_over_step={ratio:.3f} "
        f"whole_over_step_cpu={cpu_ratio:.3f} whole_over_logged={own:.3f}")
    out.write(args.out)


if __name__ == "__main__":
    main()
