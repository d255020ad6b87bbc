"""The penalised SAEs' training step on CPU: the dense path against the sparse kernels
(``sae.sparse_kernel=dense|sparse``) at a range of held densities, one full ``train_step`` each, timed in
turns.

This is what sets the ``auto`` rule of relu, relu_dn, jumprelu and gated (``sparse_ops.SPARSE_MAX_SHARE``):
the share of a batch's [B, d_sae] entries in play below which the sparse step is the faster one. The
density is held as in ``train_step.py`` (each latent's encoder bias, JumpReLU's threshold, set so that it
fires on that share of the batch; every step starts from those weights again). relu_dn runs relu's kernels
(only its penalty's weights differ), so relu stands for both. Data: ``train_step.heavy_tailed``.

Run: ``python benchmarks/penalised_kernels.py --out benchmarks/results/penalised_kernels_cpu.txt`` (some 6
minutes on 2 cores); ``--help`` for sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled
from stamp import header
from train_step import COEFF, heavy_tailed, hold_l0, measured_l0, ours_trainer, preset, time_in_turns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=1536)
    p.add_argument("--d-sae", type=int, default=6144)
    p.add_argument("--shares", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    p.add_argument("--archs", nargs="+", default=["relu", "jumprelu", "gated"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, help="also write the report there, whole, under stamp.py's header")
    args = p.parse_args()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    torch.manual_seed(0)
    x = heavy_tailed(args.batch, args.d_in)
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"d_in {args.d_in}, d_sae {args.d_sae}, fp32, median of {args.reps} reps")
    for arch in args.archs:
        for share in args.shares:
            steps, resets, l0s = {}, {}, {}
            for kernel in ("dense", "sparse"):
                cfg = preset(arch, d_sae=args.d_sae, sparse_kernel=kernel)
                sae, step = ours_trainer(cfg, args.d_in, COEFF)
                resets[kernel] = hold_l0(sae, x, share * args.d_sae)
                steps[kernel] = lambda step=step: step(x)
                l0s[kernel] = measured_l0(sae, x)
            walls, _ = time_in_turns(steps, args.reps, resets)
            ms = {kernel: 1e3 * statistics.median(t) for kernel, t in walls.items()}
            say(f"{arch:9s} share {share:5.3f} (L0 {l0s['sparse']:6.1f})  dense {ms['dense']:7.0f} ms  "
                f"sparse {ms['sparse']:7.0f} ms  sparse speed-up {ms['dense'] / ms['sparse']:.2f}x")
    if args.out:
        args.out.write_text(header("python benchmarks/penalised_kernels.py " + " ".join(sys.argv[1:]))
                            + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
