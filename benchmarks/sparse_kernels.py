"""Which kernel a training step should run on CPU: one full ``step.train_step`` per route, timed in turns.

    python -m benchmarks.sparse_kernels penalised [--shares 0.02 0.05 0.1 0.2 --out FILE]
    python -m benchmarks.sparse_kernels batchtopk [--k 16 64 256 1024]
    python -m benchmarks.sparse_kernels auxk      [--dead 0 64 256 1024 3072]

``penalised``: relu, jumprelu and gated, the dense path against the sparse kernels
(``sae.sparse_kernel=dense|sparse``) at a range of held densities. This is what sets the ``auto`` rule of
relu, relu_dn, jumprelu and gated (``sparse_ops.SPARSE_MAX_SHARE``): the share of a batch's [B, d_sae]
entries in play below which the sparse step is the faster one. The density is held as in ``train_step``
(each latent's encoder bias, JumpReLU's threshold, set so that it fires on that share of the batch; every
step starts from those weights again). relu_dn runs relu's kernels (only its penalty's weights differ), so
relu stands for both. Data: ``common.heavy_tailed``.

``batchtopk``: BatchTopK decoding, the dense path against the sparse kernels on rows of any length, per k.
This is what sets the ``auto`` rule of ``sae=batchtopk`` (saes/batchtopk.py). Random Gaussian
activations; the busiest row's count is printed too (the kernels do not pad, so it no longer matters
much). The last line is the sparse path's speed-up.

``auxk``: what the AuxK term costs per step, by the route that computes it, as dead latents grow.
TopK-family SAEs reconstruct the residual from the ``aux_k`` largest pre-activations among dead latents
(``saes/topk.py``). Two routes compute the same function: the sparse kernels over ``B x min(aux_k,
n_dead)`` entries, or dense products over the dead latents' columns only (``B x n_dead x d_in``). The SAE
takes the sparse route only when the kept entries are at most ``SPARSE_MAX_DENSITY`` of the dead latents,
the rule that picks the main path. Timed with ``n_dead`` latents held dead, under that rule ("auto") and
with the sparse route forced ("sparse": the module's ``SPARSE_MAX_DENSITY`` set to 1 after the SAE is
built, which leaves the main path as built); the step with nothing dead is the floor. The last line is
each row's sparse/auto time ratio.

Medians over ``--reps`` repetitions after a warm-up turn. ``--out`` writes the report whole under the
results header.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import (
    PENALISED_COEFF,
    Report,
    add_out_arg,
    heavy_tailed,
    hold_l0,
    measured_l0,
    ours_trainer,
    preset,
    time_in_turns,
)


def penalised(args: argparse.Namespace, say: Report) -> None:
    torch.manual_seed(0)
    x = heavy_tailed(args.batch, args.d_in)
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"d_in {args.d_in}, d_sae {args.d_sae}, fp32, median of {args.reps} reps")
    for arch in args.archs:
        for share in args.shares:
            steps, resets, l0s = {}, {}, {}
            for kernel in ("dense", "sparse"):
                cfg = preset(arch, d_sae=args.d_sae, sparse_kernel=kernel)
                sae, step = ours_trainer(cfg, args.d_in, PENALISED_COEFF)
                resets[kernel] = hold_l0(sae, x, share * args.d_sae)
                steps[kernel] = lambda step=step: step(x)
                l0s[kernel] = measured_l0(sae, x)
            walls, _ = time_in_turns(steps, args.reps, resets)
            ms = {kernel: 1e3 * statistics.median(t) for kernel, t in walls.items()}
            say(f"{arch:9s} share {share:5.3f} (L0 {l0s['sparse']:6.1f})  dense {ms['dense']:7.0f} ms  "
                f"sparse {ms['sparse']:7.0f} ms  sparse speed-up {ms['dense'] / ms['sparse']:.2f}x")


def batchtopk(args: argparse.Namespace, say: Report) -> None:
    from sae_lightning.saes import build_sae, config_from_dict
    from sae_lightning.saes.batchtopk import batch_top
    from sae_lightning.train.step import LatentStats, train_step

    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in)
    say(f"d_in={args.d_in} d_sae={args.d_sae} batch={args.batch} threads={torch.get_num_threads()}")
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
        say(f"k={k:4d} busiest row={busiest:5d}  dense {ms['dense']:8.1f} ms  "
            f"sparse {ms['sparse']:8.1f} ms")
        speedups.append(f"k{k}={ms['dense'] / ms['sparse']:.2f}")
    say("sparse_speedup_over_dense " + " ".join(speedups))


def auxk_step(arch: str, args: argparse.Namespace, n_dead: int, x: torch.Tensor) -> dict[str, float]:
    """Median seconds per step of ``arch`` with ``n_dead`` latents dead, by route."""
    import sae_lightning.saes.topk as topk_module
    from sae_lightning.config import LatentsConfig
    from sae_lightning.train.step import LatentStats

    default_density = topk_module.SPARSE_MAX_DENSITY
    stats = LatentStats(args.d_sae, LatentsConfig().dead_window_tokens)
    _, step = ours_trainer(preset(arch, d_sae=args.d_sae, k=args.k), args.d_in, coeff=0.0, stats=stats)
    dead = torch.randperm(args.d_sae, generator=torch.Generator().manual_seed(0))[:n_dead]
    times: dict[str, list[float]] = {"auto": [], "sparse": []}
    try:
        for rep in range(args.reps + 1):
            for route, density in (("auto", default_density), ("sparse", 1.0)):
                topk_module.SPARSE_MAX_DENSITY = density
                stats.tokens_since_fired.zero_()[dead] = stats.dead_window_tokens
                start = time.perf_counter()
                step(x)
                if rep:  # the first turn warms up
                    times[route].append(time.perf_counter() - start)
    finally:
        topk_module.SPARSE_MAX_DENSITY = default_density
    return {route: statistics.median(t) for route, t in times.items()}


def auxk(args: argparse.Namespace, say: Report) -> None:
    torch.set_num_threads(args.threads)
    x = heavy_tailed(args.batch, args.d_in)
    say(f"batch {args.batch}, d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, aux_k from the preset, "
        f"median of {args.reps} steps, threads {args.threads}")
    say(f"{'arch':<12}{'dead':>6}{'auto s/step':>13}{'sparse s/step':>15}{'sparse/auto':>13}")
    headline = []
    for arch in args.archs:
        for n_dead in args.dead:
            t = auxk_step(arch, args, min(n_dead, args.d_sae), x)
            ratio = t["sparse"] / t["auto"]
            say(f"{arch:<12}{n_dead:>6}{t['auto']:>13.3f}{t['sparse']:>15.3f}{ratio:>13.2f}")
            headline.append(f"{arch}_dead{n_dead}_sparse_over_auto={ratio:.2f}")
    say(" ".join(headline))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    pen = sub.add_parser("penalised", help="relu/jumprelu/gated: dense vs the sparse kernels by held density")
    pen.add_argument("--batch", type=int, default=4096)
    pen.add_argument("--d-in", type=int, default=1536)
    pen.add_argument("--d-sae", type=int, default=6144)
    pen.add_argument("--shares", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    pen.add_argument("--archs", nargs="+", default=["relu", "jumprelu", "gated"])
    pen.add_argument("--reps", type=int, default=3)
    btk = sub.add_parser("batchtopk", help="batchtopk: dense decode vs the sparse kernels, per k")
    btk.add_argument("--d-in", type=int, default=512)
    btk.add_argument("--d-sae", type=int, default=8192)
    btk.add_argument("--batch", type=int, default=1024)
    btk.add_argument("--k", type=int, nargs="+", default=[16, 64, 256, 1024])
    btk.add_argument("--reps", type=int, default=5)
    aux = sub.add_parser("auxk", help="TopK family with n dead latents: AuxK by sparse kernels vs dense")
    aux.add_argument("--archs", nargs="+", default=["topk", "batchtopk"])
    aux.add_argument("--batch", type=int, default=2048)
    aux.add_argument("--d-in", type=int, default=1536)
    aux.add_argument("--d-sae", type=int, default=3072, help="the quality benchmark's size")
    aux.add_argument("--k", type=int, default=32)
    aux.add_argument("--dead", type=int, nargs="+", default=[0, 64, 256, 1024, 3072])
    aux.add_argument("--reps", type=int, default=5)
    aux.add_argument("--threads", type=int, default=2)
    for part in (pen, btk, aux):
        add_out_arg(part)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    say = Report(__spec__.name, argv)
    {"penalised": penalised, "batchtopk": batchtopk, "auxk": auxk}[args.part](args, say)
    say.write(args.out)


if __name__ == "__main__":
    main()
