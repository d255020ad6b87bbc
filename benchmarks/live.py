"""Live activations (``activations=live``): pipeline throughput, and quality against the cache.

    python -m benchmarks.live throughput [--tokens 131072 --reps 3]
    python -m benchmarks.live quality [--seeds 0 1 2 --buffers 16384 65536 262144]

Both run the offline default (SmolLM2-135M from PyPI, layer 6 ``mlp_post``, d_in 1536, the TinyStories
sample), relu with d_sae 3072, through ``python train.py`` as users type it.

``throughput``, in one run:
- ``t_lm``: seconds per row of the live stream's own window computation alone (``Windows.next``: the
  truncated forward in ``data.lm_batch_size`` chunks, row selection, the copy into the window), median of
  5 windows of ``--probe-rows`` rows;
- ``t_sae``: seconds per row of ``step.train_step`` (what the trainer calls) on real rows of that window,
  median of ``--reps-step`` steps;
- whole ``train.py activations=live`` runs, with ``activations.prefetch`` on and off in turns, ``--reps``
  each: training tokens/s over ``fit`` (its ``train_seconds``, validation and checkpoints included) and
  over the whole process. The one-device bound is ``1 / (t_lm + t_sae)``.

``quality``: SAEs trained on the same tokens from the cache and live: a cache of ``--n-tokens`` text tokens
holds at least ``--tokens`` training rows, and the live run trains on the same contexts first (it holds out
the same contexts a cache of that config does). Every SAE is scored on the same held-out rows (the live
run's evaluation contexts, inside the cache's evaluation shards), normalized MSE and L0, per seed and per
``activations.buffer_tokens``.

Results: ``benchmarks/results/live_throughput_cpu.txt``, ``benchmarks/results/live_quality_cpu.txt``
(``--out`` to change), each written whole under the results header.
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

from benchmarks.common import REPO, RESULTS, compose, header, invocation, med_range, ours_trainer, preset

COMMON = ["experiment=quickstart", "sae=relu", "logger=csv", "trainer.progress_bar=false"]


def train(overrides: list[str], run_dir: Path) -> dict:
    """One ``python train.py`` process; its summary plus the process's wall seconds."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(REPO / "train.py"), *overrides, f"hydra.run.dir={run_dir}"],
                         cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {**summary, "wall_seconds": wall}


def throughput(args: argparse.Namespace) -> str:
    from sae_lightning.live import LiveDataModule
    from sae_lightning.live.stream import Windows

    over = [*COMMON, "activations=live", f"sae.d_sae={args.d_sae}", f"batch_size={args.batch}",
            f"train_tokens={args.tokens}", f"activations.buffer_tokens={args.buffer}"]
    dm = LiveDataModule(compose(over)[0])
    windows = Windows(iter(list(_contexts(dm, 6 * args.probe_rows))), dm._forward, [dm.d_in],
                      args.probe_rows, dm.cfg.data.lm_batch_size, dm.lm.device)
    lm_times, rows = [], None
    for _ in range(6):   # the first one warms up
        t0 = time.perf_counter()
        rows = windows.next()[0]
        lm_times.append((time.perf_counter() - t0) / len(rows))
    t_lm = statistics.median(lm_times[1:])
    sae, step = ours_trainer(preset("relu", d_sae=args.d_sae), dm.d_in, coeff=3.0, lr=1e-3)
    sae.set_input_scale(dm.norm_scale)
    batch = rows[: args.batch]
    step(batch)
    step_times = []
    for _ in range(args.reps_step):
        t0 = time.perf_counter()
        step(batch)
        step_times.append((time.perf_counter() - t0) / args.batch)
    t_sae = statistics.median(step_times)
    del dm, windows, rows
    bound = 1 / (t_lm + t_sae)

    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="bench_live_") as tmp:
        for rep in range(args.reps):
            for prefetch in (True, False):
                run = Path(tmp) / f"{prefetch}-{rep}"
                runs[prefetch].append(train([*over, f"activations.prefetch={str(prefetch).lower()}"], run))
    lines = [f"live throughput: SmolLM2-135M layer 6 mlp_post (d_in 1536), relu d_sae {args.d_sae}, batch "
             f"{args.batch}, {args.tokens} training tokens, buffer_tokens {args.buffer}, context 128",
             f"t_lm  (window computation alone)  {t_lm * 1e6:8.1f} us/token = {1 / t_lm:7.0f} tokens/s "
             f"[{1 / max(lm_times[1:]):.0f}-{1 / min(lm_times[1:]):.0f}]",
             f"t_sae (train_step alone)          {t_sae * 1e6:8.1f} us/token = {1 / t_sae:7.0f} tokens/s "
             f"[{1 / max(step_times):.0f}-{1 / min(step_times):.0f}]",
             f"one-device bound 1/(t_lm + t_sae)                  = {bound:7.0f} tokens/s", "",
             f"{'train.py activations=live':30s} {'fit tokens/s':>22s} {'process tokens/s':>22s} "
             f"{'fit / bound':>12s}"]
    fit = {}
    for prefetch, rs in runs.items():
        fit[prefetch] = [r["tokens"] / r["train_seconds"] for r in rs]
        whole = [r["tokens"] / r["wall_seconds"] for r in rs]
        lines.append(f"{f'prefetch={str(prefetch).lower()}':30s} {med_range(fit[prefetch], '.0f'):>22s} "
                     f"{med_range(whole, '.0f'):>22s} {statistics.median(fit[prefetch]) / bound:12.3f}")
    gain = statistics.median(fit[True]) / statistics.median(fit[False])
    lines += ["", f"medians [min-max] of {args.reps} runs each, prefetch on and off in turns",
              f"live_tok_s={statistics.median(fit[True]):.0f} bound_tok_s={bound:.0f} "
              f"efficiency={statistics.median(fit[True]) / bound:.3f} prefetch_gain={gain:.3f} "
              f"t_lm_us={t_lm * 1e6:.1f} t_sae_us={t_sae * 1e6:.1f}"]
    return "\n".join(lines)


