"""Training-step throughput of our SAEs against SAELens, same data, same process, interleaved.

A full step is timed for each library as its own trainer runs it:
- ours: ``sae_lightning.train.step.train_step``, the very function ``SAEModule`` calls each step (normalize,
  forward with a dead mask, NaN guard, backward, decoder-gradient projection, gradient clipping at the
  trainer's default ``optim.grad_clip``, Adam, renormalisation, fire tracking);
- SAELens (its ``SAETrainer._train_step``): ``training_forward_pass``, fire tracking, backward,
  ``clip_grad_norm_(1.0)``, Adam.
Both use ``torch.optim.Adam`` with defaults. One section per architecture that both libraries have, ours
from its preset (``conf/sae/<arch>.yaml``) against SAELens's with its defaults: relu and relu_dn against
``standard``, gated, jumprelu (coefficient 5), and the TopK family (topk, batchtopk, matryoshka, at
``--k``). Ours is timed with its preset's ``sparse_kernel`` (``auto``: for the TopK family the sparse
kernels at these sizes, for the penalised SAEs chosen each step from the batch's L0) and with the dense
kernels; SAELens's TopK family with its defaults and with ``use_sparse_activations=True``; the latter
needs ``rescale_acts_by_decoder_norm=False`` (with the default ``True`` its backward fails: "Could not run
'aten::view' with arguments from the 'SparseCPU' backend", sae-lens 6.54.12, torch 2.13), and the faster
of the two is the reference.

The penalised SAEs run at a held L0 (``--l0``, default 64 of d_sae 6144), the same for both libraries:
each latent's encoder bias (JumpReLU: its threshold, the bias at zero) is set so that it fires on
``l0 / d_sae`` of the batch's rows, and every step starts from those weights again (the reset is outside
the timed call; each optimizer keeps its state), so the sparsity coefficient cannot move L0 during the
timing. The L0 of each contender's last timed step is printed.

Contenders are timed in turns within each repetition, so other load on the machine hits them alike; the
medians over repetitions are reported with the spread (min-max) of ours-to-SAELens ratios taken within
each repetition, together with the fp32 matmul rate of the step's own GEMM shapes, measured in the same
turns. A dense step's FLOP/s counts the GEMM FLOPs it executes (ours 10 B d_in d_sae: it skips the
input-gradient GEMM, gated 16: its gate path decodes too; SAELens 12 B d_in d_sae, gated 26: its gate,
magnitude and auxiliary paths each run an encoder matmul, two of them with backward), compared with that
GEMM rate.

Data: random activations of SmolLM2 layer-6 MLP post-activation shape (d_in = 1536) with a heavy-tailed
distribution (Student-t with 3 degrees of freedom, per-dimension log-normal scales), fine for
throughput, which does not depend on the values (for TopK the chosen indices spread over the latents).

Run: ``python -m benchmarks.train_step --out benchmarks/results/train_step_cpu.txt`` (some 15 minutes on 2
cores; the file is written whole under the results header); ``--help`` for sizes.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable

import torch

from benchmarks.common import (
    PENALISED_COEFF,
    SAELENS_SPARSE,
    Report,
    Step,
    add_out_arg,
    gemm_steps,
    heavy_tailed,
    hold_l0,
    measured_l0,
    ours_trainer,
    preset,
    saelens_trainer,
    time_in_turns,
)
from sae_lightning.saes.matryoshka import default_prefixes


def on(x: torch.Tensor, trainer: tuple[torch.nn.Module, Step]) -> Step:
    """A trainer's step bound to the fixed batch ``x`` (throughput does not depend on the values)."""
    step = trainer[1]
    return lambda: step(x)


def report(say: Callable[[str], None], title: str, secs: dict[str, float], cpu: dict[str, float],
           batch: int, flops: dict[str, float], l0s: dict[str, float]) -> None:
    say(f"\n{title}")
    say(f"{'contender':34s} {'s/step':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'cpu s/step':>10s} {'L0':>7s}")
    for name, s in secs.items():
        gf = f"{flops[name] / s / 1e9:8.1f}" if name in flops else f"{'':8s}"
        l0 = f"{l0s[name]:7.1f}" if name in l0s else ""
        say(f"{name:34s} {s:8.3f} {batch / s:9.0f} {gf} {cpu[name]:10.3f} {l0}".rstrip())


