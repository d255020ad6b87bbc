"""Training-step throughput of our SAEs against SAELens, same data, same process, interleaved.

A full step is timed for each library as its own trainer runs it:
- ours: ``sae_lightning.step.train_step``, the very function ``SAEModule`` calls each step (normalize,
  forward with a dead mask, NaN guard, backward, decoder-gradient projection, gradient clipping at the
  trainer's default ``optim.grad_clip``, Adam, renormalisation, fire tracking);
- SAELens (its ``SAETrainer._train_step``): ``training_forward_pass``, fire tracking, backward,
  ``clip_grad_norm_(1.0)``, Adam.
Both use ``torch.optim.Adam`` with defaults. SAELens's TopK is timed with its defaults and with
``use_sparse_activations=True``; the latter needs ``rescale_acts_by_decoder_norm=False`` (with the
default ``True`` its backward fails: "Could not run 'aten::view' with arguments from the 'SparseCPU'
backend", sae-lens 6.54.12, torch 2.13), and the faster of the two is the reference. Contenders are
timed in turns within each repetition, so other load on the machine hits them alike; the medians over
repetitions are reported, together with the fp32 matmul rate of the step's own GEMM shapes, measured in
the same turns. A step's FLOP/s counts the GEMM FLOPs it executes (ours 10 B d_in d_sae: it skips the
input-gradient GEMM; SAELens 12 B d_in d_sae), and the headline divides ours by that GEMM rate.

Data: random activations of SmolLM2 layer-6 MLP post-activation shape (d_in = 1536) with a heavy-tailed
distribution (Student-t with 3 degrees of freedom, per-dimension log-normal scales), fine for
throughput, which does not depend on the values (for TopK the chosen indices spread over the latents).

Run: ``python benchmarks/train_step.py`` (a few minutes on 2 cores); ``--help`` for sizes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled
from sae_lightning.config import LatentsConfig, OptimConfig
from sae_lightning.saes import SAEConfig, build_sae, config_from_dict
from sae_lightning.step import LatentStats, train_step

Step = Callable[..., None]
# SAELens's faster TopK mode; its backward needs the decoder-norm rescaling off (module docstring)
SAELENS_SPARSE = {"use_sparse_activations": True, "rescale_acts_by_decoder_norm": False}


def heavy_tailed(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Student-t(3) entries times per-dimension log-normal scales (a few dimensions dominate the norm)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0).sample((n, d))
    scale = torch.exp(torch.randn(d, generator=g))
    return (t * scale).float()


def ours_trainer(cfg: SAEConfig, d_in: int, coeff: float, lr: float = 1e-4,
                 dead_window_tokens: int | None = None) -> tuple[torch.nn.Module, Step]:
    """Our SAE and ``step.train_step`` with the trainer's defaults (gradient clipping, dead window)."""
    sae = build_sae(cfg, d_in)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    stats = LatentStats(sae.d_sae, dead_window_tokens or LatentsConfig().dead_window_tokens)
    grad_clip = OptimConfig().grad_clip

    def step(x: torch.Tensor) -> None:
        train_step(sae, opt, x, stats, coeff=coeff, grad_clip=grad_clip, step=0)

    return sae, step


def saelens_trainer(arch: str, d_in: int, d_sae: int, coeff: float, lr: float = 1e-4,
                    dead_window_steps: int = 10**9, **kw: object) -> tuple[torch.nn.Module, Step]:
    """SAELens's SAE (``standard`` or ``topk``) and its step as ``SAETrainer._train_step`` runs it."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu"}
    if arch == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=coeff, **common, **kw))
        coefficients = {"l1": coeff}
    else:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(**common, **kw))
        coefficients = {}
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    since_fired = torch.zeros(d_sae)  # in steps, as SAETrainer counts

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x, dead_neuron_mask=since_fired > dead_window_steps, coefficients=coefficients,
            n_training_steps=0, is_logging_step=False))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            if did_fire.is_sparse:
                did_fire = did_fire.to_dense()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return sae, step


def on(x: torch.Tensor, trainer: tuple[torch.nn.Module, Step]) -> Step:
    """A trainer's step bound to the fixed batch ``x`` (throughput does not depend on the values)."""
    step = trainer[1]
    return lambda: step(x)


def gemm_steps(batch: int, d_in: int, d_sae: int) -> dict[str, Step]:
    """The step's three GEMM shapes (forward encoder, decoder, weight gradient) as timed contenders."""
    a, w = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    z, wd = torch.randn(batch, d_sae), torch.randn(d_sae, d_in)
    return {"gemm [B,d_in]@[d_in,d_sae]": lambda: a @ w, "gemm [B,d_sae]@[d_sae,d_in]": lambda: z @ wd,
            "gemm [d_in,B]@[B,d_sae]": lambda: a.t() @ z}