def _contexts(dm, rows: int):
    """Training contexts holding at least ``rows`` rows (probe windows are cut from them)."""
    from sae_lightning.live.contexts import training_contexts

    total = 0
    for c in training_contexts(dm.text, dm.split, 0, 1, repeat=False):
        yield c
        total += c.rows
        if total >= rows:
            return


def held_out_nmse(run_dir: Path, dm, max_tokens: int) -> dict:
    """Normalized MSE and L0 of a run's SAE on the live run's evaluation rows."""
    from sae_lightning.evaluate.pipeline import evaluate_rows
    from sae_lightning.saes import SAE

    sae = SAE.load(run_dir / "sae")
    metrics = evaluate_rows(dm.eval_rows(max_tokens), sae, neurons=False).metrics
    return {"nmse": metrics["nmse"], "l0": metrics["l0"], "n_tokens": metrics["n_tokens"]}


def quality(args: argparse.Namespace) -> str:
    from sae_lightning.live import LiveDataModule

    base = [*COMMON, f"sae.d_sae={args.d_sae}", f"batch_size={args.batch}", f"train_tokens={args.tokens}",
            f"data.n_tokens={args.n_tokens}", "activations.shard_rows=4096"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_live_q_") as tmp:
        cache = [f"activations.cache_dir={Path(tmp) / 'cache'}"]
        dm = LiveDataModule(compose([*base, "activations=live"])[0])
        runs = [("cache", None, s) for s in args.seeds]
        runs += [("live", b, s) for b in args.buffers
                 for s in (args.seeds if b == args.buffer else args.seeds[:1])]
        for source, buffer, seed in runs:
            # validation rows are kept in memory beside the buffer: at most one buffer of them
            live = ["activations=live", f"activations.buffer_tokens={buffer}",
                    f"trainer.limit_val_batches={max(1, min(20, (buffer or 0) // args.batch))}"]
            over = [*base, f"seed={seed}"] + (cache if source == "cache" else live)
            run = Path(tmp) / f"{source}-{buffer}-{seed}"
            summary = train(over, run)
            row = {"source": source, "buffer_tokens": buffer, "seed": seed,
                   "tokens": summary["tokens"], **held_out_nmse(run, dm, args.eval_tokens)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [f"quality, cache vs live: SmolLM2-135M layer 6 mlp_post, relu d_sae {args.d_sae} (quickstart's "
             f"l1 and lr), batch {args.batch}, {args.tokens} training tokens from the same text "
             f"(data.n_tokens {args.n_tokens}), scored on the same {rows[0]['n_tokens']} held-out rows",
             f"{'source':8s} {'buffer_tokens':>13s} {'seed':>4s} {'nmse':>8s} {'L0':>7s}"]
    lines += [f"{r['source']:8s} {r['buffer_tokens'] or '-'!s:>13s} {r['seed']:4d} {r['nmse']:8.4f} "
              f"{r['l0']:7.2f}" for r in rows]

    def group(source: str, buffer: int | None) -> list[float]:
        return [r["nmse"] for r in rows if r["source"] == source and r["buffer_tokens"] == buffer]

    cache_nmse, live_nmse = group("cache", None), group("live", args.buffer)
    lines += ["", f"{'':22s} {'median nmse':>11s} {'seed spread':>11s}"]
    for name, values in (("cache", cache_nmse), (f"live buffer {args.buffer}", live_nmse)):
        lines.append(f"{name:22s} {statistics.median(values):11.4f} {max(values) - min(values):11.4f}")
    gap = statistics.median(live_nmse) - statistics.median(cache_nmse)
    band = max(max(cache_nmse) - min(cache_nmse), max(live_nmse) - min(live_nmse))
    lines += ["", f"live_minus_cache_nmse={gap:.4f} seed_spread={band:.4f} "
              f"within_spread={abs(gap) <= band} "
              + " ".join(f"nmse_buffer_{b}={statistics.median(group('live', b)):.4f}" for b in args.buffers)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["throughput", "quality"])
    p.add_argument("--d-sae", type=int, default=3072)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, help="training tokens per run (throughput 131072, quality 327680)")
    p.add_argument("--buffer", type=int, default=262_144, help="activations.buffer_tokens (the preset's)")
    p.add_argument("--reps", type=int, default=3, help="train.py runs per setting (throughput)")
    p.add_argument("--reps-step", type=int, default=10, help="timed SAE steps (throughput)")
    p.add_argument("--probe-rows", type=int, default=8192, help="rows per timed window (throughput)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="quality")
    p.add_argument("--buffers", type=int, nargs="+", default=[16_384, 65_536, 262_144], help="quality")
    p.add_argument("--n-tokens", type=int, default=390_000, help="text tokens of the cache (quality)")
    p.add_argument("--eval-tokens", type=int, default=20_000, help="held-out rows scored (quality)")
    p.add_argument("--out", type=Path, help="results file (default benchmarks/results/live_<part>_cpu.txt)")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (131_072 if args.part == "throughput" else 327_680)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sae_lightning.io import atomic_write_text

    head = header(invocation(__spec__.name, argv))
    body = throughput(args) if args.part == "throughput" else quality(args)
    text = head + "\n" + body + "\n"
    out = args.out or RESULTS / f"live_{args.part}_cpu.txt"
    atomic_write_text(out, text)
    print(text)


if __name__ == "__main__":
    main()
