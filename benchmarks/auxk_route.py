"""What the AuxK term costs per training step, by the route that computes it, as dead latents grow.

TopK-family SAEs reconstruct the residual from the ``aux_k`` largest pre-activations among dead latents
(``saes/topk.py``). Two routes compute the same function: the sparse kernels over ``B x min(aux_k,
n_dead)`` entries, or dense products over the dead latents' columns only (``B x n_dead x d_in``). The
SAE takes the sparse route only when the kept entries are at most ``SPARSE_MAX_DENSITY`` of the dead
latents, the rule that picks the main path. This script times our full training step
(``sae_lightning.step.train_step``, as the trainer runs it) with ``n_dead`` latents held dead, under that
rule ("auto") and with the sparse route forced ("sparse", what every step did before the rule; done by
setting the module's ``SPARSE_MAX_DENSITY`` to 1 after the SAE is built, which leaves the main path as
built). Routes are timed in turns within each repetition; medians are reported, with the step time with
nothing dead as the floor. Ends with one ``key=value`` line: each row's sparse/auto time ratio.

Run: ``python benchmarks/auxk_route.py`` (about two minutes on 2 cores); ``--help`` for sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import sae_lightning.saes.topk as topk_module
from sae_lightning.config import LatentsConfig
from sae_lightning.step import LatentStats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import heavy_tailed, ours_trainer, preset

DEFAULT_DENSITY = topk_module.SPARSE_MAX_DENSITY


def time_step(arch: str, args: argparse.Namespace, n_dead: int, x: torch.Tensor) -> dict[str, float]:
    """Median seconds per step of ``arch`` with ``n_dead`` latents dead, by route."""
    stats = LatentStats(args.d_sae, LatentsConfig().dead_window_tokens)
    _, step = ours_trainer(preset(arch, d_sae=args.d_sae, k=args.k), args.d_in, coeff=0.0, stats=stats)
    dead = torch.randperm(args.d_sae, generator=torch.Generator().manual_seed(0))[:n_dead]
    times: dict[str, list[float]] = {"auto": [], "sparse": []}
    for rep in range(args.reps + 1):
        for route, density in (("auto", DEFAULT_DENSITY), ("sparse", 1.0)):
            topk_module.SPARSE_MAX_DENSITY = density
            stats.tokens_since_fired.zero_()[dead] = stats.dead_window_tokens
            start = time.perf_counter()
            step(x)
            if rep:  # the first turn warms up
                times[route].append(time.perf_counter() - start)
    topk_module.SPARSE_MAX_DENSITY = DEFAULT_DENSITY
    return {route: statistics.median(t) for route, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["topk", "batchtopk"])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=1536)
    p.add_argument("--d-sae", type=int, default=3072, help="the quality benchmark's size")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--dead", type=int, nargs="+", default=[0, 64, 256, 1024, 3072])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = heavy_tailed(args.batch, args.d_in)
    print(f"batch {args.batch}, d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, aux_k from the preset, "
          f"median of {args.reps} steps, threads {args.threads}")
    print(f"{'arch':<12}{'dead':>6}{'auto s/step':>13}{'sparse s/step':>15}{'sparse/auto':>13}")
    headline = []
    for arch in args.archs:
        for n_dead in args.dead:
            t = time_step(arch, args, min(n_dead, args.d_sae), x)
            ratio = t["sparse"] / t["auto"]
            print(f"{arch:<12}{n_dead:>6}{t['auto']:>13.3f}{t['sparse']:>15.3f}{ratio:>13.2f}", flush=True)
            headline.append(f"{arch}_dead{n_dead}_sparse_over_auto={ratio:.2f}")
    print(" ".join(headline))


if __name__ == "__main__":
    main()
