"""BatchTopK decoding on CPU: the dense path against the sparse kernels on rows of any length
(``sae.sparse_kernel=dense|sparse``), one full ``train_step`` each, timed in turns.

This is what sets the ``auto`` rule of ``sae=batchtopk`` (saes/batchtopk.py). Random Gaussian
activations; the busiest row's count is printed too (the kernels do not pad, so it no longer matters
much). Prints the median milliseconds per step per k; the last line is the sparse path's speed-up.

Run: ``python benchmarks/batchtopk_kernels.py`` (a few minutes on 2 cores); ``--help`` for sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled
from sae_lightning.saes import build_sae, config_from_dict
from sae_lightning.saes.batchtopk import batch_top
from sae_lightning.step import LatentStats, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--k", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    print(f"d_in={args.d_in} d_sae={args.d_sae} batch={args.batch} threads={torch.get_num_threads()}")
    speedups = []
    for k in args.k:
        saes, opts = {}, {}
        for kernel in ("dense", "sparse"):
            torch.manual_seed(0)
            cfg = {"architecture": "batchtopk", "d_sae": args.d_sae, "k": k, "sparse_kernel": kernel}
            saes[kernel] = build_sae(config_from_dict(cfg), args.d_in)
            opts[kernel] = torch.optim.Adam(saes[kernel].parameters())
        stats = LatentStats(args.d_sae, 10**9)
        times: dict[str, list[float]] = {kernel: [] for kernel in saes}
        for rep in range(args.reps + 1):
            for kernel, sae in saes.items():
                t0 = time.perf_counter()
                train_step(sae, opts[kernel], x, stats, coeff=0.0, grad_clip=1.0, step=rep)
                if rep:  # the first turn warms up
                    times[kernel].append(time.perf_counter() - t0)
        with torch.no_grad():
            flat, values = batch_top(saes["dense"].pre_acts(x), k)
            busiest = int(torch.bincount(flat[values > 0] // args.d_sae, minlength=args.batch).max())
        ms = {kernel: 1e3 * statistics.median(t) for kernel, t in times.items()}
        print(f"k={k:4d} busiest row={busiest:5d}  dense {ms['dense']:8.1f} ms  "
              f"sparse {ms['sparse']:8.1f} ms")
        speedups.append(f"k{k}={ms['dense'] / ms['sparse']:.2f}")
    print("sparse_speedup_over_dense " + " ".join(speedups))


if __name__ == "__main__":
    main()
