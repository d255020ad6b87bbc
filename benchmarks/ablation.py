"""Training choices where our SAEs and SAELens's differ, switched one at a time: which of them matters.

    python -m benchmarks.ablation --acts <cache> --arch gated [--target-l0 60]     # penalised: steered
    python -m benchmarks.ablation --acts <cache> --arch topk [batchtopk matryoshka] --k 64

``quality_vs_saelens`` compares our SAEs with SAELens's. Where they differ, this script trains our
``sae=<arch>`` with each of SAELens's choices in turn (everything else ours) on the same batches, trained
and scored as ``quality_vs_saelens`` trains and scores (``common.train_counting_fires``). Each run also
reports how its latents' held-out firing frequencies spread (``common.frequency_summary``: dead, rare under
1 %, dense over 50 %, 5 / 50 / 95 % quantiles): two runs at one L0 can split it very differently.
``--seeds 0 1 2`` trains each variant once per initialisation seed (the data order stays the same).

Run it on data the quality benchmark does not score (a default chosen here must not be tuned on the
figures that judge it), e.g. layer 3 of the same model.

**Penalised SAEs** (``--arch gated`` or ``jumprelu``). A sparsity coefficient gives each variant a different
L0, so every run is steered to the same L0 (``--target-l0``) by the ``sae.target_l0`` controller
(``sae_lightning/train/sparsity.py``, as the trainer runs it), starting from ``--coeff`` (``l1`` for gated,
``sae.l0_coeff`` for jumprelu); normalized MSE is then compared at (nearly) equal L0. ``--plain`` trains at
the fixed ``--coeff`` with no target instead (SAELens's way); ``--l1-warmup-steps N`` warms the coefficient
up linearly over the first N steps (``optim.l1_warmup_steps``; the controller waits until it is over);
``--clip-scope global`` clips one gradient norm over all parameters (``optim.grad_clip_scope``; SAELens's
trainer). ``--arch jumprelu --variants free_b0 --plain --coeff 12 --clip-scope global`` is SAELens's
JumpReLU recipe in our code. Variants of gated:

- ``paper``: unit-norm decoder rows (``sae.decoder_norm=project``), the auxiliary reconstruction through a
  frozen decoder (``sae.aux_decoder=frozen``), b_dec at the geometric median;
- ``free``: SAELens's free decoder (rows start at norm 0.1, encoder = their transpose, the gate L1 weighted
  by the row norms), aux decoder still frozen;
- ``free_aux``: ``free`` with the auxiliary loss training the decoder too (``sae.aux_decoder=trained``);
- ``unit_aux``: ``paper`` with the auxiliary loss training the decoder;
- ``free_aux_b0``: ``free_aux`` with b_dec at zero (SAELens's start).

Variants of jumprelu (every variant with a unit-norm decoder starts its thresholds at 0.01, SAELens's start,
unless it says otherwise):

- ``paper``: unit-norm decoder rows, b_dec at the geometric median, the thresholds at the base learning rate;
- ``free``: SAELens's free decoder (rows start at norm 0.1, encoder = their transpose);
- ``free_b0``: ``free`` with b_dec at zero (SAELens's start); ``paper_b0``: ``paper`` with b_dec at zero;
- ``thr10``, ``thr30``: ``paper`` with the thresholds learning at 10x / 30x the learning rate
  (``sae.threshold_lr_mult``);
- ``sparse_start``: ``thr10`` with ``sae.init_threshold`` at the preset's default, the sparse start (each
  latent's threshold where it fires on a fixed share of the b_dec sample, ``saes/jumprelu.py``);
- ``sparse_preact``: ``sparse_start`` with Anthropic's pre-activation loss on dead latents at their
  coefficient (``sae.pre_act_coeff=3e-6``);
- ``free10``: ``thr10`` with SAELens's free decoder; ``free10_b0``: ``free10`` with b_dec at zero;
- ``ste``: ``thr10`` with the straight-through gradient passed to the pre-activations too
  (``sae.ste_to_input``, Anthropic's; the L0 term then trains the encoder as well);
- ``tanh``: ``ste`` with Anthropic's tanh penalty (``sae.sparsity_loss=tanh``);
- ``bw02``, ``bw0125``: ``thr10`` with the straight-through kernel 4x wider / narrower (``sae.bandwidth``
  0.2 / 0.0125 against the default 0.05): how hard the reconstruction pulls on the thresholds.

**TopK family** (``--arch topk``, ``batchtopk``, ``matryoshka``), at each ``--k``, with SAELens's own SAE of
the architecture beside them. Every variant but ``b_dec0`` starts b_dec at the geometric median, whatever
the preset's default:

- ``project``: a unit-norm decoder kept by gradient projection + renormalisation, W_enc = W_dec^T at unit
  norm (Gao et al.; ``sae.decoder_norm=project``), AuxK 1/32 over 512 dead latents;
- ``rescale01``: SAELens's decoder parametrisation (``sae.decoder_norm=rescale``): free decoder rows
  initialised at norm 0.1 (encoder = their transpose), used divided by their norms, the norms multiplied
  into the encoder (``rescale_acts_by_decoder_norm``);
- ``rescale1``: that parametrisation initialised at norm 1 (as ``project``): separates it from the init;
- ``enc001``: ``project`` with the encoder initialised at norm 0.01, the scale of the effective encoder
  (encoder norm x decoder norm) that ``rescale`` starts from;
- ``aux1``: ``rescale01`` with AuxK weight 1 (SAELens: 1, scaled down by dead / (d_in / 2) when fewer die);
- ``b_dec0``: ``rescale01`` with b_dec at zero (SAELens's default);
- ``saelens``: SAELens's training SAE of the architecture with its defaults.

``--results FILE`` appends each run as a JSON line; ``--out FILE`` writes the printed table whole under the
results header.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import (
    Report,
    add_out_arg,
    add_run_args,
    append_result,
    frequency_summary,
    load,
    ours_trainer,
    preset,
    saelens_trainer,
    source_name,
    train_counting_fires,
)
from sae_lightning.config import CLIP_SCOPES, OptimConfig

MEDIAN = {"b_dec_init": "geometric_median"}
LOW_START = {"init_threshold": 0.01}  # JumpReLU's thresholds at SAELens's start
PENALISED: dict[str, dict[str, dict[str, object]]] = {
    "gated": {
        "paper": {"decoder_norm": "project", "aux_decoder": "frozen"} | MEDIAN,
        "free": {"decoder_norm": "free", "aux_decoder": "frozen"} | MEDIAN,
        "free_aux": {"decoder_norm": "free", "aux_decoder": "trained"} | MEDIAN,
        "unit_aux": {"decoder_norm": "project", "aux_decoder": "trained"} | MEDIAN,
        "free_aux_b0": {"decoder_norm": "free", "aux_decoder": "trained", "b_dec_init": "zeros"}},
    "jumprelu": {
        "paper": {"decoder_norm": "project", "threshold_lr_mult": 1.0} | MEDIAN | LOW_START,
        "free": {"decoder_norm": "free", "threshold_lr_mult": 1.0} | MEDIAN,
        "free_b0": {"decoder_norm": "free", "b_dec_init": "zeros", "threshold_lr_mult": 1.0},
        "paper_b0": {"decoder_norm": "project", "b_dec_init": "zeros", "threshold_lr_mult": 1.0} | LOW_START,
        "thr10": {"decoder_norm": "project", "threshold_lr_mult": 10.0} | MEDIAN | LOW_START,
        "thr30": {"decoder_norm": "project", "threshold_lr_mult": 30.0} | MEDIAN | LOW_START,
        "sparse_start": {"decoder_norm": "project", "threshold_lr_mult": 10.0} | MEDIAN,
        "sparse_preact": {"decoder_norm": "project", "threshold_lr_mult": 10.0, "pre_act_coeff": 3e-6}
        | MEDIAN,
        "free10": {"decoder_norm": "free", "threshold_lr_mult": 10.0} | MEDIAN,
        "free10_b0": {"decoder_norm": "free", "b_dec_init": "zeros", "threshold_lr_mult": 10.0},
        "ste": {"decoder_norm": "project", "threshold_lr_mult": 10.0, "ste_to_input": True} | MEDIAN
        | LOW_START,
        "bw02": {"decoder_norm": "project", "threshold_lr_mult": 10.0, "bandwidth": 0.2} | MEDIAN | LOW_START,
        "bw0125": {"decoder_norm": "project", "threshold_lr_mult": 10.0, "bandwidth": 0.0125} | MEDIAN
        | LOW_START,
        "tanh": {"decoder_norm": "project", "threshold_lr_mult": 10.0, "ste_to_input": True,
                 "sparsity_loss": "tanh"} | MEDIAN | LOW_START}}
OWN_COEFF = {"jumprelu": "l0_coeff"}  # architectures whose coefficient is a preset key, not the root l1
# TopK-family variant -> our preset's overrides (None: SAELens's SAE)
TOPK: dict[str, dict[str, object] | None] = {
    "project": {"decoder_norm": "project"} | MEDIAN, "rescale01": {"decoder_norm": "rescale"} | MEDIAN,
    "rescale1": {"decoder_norm": "rescale"} | MEDIAN, "enc001": {"decoder_norm": "project"} | MEDIAN,
    "aux1": {"decoder_norm": "rescale", "aux_coeff": 1.0} | MEDIAN,
    "b_dec0": {"decoder_norm": "rescale", "b_dec_init": "zeros"}, "saelens": None}
ROW_NORM = {"rescale01": 0.1, "rescale1": 1.0}  # initial decoder rows (encoder = their transpose)
K_ARCHS = ("topk", "batchtopk", "matryoshka")
VARIANTS: dict[str, dict] = PENALISED | dict.fromkeys(K_ARCHS, TOPK)


def run_penalised(arch: str, variant: str, target_l0: float | None, train_x: torch.Tensor,
                  eval_x: torch.Tensor, args: argparse.Namespace) -> dict:
    """Train one variant steered to ``target_l0`` (None: at the fixed ``--coeff``)."""
    own = {OWN_COEFF[arch]: args.coeff} if arch in OWN_COEFF else {}
    cfg = preset(arch, d_sae=args.d_sae, target_l0=target_l0, **PENALISED[arch][variant], **own)
    sae, step = ours_trainer(cfg, train_x.shape[1], args.coeff, lr=args.lr,
                             dead_window_tokens=args.dead_window * args.batch,
                             l1_warmup_steps=args.l1_warmup_steps, clip_scope=args.clip_scope)
    sae.init_from_data(train_x[:args.b_dec_sample])
    curve, freq, seconds = train_counting_fires(sae, step, train_x, eval_x, args)
    return {"arch": arch, "variant": variant, "target_l0": target_l0, "coeff": args.coeff, "l0": curve[-1][1],
            "nmse": curve[-1][2], "curve": curve, "seconds": seconds, "l1_warmup_steps": args.l1_warmup_steps,
            "clip_scope": args.clip_scope} | frequency_summary(freq)


def run_topk(arch: str, variant: str, k: int, train_x: torch.Tensor, eval_x: torch.Tensor,
             args: argparse.Namespace) -> dict:
    """Train one variant at ``k`` (``saelens``: SAELens's SAE with its defaults)."""
    from sae_lightning.saes.matryoshka import default_prefixes

    d_in, over = train_x.shape[1], TOPK[variant]
    if over is None:
        kw = {"matryoshka_widths": default_prefixes(args.d_sae)} if arch == "matryoshka" else {}
        sae, step = saelens_trainer(arch, d_in, args.d_sae, 0.0, lr=args.lr,
                                    dead_window_steps=args.dead_window, k=k, **kw)
    else:
        cfg = preset(arch, d_sae=args.d_sae, k=k, **over)
        sae, step = ours_trainer(cfg, d_in, 0.0, lr=args.lr, dead_window_tokens=args.dead_window * args.batch,
                                 clip_scope=args.clip_scope)
        with torch.no_grad():
            if variant in ROW_NORM:
                sae.W_dec.mul_(ROW_NORM[variant] / sae.W_dec.norm(dim=1, keepdim=True))
                sae.W_enc.copy_(sae.W_dec.t())
            if variant == "enc001":
                sae.W_enc.mul_(0.01)
        sae.init_from_data(train_x[:args.b_dec_sample])
    curve, freq, seconds = train_counting_fires(sae, step, train_x, eval_x, args)
    return {"arch": arch, "variant": variant, "k": k, "l0": curve[-1][1], "nmse": curve[-1][2],
            "curve": curve, "seconds": seconds} | frequency_summary(freq)


def penalised_table(arch: str, variants: list[str], train_x: torch.Tensor, eval_x: torch.Tensor,
                    args: argparse.Namespace, say: Report) -> None:
    """Every (target, variant, seed) run of a penalised ``arch``, one line each."""
    say(f"data: {source_name(args.acts)}, d_in {train_x.shape[1]}, d_sae {args.d_sae}, {args.steps} steps x "
        f"{args.batch} rows, lr {args.lr}, sae={arch}, "
        f"{'fixed coefficient' if args.plain else 'controller from coefficient'} {args.coeff}, "
        f"coefficient warm-up {args.l1_warmup_steps} steps, gradient clipped per {args.clip_scope}"
        f"{', plain L0 term (no target)' if args.plain else ''}")
    say(f"{'variant':12s} {'seed':>4s} {'target':>6s} {'L0':>7s} {'nmse':>7s} {'dead':>6s} {'rare':>6s} "
        f"{'dense':>6s} {'freq q05/q50/q95':>17s} {'seconds':>7s}  (L0, nmse) during training")
    for target in [None] if args.plain else args.target_l0:
        for variant, seed in ((v, s) for v in variants for s in args.seeds):
            torch.manual_seed(seed)
            r = run_penalised(arch, variant, target, train_x, eval_x, args) | {"seed": seed}
            path = " ".join(f"({c[1]:.0f}, {c[2]:.4f})" for c in r["curve"])
            shown = "-" if target is None else f"{target:.0f}"
            spread = "/".join(f"{f:.3f}" for f in r["freq_quantiles"])
            say(f"{variant:12s} {seed:4d} {shown:>6s} {r['l0']:7.2f} {r['nmse']:7.4f} {r['dead']:6.1%} "
                f"{r['rare']:6.1%} {r['dense']:6.1%} {spread:>17s} {r['seconds']:7d}  {path}")
            append_result(args.results, r | {"acts": source_name(args.acts)})


def topk_table(archs: list[str], variants: list[str], train_x: torch.Tensor, eval_x: torch.Tensor,
               args: argparse.Namespace, say: Report) -> None:
    """Every (arch, k, variant, seed) run of the TopK family, one line each."""
    say(f"data: {source_name(args.acts)}, d_in {train_x.shape[1]}, d_sae {args.d_sae}, {args.steps} steps x "
        f"{args.batch} rows, lr {args.lr}")
    say(f"{'arch':10s} {'variant':8s} {'k':>4s} {'L0':>7s} {'nmse':>7s} {'dead':>6s} {'seconds':>7s}  "
        "nmse during training")
    for arch in archs:
        for k in args.k:
            for variant, seed in ((v, s) for v in variants for s in args.seeds):
                torch.manual_seed(seed)
                r = run_topk(arch, variant, k, train_x, eval_x, args) | {"seed": seed}
                path = " ".join(f"{c[2]:.4f}" for c in r["curve"])
                say(f"{arch:10s} {variant:8s} {k:4d} {r['l0']:7.2f} {r['nmse']:7.4f} {r['dead']:6.1%} "
                    f"{r['seconds']:7d}  {path}")
                append_result(args.results, r | {"acts": source_name(args.acts)})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--acts", required=True, help="activation cache directory or .npy (not the judged data)")
    p.add_argument("--arch", nargs="+", required=True, choices=list(VARIANTS),
                   help="one penalised architecture, or one or more of the TopK family")
    p.add_argument("--variants", nargs="+", help="default: all of the architecture's (module docstring)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="initialisation seeds per variant (the data order stays the same)")
    p.add_argument("--k", type=int, nargs="+", default=[64], help="TopK family: k")
    p.add_argument("--target-l0", type=float, nargs="+", default=[60.0], help="penalised: the steered L0s")
    p.add_argument("--coeff", type=float, default=3.0,
                   help="penalised: the coefficient the controller starts from (with --plain: the fixed one)")
    p.add_argument("--l1-warmup-steps", type=int, default=0,
                   help="penalised: warm the coefficient up over this many steps (optim.l1_warmup_steps)")
    p.add_argument("--plain", action="store_true", help="penalised: no target, train at the fixed --coeff")
    p.add_argument("--clip-scope", choices=CLIP_SCOPES, default=OptimConfig().grad_clip_scope,
                   help="clip the gradient norm per parameter group or over all (optim.grad_clip_scope)")
    add_run_args(p, d_sae=3072, train_rows=474_000, eval_rows=25_000, batch=2048, steps=512, threads=2)
    p.add_argument("--results", type=Path, help="append each run as a JSON line")
    add_out_arg(p)
    args = p.parse_args(argv)
    penalised = [a for a in args.arch if a in PENALISED]
    if penalised and len(args.arch) > 1:
        p.error(f"--arch {args.arch}: a penalised architecture ({penalised[0]}) runs alone")
    for arch in args.arch:
        unknown = sorted(set(args.variants or []) - set(VARIANTS[arch]))
        if unknown:
            p.error(f"--variants {unknown}: {arch} has {list(VARIANTS[arch])}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    say = Report(__spec__.name, argv)
    train_x, eval_x = load(args.acts, args)
    variants = args.variants or list(VARIANTS[args.arch[0]])
    if args.arch[0] in PENALISED:
        penalised_table(args.arch[0], variants, train_x, eval_x, args, say)
    else:
        topk_table(args.arch, variants, train_x, eval_x, args, say)
    say.write(args.out)


if __name__ == "__main__":
    main()