def section(arch: str, args: argparse.Namespace) -> tuple[int, dict[str, dict], dict[str, dict]]:
    """(d_sae, our contenders, SAELens's) of one architecture: name -> config overrides / SAELens kwargs.
    Ours run their preset (``conf/sae/<arch>.yaml``); the first of ours is the preset's ``sparse_kernel``
    (``auto``), the second the dense kernels."""
    if arch not in K_ARCHS:
        theirs = {"relu": "standard", "relu_dn": "standard"}.get(arch, arch)
        ours = {f"ours {arch}": {}, f"ours {arch} dense": {"sparse_kernel": "dense"}}
        return args.relu_d_sae, ours, {f"saelens {theirs}": {}}
    k = {"k": args.k}
    extra = {"matryoshka_widths": default_prefixes(args.topk_d_sae)} if arch == "matryoshka" else {}
    ours = {f"ours {arch} {kernel}": k | {"sparse_kernel": kernel} for kernel in ("sparse", "dense")}
    theirs = {f"saelens {arch}": k | extra, f"saelens {arch} sparse_acts": k | extra | SAELENS_SPARSE}
    return args.topk_d_sae, ours, theirs


K_ARCHS = ("topk", "batchtopk", "matryoshka")
ARCHS = ("relu", "relu_dn", "gated", "jumprelu", *K_ARCHS)
# GEMM FLOPs of a dense step in units of B d_in d_sae (module docstring)
DENSE_FLOPS = {"ours": 10, "ours gated": 16, "saelens": 12, "saelens gated": 26}


def dense_flops(name: str, arch: str) -> int | None:
    """The dense step's GEMM FLOPs of contender ``name`` (B d_in d_sae units); None when it is not dense."""
    if arch in K_ARCHS or (name.startswith("ours") and not name.endswith("dense")):
        return None
    lib = name.split()[0]
    return DENSE_FLOPS.get(f"{lib} {arch}", DENSE_FLOPS[lib])


def spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f}x (per-rep {min(ratios):.2f}-{max(ratios):.2f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=1536)
    p.add_argument("--relu-d-sae", type=int, default=6144, help="d_sae of the penalised SAEs")
    p.add_argument("--topk-d-sae", type=int, default=12288, help="d_sae of the TopK family")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l0", type=float, default=64.0, help="the held L0 of the penalised SAEs")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    add_out_arg(p)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # SAELens's sparse COO tensors
    say = Report(__spec__.name, argv)
    torch.manual_seed(0)
    b, d = args.batch, args.d_in
    x = heavy_tailed(b, d)
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}, d_in {d}, fp32, "
        f"{args.reps} reps")
    figures = []
    for arch in args.archs:
        s, ours, theirs = section(arch, args)
        coeff = 0.0 if arch in K_ARCHS else PENALISED_COEFF
        saes: dict[str, torch.nn.Module] = {}
        contenders: dict[str, Step] = {}
        for name, kw in ours.items():
            saes[name], step = ours_trainer(preset(arch, d_sae=s, **kw), d, coeff)
            contenders[name] = on(x, (saes[name], step))
        for name, kw in theirs.items():
            saes[name], step = saelens_trainer(name.split()[1], d, s, coeff, **kw)
            contenders[name] = on(x, (saes[name], step))
        held = {} if arch in K_ARCHS else {name: hold_l0(sae, x, args.l0) for name, sae in saes.items()}
        contenders |= gemm_steps(b, d, s)
        walls, cpus = time_in_turns(contenders, args.reps, held)
        l0s = {}
        for name, reset in held.items():
            reset()  # the weights every timed step started from
            l0s[name] = measured_l0(saes[name], x)
        secs = {n: statistics.median(ts) for n, ts in walls.items()}
        cpu = {n: statistics.median(ts) for n, ts in cpus.items()}
        flops = {n: 2 * b * d * s for n in contenders if n.startswith("gemm")}
        flops |= {n: units * b * d * s for n in saes if (units := dense_flops(n, arch))}
        k_note = f", k={args.k}" if arch in K_ARCHS else f", L0 held at {args.l0:g}"
        report(say, f"{arch}, d_sae={s}{k_note}", secs, cpu, b, flops, l0s)
        peak = max(flops[n] / secs[n] for n in contenders if n.startswith("gemm"))
        mine, dense = ours
        best = min(theirs, key=secs.__getitem__)
        ratio = [t / m for t, m in zip(walls[best], walls[mine], strict=True)]
        cpu_ratio = [t / m for t, m in zip(cpus[best], cpus[mine], strict=True)]
        dense_ratio = [t / m for t, m in zip(walls[best], walls[dense], strict=True)]
        say(f"{mine} / {best} (the faster SAELens) tokens/s = {spread(ratio)}, by CPU seconds "
            f"{spread(cpu_ratio)}; {dense} / {best} = {spread(dense_ratio)}")
        if dense in flops:
            say(f"{dense}: executed GEMM FLOP/s = {flops[dense] / secs[dense] / peak:.2f} of the in-run GEMM "
                f"rate {peak / 1e9:.0f} GFLOP/s")
        figures.append(f"{arch}_speedup={statistics.median(ratio):.2f}")
    say(" ".join(figures))
    say.write(args.out)


if __name__ == "__main__":
    main()
