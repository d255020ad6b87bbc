"""Peak memory of one SAE's training step against the group memory guard's estimate (CPU, RSS).

Each case runs in a fresh Python process (``--measure``): it makes a heavy-tailed batch (the stream's, not
counted), trains a d_sae 128 SAE of the same architecture (the process's one-off cost of its first step,
reported apart as ``first``, against ``FIRST_STEP_BYTES``), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), builds the SAE from its preset (``conf/sae/<arch>.yaml``), its Adam optimizer
and ``LatentStats`` as ``common.ours_trainer`` does, runs ``--steps`` calls of ``step.train_step`` and reports
``VmHWM`` minus the RSS at the mark: the growth that one more SAE of a group costs. ``dead`` cases mark
every latent dead before each step, so AuxK (TopK family) and the pre-activation loss (JumpReLU) run at
their largest.

For each case the report gives the growth, the state the guard counts exactly (4x parameters, buffers,
``LatentStats``), the working set that leaves (growth - state) in float32 words per batch row, and the
guard's estimate (``sae_lightning.group.memory.sae_training_bytes`` + ``CPU_ALLOCATOR_SLACK``, which a
process pays once) with its ratio to the growth: the estimate must be >= the growth, and within about 10 %
of it at these sizes. The group case (``--group``) trains N relu SAEs in turns in one process, as a group
does, against the guard's estimate (every SAE's working set) and against one working set for them all.

Run: ``python -m benchmarks.group_memory --out benchmarks/results/group_memory_cpu.txt`` (some 25 minutes
on 2 shared cores); ``--help`` for sizes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

from benchmarks.common import PENALISED_COEFF, REPO, Report, add_out_arg, module_command
from sae_lightning.group.memory import CPU_ALLOCATOR_SLACK, FIRST_STEP_BYTES

ARCHS = ("relu", "relu_dn", "gated", "jumprelu", "topk", "batchtopk", "matryoshka")
DEAD_MATTERS = ("jumprelu", "topk", "batchtopk", "matryoshka")   # a dead mask changes their step
MIB = 2**20


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure(arch: str, d_in: int, d_sae: int, batch: int, steps: int, dead: int, saes: int = 1) -> dict:
    """Peak-RSS growth of building ``saes`` SAEs and training them in turns (a group: each SAE steps on
    the same batch, one after another) for ``steps`` rounds, in this process; the first ``dead`` latents of
    each are marked dead before every step."""
    import torch

    from benchmarks.common import heavy_tailed, ours_trainer, preset
    from sae_lightning.config import LatentsConfig, TrainConfig
    from sae_lightning.group.memory import sae_training_bytes, working_set_bytes
    from sae_lightning.saes import SAEConfig
    from sae_lightning.train.step import LatentStats

    torch.manual_seed(0)
    x = heavy_tailed(batch, d_in)
    coeff = 0.0 if arch in ("topk", "batchtopk", "matryoshka") else PENALISED_COEFF

    def train(cfg: SAEConfig, rows: torch.Tensor, n: int) -> tuple[list[torch.nn.Module], int]:
        """(the SAEs and their stats, peak-RSS growth) of building ``n`` and running ``steps`` rounds."""
        Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
        start = _status("VmRSS")
        modules, trainers = [], []
        for _ in range(n):
            stats = LatentStats(cfg.d_sae, LatentsConfig().dead_window_tokens)
            sae, step = ours_trainer(cfg, d_in, coeff, stats=stats)
            modules += [sae, stats]
            trainers.append((stats, step))
        for _ in range(steps):
            for stats, step in trainers:
                stats.tokens_since_fired[:dead] = 10**15
                step(rows)
        return modules, _status("VmHWM") - start

    # the process's first step loads code and per-thread buffers once, whatever the size: a group pays it
    # once, so it is measured apart, on a small SAE of the same architecture
    first_use = train(preset(arch, d_sae=128), x[:256], 1)[1]
    cfg = preset(arch, d_sae=d_sae)
    modules, growth = train(cfg, x, saes)
    state = (4 * sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
             + sum(b.numel() * b.element_size() for m in modules for b in m.buffers()))
    one = sae_training_bytes(TrainConfig(sae=cfg, batch_size=batch), d_in)
    work = working_set_bytes(arch, batch, d_in, d_sae)
    return {"arch": arch, "d_in": d_in, "d_sae": d_sae, "batch": batch, "dead": dead, "saes": saes,
            "growth": growth, "state": state,
            "estimate": CPU_ALLOCATOR_SLACK + one * saes,
            "one_working_set": CPU_ALLOCATOR_SLACK + (one - work) * saes + work, "first_use": first_use}


def run_case(arch: str, d_in: int, d_sae: int, batch: int, steps: int, dead: int, saes: int = 1) -> dict:
    """:func:`measure` in a fresh interpreter (the peak of one case must not include another's)."""
    sizes = {"--d-in": d_in, "--d-sae": d_sae, "--batch": batch, "--steps": steps, "--saes": saes,
             "--dead": dead}
    cmd = module_command("group_memory", "--measure", arch, *(str(x) for kv in sizes.items() for x in kv))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--d-in", type=int, default=1536)
    p.add_argument("--d-sae", type=int, nargs="+", default=[3072, 12288])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--group", type=int, default=8, help="SAEs of the group case (relu, the first --d-sae)")
    add_out_arg(p)
    p.add_argument("--measure", choices=ARCHS, help=argparse.SUPPRESS)   # one case, in this process
    p.add_argument("--dead", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--saes", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.d_in, args.d_sae[0], args.batch, args.steps, args.dead,
                                 args.saes)))
        return
    say = Report(__spec__.name, argv)

    def row(r: dict) -> float:
        words = (r["growth"] - r["state"]) / 4 / args.batch
        ratio = r["estimate"] / r["growth"]
        name = r["arch"] if r["saes"] == 1 else f"{r['saes']} x {r['arch']}"
        say(f"{name:11s} {r['d_sae']:6d} {'dead' if r['dead'] else 'fresh':>6s} {r['first_use'] / MIB:6.0f} "
            f"{r['growth'] / MIB:8.0f} {r['state'] / MIB:8.0f} {words:9.0f} {r['estimate'] / MIB:9.0f} "
            f"{ratio:10.3f}")
        return ratio

    say(f"d_in {args.d_in}, batch {args.batch}, {args.steps} train_step calls per SAE, a fresh process per "
        "row; MiB")
    say("first: the process's first step (a d_sae 128 SAE), apart; growth: peak RSS growth of building and "
        "training; state: 4 x parameters + buffers + LatentStats; work/row: (growth - state) / 4 / batch")
    say(f"{'arch':11s} {'d_sae':>6s} {'start':>6s} {'first':>6s} {'growth':>8s} {'state':>8s} "
        f"{'work/row':>9s} {'estimate':>9s} {'est/growth':>10s}")
    ratios, firsts = [], []
    for arch in args.archs:
        for d_sae in args.d_sae:
            for dead in (0, d_sae) if arch in DEAD_MATTERS else (0,):
                r = run_case(arch, args.d_in, d_sae, args.batch, args.steps, dead)
                ratios.append(row(r))
                firsts.append(r["first_use"])
    say(f"estimate / growth: min {min(ratios):.3f}, max {max(ratios):.3f}; first step: at most "
        f"{max(firsts) / MIB:.0f} MiB (FIRST_STEP_BYTES {FIRST_STEP_BYTES / MIB:.0f} MiB)")
    if args.group > 1:
        r = run_case("relu", args.d_in, args.d_sae[0], args.batch, args.steps, 0, args.group)
        say(f"\ngroup: {args.group} relu SAEs stepped in turn in one process; estimate: each SAE's state and "
            "working set, plus the allocator slack once")
        row(r)
        one, growth = r["one_working_set"], r["growth"]
        say(f"one working set for the whole group instead: {one / MIB:.0f} MiB, {one / growth:.3f} x growth")
    say.write(args.out)


if __name__ == "__main__":
    main()