def time_in_turns(contenders: dict[str, Step], reps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and process-CPU seconds of each contender over ``reps`` turns (after a warm-up call).

    CPU seconds count what the process itself burnt, so they show less of other load on the machine.
    """
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    for _ in range(reps):
        for name, fn in contenders.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return ({n: statistics.median(ts) for n, ts in wall.items()},
            {n: statistics.median(ts) for n, ts in cpu.items()})


def report(title: str, secs: dict[str, float], cpu: dict[str, float], batch: int,
           flops: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"{'contender':34s} {'s/step':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'cpu s/step':>10s}")
    for name, s in secs.items():
        gf = f"{flops[name] / s / 1e9:8.1f}" if name in flops else f"{'':8s}"
        print(f"{name:34s} {s:8.3f} {batch / s:9.0f} {gf} {cpu[name]:10.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=1536)
    p.add_argument("--relu-d-sae", type=int, default=6144)
    p.add_argument("--topk-d-sae", type=int, default=12288)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # SAELens's sparse COO tensors
    torch.manual_seed(0)
    b, d = args.batch, args.d_in
    x = heavy_tailed(b, d)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}, d_in {d}, fp32")

    s, coeff = args.relu_d_sae, 5.0
    relu_cfg = config_from_dict({"architecture": "relu", "d_sae": s})
    relu = {"ours relu (plain L1)": on(x, ours_trainer(relu_cfg, d, coeff)),
            "saelens standard": on(x, saelens_trainer("standard", d, s, coeff)), **gemm_steps(b, d, s)}
    secs, cpu = time_in_turns(relu, args.reps)
    executed = {"ours relu (plain L1)": 10 * b * d * s, "saelens standard": 12 * b * d * s}
    flops = {n: 2 * b * d * s for n in relu if n.startswith("gemm")} | executed
    report(f"relu, d_sae={s} (GFLOP/s of steps: executed GEMM FLOPs, ours 10, SAELens 12 x B*d_in*d_sae)",
           secs, cpu, b, flops)
    peak = max(flops[n] / secs[n] for n in relu if n.startswith("gemm"))
    relu_ratio = secs["saelens standard"] / secs["ours relu (plain L1)"]
    relu_frac = executed["ours relu (plain L1)"] / secs["ours relu (plain L1)"] / peak
    relu_cpu_ratio = cpu["saelens standard"] / cpu["ours relu (plain L1)"]
    print(f"ours/saelens tokens/s = {relu_ratio:.2f}x (by CPU seconds {relu_cpu_ratio:.2f}x); "
          f"ours executed GEMM FLOP/s = {relu_frac:.2f} of the in-run GEMM rate {peak / 1e9:.0f} GFLOP/s")

    s, k = args.topk_d_sae, args.k
    sparse_cfg = config_from_dict({"architecture": "topk", "d_sae": s, "k": k, "sparse_kernel": "sparse"})
    dense_cfg = config_from_dict({"architecture": "topk", "d_sae": s, "k": k, "sparse_kernel": "dense"})
    topk = {"ours topk sparse": on(x, ours_trainer(sparse_cfg, d, 0.0)),
            "ours topk dense": on(x, ours_trainer(dense_cfg, d, 0.0)),
            "saelens topk": on(x, saelens_trainer("topk", d, s, 0.0, k=k)),
            "saelens topk sparse_acts": on(x, saelens_trainer("topk", d, s, 0.0, k=k, **SAELENS_SPARSE))}
    secs_k, cpu_k = time_in_turns(topk, args.reps)
    report(f"topk, k={k}, d_sae={s}", secs_k, cpu_k, b, {})
    best_saelens = min(secs_k["saelens topk"], secs_k["saelens topk sparse_acts"])
    topk_ratio = best_saelens / secs_k["ours topk sparse"]
    topk_cpu_ratio = min(cpu_k["saelens topk"], cpu_k["saelens topk sparse_acts"]) / cpu_k["ours topk sparse"]
    print(f"ours sparse / best saelens tokens/s = {topk_ratio:.2f}x (by CPU seconds {topk_cpu_ratio:.2f}x)")

    print(f"relu_tok_s={b / secs['ours relu (plain L1)']:.0f} "
          f"saelens_std_tok_s={b / secs['saelens standard']:.0f} "
          f"relu_speedup={relu_ratio:.2f} relu_flops_frac={relu_frac:.2f} peak_gflops={peak / 1e9:.0f} "
          f"topk_tok_s={b / secs_k['ours topk sparse']:.0f} saelens_topk_tok_s={b / best_saelens:.0f} "
          f"topk_speedup={topk_ratio:.2f} "
          f"relu_speedup_cpu={relu_cpu_ratio:.2f} topk_speedup_cpu={topk_cpu_ratio:.2f}")


if __name__ == "__main__":
    main()
