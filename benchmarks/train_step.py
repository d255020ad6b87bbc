"""Training-step throughput of our SAEs against SAELens, same data, same process, interleaved.

A full step is timed for each library as its own trainer runs it:
- ours: ``sae_lightning.step.train_step``, the very function ``SAEModule`` calls each step (normalize,
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

Run: ``python benchmarks/train_step.py --out benchmarks/results/train_step_cpu.txt`` (some 15 minutes on 2
cores; the file is written whole with ``stamp.py``'s header); ``--help`` for sizes.
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
from omegaconf import OmegaConf
from stamp import header

from sae_lightning.config import LatentsConfig, OptimConfig
from sae_lightning.saes import SAE, SAEConfig, build_sae, config_from_dict
from sae_lightning.saes.matryoshka import default_prefixes
from sae_lightning.sparsity import TargetL0
from sae_lightning.step import LatentStats, train_step, warmup_scale

Step = Callable[..., None]
# SAELens's faster TopK mode; its backward needs the decoder-norm rescaling off (module docstring)
SAELENS_SPARSE = {"use_sparse_activations": True, "rescale_acts_by_decoder_norm": False}


PRESETS = Path(__file__).resolve().parents[1] / "conf" / "sae"


def preset(name: str, **overrides: object) -> SAEConfig:
    """The config that ``sae=<name>`` composes (its schema's defaults, then the preset's values), with
    ``overrides`` (d_sae, k, ...) on top."""
    values = OmegaConf.to_container(OmegaConf.load(PRESETS / f"{name}.yaml"))
    values.pop("defaults", None)
    return config_from_dict({"architecture": name, **values, **overrides})


def heavy_tailed(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Student-t(3) entries times per-dimension log-normal scales (a few dimensions dominate the norm)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.distributions.StudentT(3.0).sample((n, d))
    scale = torch.exp(torch.randn(d, generator=g))
    return (t * scale).float()


def ours_trainer(cfg: SAEConfig, d_in: int, coeff: float, lr: float = 1e-4,
                 dead_window_tokens: int | None = None, sae: SAE | None = None,
                 stats: LatentStats | None = None, l1_warmup_steps: int = 0,
                 clip_scope: str = "group") -> tuple[torch.nn.Module, Step]:
    """Our SAE (``sae``, else built from ``cfg``) and ``step.train_step`` with the trainer's defaults
    (gradient clipping, dead window, the ``sae.target_l0`` controller when ``cfg`` sets one: ``coeff`` is
    then its start); ``stats``: the firing bookkeeping to use, for a caller that sets which latents are
    dead; ``l1_warmup_steps``: ``optim.l1_warmup_steps``, the coefficient's linear warm-up, during which
    the controller waits (as ``SAEModule.training_step``); ``clip_scope``: ``optim.grad_clip_scope``."""
    sae = build_sae(cfg, d_in) if sae is None else sae
    opt = torch.optim.Adam(sae.param_groups(lr))
    if stats is None:
        stats = LatentStats(sae.d_sae, dead_window_tokens or LatentsConfig().dead_window_tokens)
    grad_clip = OptimConfig().grad_clip
    target = getattr(cfg, "target_l0", None)
    steer = TargetL0(target, two_sided=sae.two_sided_target) if target is not None else None

    done = 0  # steps taken

    def step(x: torch.Tensor) -> None:
        nonlocal done
        warm = warmup_scale(done, l1_warmup_steps)
        scale = steer.scale() if steer is not None else 1.0
        out = train_step(sae, opt, x, stats, coeff=coeff * warm * scale, grad_clip=grad_clip,
                         clip_scope=clip_scope, step=done)
        if steer is not None and warm == 1:
            steer.update(out.l0.detach())
        done += 1

    return sae, step


# SAELens architecture -> (module in sae_lens.saes, training SAE class, its coefficient field and key)
SAELENS = {"standard": ("standard_sae", "StandardTrainingSAE", "l1_coefficient", "l1"),
           "topk": ("topk_sae", "TopKTrainingSAE", None, None),
           "batchtopk": ("batchtopk_sae", "BatchTopKTrainingSAE", None, None),
           "matryoshka": ("matryoshka_batchtopk_sae", "MatryoshkaBatchTopKTrainingSAE", None, None),
           "gated": ("gated_sae", "GatedTrainingSAE", "l1_coefficient", "l1"),
           "jumprelu": ("jumprelu_sae", "JumpReLUTrainingSAE", "l0_coefficient", "l0")}


def saelens_trainer(arch: str, d_in: int, d_sae: int, coeff: float, lr: float = 1e-4,
                    dead_window_steps: int = 10**9, **kw: object) -> tuple[torch.nn.Module, Step]:
    """SAELens's training SAE ``arch`` (a key of ``SAELENS``, its defaults plus ``kw``) and its step as
    ``SAETrainer._train_step`` runs it; ``coeff`` is its sparsity coefficient (ignored by TopK-family)."""
    import importlib

    from sae_lens.saes.sae import TrainStepInput

    module, cls, field, key = SAELENS[arch]
    mod = importlib.import_module(f"sae_lens.saes.{module}")
    cfg_kw = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", **kw}
    if field:
        cfg_kw[field] = coeff
    sae = getattr(mod, cls)(getattr(mod, cls + "Config")(**cfg_kw))
    coefficients = {key: coeff} if key else {}
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


@torch.no_grad()
def hold_l0(sae: torch.nn.Module, x: torch.Tensor, l0: float) -> Step:
    """Set the encoder biases of a penalised SAE (ours or SAELens's) so that each latent fires on ``l0 /
    d_sae`` of the rows of ``x`` (JumpReLU: the thresholds, the bias at zero; gated: the gate bias, the
    magnitude path then positive wherever the gate is open); returns what puts these weights back."""
    ours = isinstance(sae, SAE)
    h = sae.pre_acts(sae.normalize(x), bias=0.0) if ours else sae.process_sae_in(x) @ sae.W_enc
    keep = round(x.shape[0] * (1 - l0 / h.shape[1]))  # the rows each latent does not fire on
    cut = h.kthvalue(keep, dim=0).values
    if hasattr(sae, "threshold"):
        sae.threshold.copy_(cut)
        sae.b_enc.zero_()
    else:  # SAELens's gated SAE names its gate bias b_gate, ours b_enc
        (sae.b_gate if hasattr(sae, "b_gate") else sae.b_enc).copy_(-cut)
    held = {name: p.detach().clone() for name, p in sae.named_parameters()}

    def reset() -> None:
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(held[name])

    return reset


@torch.no_grad()
def measured_l0(sae: torch.nn.Module, x: torch.Tensor) -> float:
    """The mean number of active latents per row of ``x`` of ours or SAELens's SAE (training forward)."""
    if isinstance(sae, SAE):
        return float(sae(sae.normalize(x), sparsity_coeff=0.0).l0)
    return float((sae.encode(x) != 0).sum(-1).float().mean())


def gemm_steps(batch: int, d_in: int, d_sae: int) -> dict[str, Step]:
    """The step's three GEMM shapes (forward encoder, decoder, weight gradient) as timed contenders."""
    a, w = torch.randn(batch, d_in), torch.randn(d_in, d_sae)
    z, wd = torch.randn(batch, d_sae), torch.randn(d_sae, d_in)
    return {"gemm [B,d_in]@[d_in,d_sae]": lambda: a @ w, "gemm [B,d_sae]@[d_sae,d_in]": lambda: z @ wd,
            "gemm [d_in,B]@[B,d_sae]": lambda: a.t() @ z}


def time_in_turns(contenders: dict[str, Step], reps: int, prepare: dict[str, Step] | None = None,
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds of each contender in each of ``reps`` turns (after a warm-up call);
    ``prepare[name]``, when given, runs untimed before each of that contender's calls.

    CPU seconds count what the process itself burnt, so they show less of other load on the machine.
    """
    prepare = prepare or {}
    wall: dict[str, list[float]] = {name: [] for name in contenders}
    cpu: dict[str, list[float]] = {name: [] for name in contenders}
    for name, fn in contenders.items():
        prepare.get(name, lambda: None)()
        fn()
    for _ in range(reps):
        for name, fn in contenders.items():
            prepare.get(name, lambda: None)()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


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
COEFF = 5.0  # the L1 / L0 coefficient of the penalised SAEs (their L0 is held: --l0)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=1536)
    p.add_argument("--relu-d-sae", type=int, default=6144, help="d_sae of the penalised SAEs")
    p.add_argument("--topk-d-sae", type=int, default=12288, help="d_sae of the TopK family")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l0", type=float, default=64.0, help="the held L0 of the penalised SAEs")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--out", type=Path, help="also write the report there, whole, under stamp.py's header")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Sparse invariant checks")  # SAELens's sparse COO tensors
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    torch.manual_seed(0)
    b, d = args.batch, args.d_in
    x = heavy_tailed(b, d)
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {b}, d_in {d}, fp32, "
        f"{args.reps} reps")
    figures = []
    for arch in args.archs:
        s, ours, theirs = section(arch, args)
        coeff = 0.0 if arch in K_ARCHS else COEFF
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
    if args.out:
        head = header("python benchmarks/train_step.py " + " ".join(sys.argv[1:]))
        args.out.write_text(head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
