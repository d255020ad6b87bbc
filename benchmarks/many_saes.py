"""Many SAEs from one pass: does a group pay for its stream once? (issue "Many SAEs from one pass").

    python -m benchmarks.many_saes cache [--n 8 --tokens 65536 --reps 2]   # an l1 sweep, grouped
    python -m benchmarks.many_saes live  [--layers 1 2 3 4 5 6 7 8]       # one SAE per layer, one forward

SmolLM2-135M (the offline default), ``mlp_post``, relu with d_sae ``--d-sae``, batch ``--batch``, the
TinyStories sample, everything through ``python train.py`` as users type it:

- ``cache``: ``python train.py -m experiment=quickstart l1=<n values> hydra/launcher=grouped`` (one process
  trains the n SAEs from one read of the cache) against the n runs one by one;
- ``live``: ``python train.py experiment=quickstart activations=live layers=[...]`` (one truncated forward
  reads every layer) against one ``layer=<L>`` run per layer, windows of ``--buffer`` rows.

Every part is measured alone in the same run of this script, on the same machine:

- ``stream``: the group's own datamodule (``group.data.group_datamodule``: the cache's rows, or the LM's
  windows with every hook) iterated for the run's batches with no SAE, seconds from the first request to the
  last batch;
- ``steps``: each member's training step (``step.train_step`` with the trainer's clipping, dead window and
  coefficient, its SAE from its own config) on exactly those batches, summed over the run;
- ``fixed``: one single run's wall time minus its own stream and steps (interpreter, imports, model load,
  data-dependent start, validation, checkpoints, saving), from the single run timed here;
- the group's wall time and peak RSS (``common.run_child``), and the n single runs' wall times
  (``--singles last``: only the one the bound needs, when the ratio against separate runs is not wanted).

The first half of the grouped processes runs first, then the single runs and the parts, then the other half
(after this process has freed its batches), so that a drift in the machine's speed during the run weighs on
both sides of the ratio alike.

The bound the group should meet: ``wall <= 1.1 x (fixed + stream + sum of the members' steps)``. The peak
RSS is reported beside the memory guard's estimate (``group.memory``) and over the bare sum the issue
names: every SAE's parameters, gradients and Adam moments, the stream's buffers and the LM.

Results: ``benchmarks/results/many_saes_<part>_cpu.txt`` (``--out``), written whole under the results
header.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import (
    REPO,
    RESULTS,
    compose,
    header,
    invocation,
    med_range,
    ours_trainer,
    run_child,
)
from sae_lightning import heap
from sae_lightning.io import atomic_write_text

COMMON = ["experiment=quickstart", "sae=relu", "logger=csv", "trainer.progress_bar=false",
          "trainer.limit_val_batches=2"]


def process(args: list[str], cwd: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of ``python train.py <args>``, launch to exit."""
    cmd = [sys.executable, str(REPO / "train.py"), *args]
    code, run, err = run_child(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if code != 0:
        raise SystemExit(f"train.py {' '.join(args)} failed:\n{err[-4000:]}")
    return run.wall, run.rss_gb


def members(configs: list[tuple[str, list[str]]], root: Path) -> list:
    from sae_lightning.group.members import Member

    return [Member(name, root / name, compose(over)[1]) for name, over in configs]


def stream_and_steps(group: list) -> tuple[float, list[float], object]:
    """The group's stream alone, then each member's steps alone on the same batches; and the datamodule.

    Each member's SAE is the one the grouped run trains (``run.build_group_module``: its init seed, its
    hook's scale) from the same data-dependent start (``init_from_rows`` on the stream's sample), so its L0,
    and with it the kernel a step picks, follows the trained run's."""
    from sae_lightning.group.data import as_slots, group_datamodule
    from sae_lightning.group.run import build_group_module
    from sae_lightning.train.step import DATA_INIT_ROWS

    dm, hooks = group_datamodule(group)
    dm.setup("fit")
    module = build_group_module(group, dm, hooks)
    sample = dm.sample_slots(DATA_INIT_ROWS)
    n = group[0].cfg.max_steps
    t0 = time.perf_counter()
    batches = []
    for batch in dm.train_dataloader():
        batches.append(as_slots(batch))
        if len(batches) == n:
            break
    stream = time.perf_counter() - t0
    if hasattr(dm, "teardown"):
        dm.teardown("fit")
    steps = []
    for i, (m, member) in enumerate(zip(group, module.members, strict=True)):
        cfg = m.cfg
        member.init_from_rows(*module._inputs(sample, i))
        slot = module.slots[i][0]
        _, step = ours_trainer(cfg.sae, member.sae.d_in, member.sae.base_coeff(cfg.l1), lr=cfg.lr,
                               sae=member.sae, dead_window_tokens=cfg.latents.dead_window_tokens,
                               l1_warmup_steps=cfg.optim.l1_warmup_steps,
                               clip_scope=cfg.optim.grad_clip_scope)
        t0 = time.perf_counter()
        for rows in batches:
            step(rows[slot])
        steps.append(time.perf_counter() - t0)
    return stream, steps, dm


def memory_parts(group: list, dm) -> tuple[float, str]:
    """The issue's bare sum in GiB (every SAE's parameters, gradients and Adam moments, the stream's buffers,
    the LM) and a line with the memory guard's estimate (which adds each step's working set and the
    process's own overhead) beside it."""
    from sae_lightning.group import memory

    cfg = group[0].cfg
    dims = list(dm.slot_dims)
    states = sum(memory.sae_state_bytes(m.cfg.sae, dims[0]) for m in group)
    per = [memory.sae_training_bytes(m.cfg, dims[0]) for m in group]
    shared = memory.stream_bytes(cfg, dims) + memory.model_bytes(getattr(dm, "lm", None) and dm.lm.model)
    bare = (states + shared) / 2**30
    return bare, (f"the memory guard's estimate {(sum(per) + shared) / 2**30:.2f} GiB (SAEs + optimizer + "
                  f"step {sum(per) / 2**30:.2f}, stream buffers + model {shared / 2**30:.2f}); bare sum "
                  f"{bare:.2f} GiB (SAE states {states / 2**30:.2f} + stream buffers + model)")


def run(args: argparse.Namespace) -> str:
    size = [f"sae.d_sae={args.d_sae}", f"batch_size={args.batch}", f"train_tokens={args.tokens}"]
    if args.part == "cache":
        base = [*COMMON, *size, f"activations.cache_dir={args.cache_dir}"]
        values = [f"{v:g}" for v in args.l1[:args.n]]
        singles = [(f"l1={v}", [*base, f"l1={v}"]) for v in values]
        grouped = ["-m", *base, f"l1={','.join(values)}", "hydra/launcher=grouped"]
        run_dir_key = "hydra.sweep.dir"
    else:
        base = [*COMMON, *size, "activations=live", f"activations.buffer_tokens={args.buffer}"]
        singles = [(f"layer={layer}", [*base, f"layer={layer}"]) for layer in args.layers]
        grouped = [*base, f"layers=[{','.join(map(str, args.layers))}]"]
        run_dir_key = "hydra.run.dir"
    out = []
    last = len(singles) - 1   # the deepest layer (live) or the last coefficient (cache): the bound's run
    timed = range(len(singles)) if args.singles == "all" else [last]
    group_walls, rss = [], []

    def grouped_process(r: int, tmp_path: Path) -> None:
        wall, peak = process([*grouped, f"{run_dir_key}={tmp_path / f'group{r}'}"], tmp_path)
        group_walls.append(wall)
        rss.append(peak)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        # The grouped processes before and after the parts, so that a machine whose speed drifts during the
        # run moves both sides of the ratio alike; the parts' batches (tokens x hooks x d_in floats) are
        # freed before the later processes start, since the group's guard counts this memory as taken.
        first = (args.reps + 1) // 2
        for r in range(first):
            grouped_process(r, tmp_path)
        single_walls = {}
        for i in timed:
            name, over = singles[i]
            wall, _ = process([*over, f"hydra.run.dir={tmp_path / f'single{i}'}"], tmp_path)
            single_walls[i] = wall
            out.append(f"single run {name}: {wall:.1f} s")
        group = members([(name.replace("=", "_"), over) for name, over in singles], tmp_path / "m")
        stream, steps, dm = stream_and_steps(group)
        bare, guard = memory_parts(group, dm)
        del dm
        one_stream, one_steps, _ = stream_and_steps(group[last:])
        fixed = single_walls[last] - one_stream - one_steps[0]
        gc.collect()
        heap.release()
        for r in range(first, args.reps):
            grouped_process(r, tmp_path)
    bound = fixed + stream + sum(steps)
    wall = statistics.median(group_walls)
    lines = [
        f"{args.part}: {len(singles)} SAEs, relu d_sae {args.d_sae}, batch {args.batch}, {args.tokens} "
        f"tokens each ({group[0].cfg.max_steps} steps)",
        *out,
        f"one run's fixed cost (single run {singles[last][0]}: wall {single_walls[last]:.1f} - its stream "
        f"{one_stream:.1f} - its steps {one_steps[0]:.1f}): {fixed:.1f} s",
        f"the group's stream alone: {stream:.1f} s",
        f"each member's steps alone: {', '.join(f'{s:.1f}' for s in steps)} s (sum {sum(steps):.1f})",
        f"bound fixed + stream + steps: {bound:.1f} s",
        f"grouped process, {args.reps} reps: {med_range(group_walls, '.1f')} s wall (median [min-max]); in "
        f"run order: {', '.join(f'{w:.1f} s / {r:.2f} GiB' for w, r in zip(group_walls, rss, strict=True))} "
        f"(wall / peak RSS; the parts were timed after the first {(args.reps + 1) // 2})",
        f"group / bound: {wall / bound:.3f} (target <= 1.1)",
        *([f"{len(singles)} separate runs: {sum(single_walls.values()):.1f} s; speed-up of the group: "
           f"{sum(single_walls.values()) / wall:.2f}x"] if len(single_walls) == len(singles) else
          [f"separate runs: only {singles[last][0]} timed (--singles last)"]),
        f"peak RSS of the grouped process: {med_range(rss, '.1f')} GiB; {guard}",
        f"peak RSS / bare sum: {statistics.median(rss) / bare:.3f} (target <= 1.1)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["cache", "live"])
    p.add_argument("--n", type=int, default=8, help="SAEs in the cache group (the first n of --l1)")
    p.add_argument("--l1", type=float, nargs="+", default=[1, 1.5, 2, 3, 4, 5, 7, 10])
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    p.add_argument("--d-sae", type=int, default=3072)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=65_536, help="training tokens per SAE")
    p.add_argument("--buffer", type=int, default=65_536,
                   help="live: activations.buffer_tokens (8 hooks at the preset's do not fit in 24 GiB)")
    p.add_argument("--reps", type=int, default=2, help="grouped processes timed")
    p.add_argument("--singles", choices=["all", "last"], default="all",
                   help="time every single run (the ratio against separate runs) or only the one the bound "
                        "needs (the deepest layer or the last coefficient)")
    p.add_argument("--cache-dir", default=os.environ.get("SAE_LIGHTNING_CACHE", ".cache/activations"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    text = header(invocation(__spec__.name, argv)) + run(args)
    out = args.out or RESULTS / f"many_saes_{args.part}_cpu.txt"
    atomic_write_text(out, text)
    print(text, end="")


if __name__ == "__main__":
    main()
