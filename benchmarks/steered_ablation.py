"""Training choices where our penalised SAEs and SAELens's differ, switched one at a time, every run steered
to one L0.

``quality_vs_saelens.py`` compares our SAEs with SAELens's on SmolLM2 layer 6. Where they differed, this
script trains our ``sae=<arch>`` with each of SAELens's choices in turn (everything else ours) on the same
batches, scored as ``quality_vs_saelens`` scores. Variants (``--arch gated``):

- ``paper``: unit-norm decoder rows (``sae.decoder_norm=project``), the auxiliary reconstruction through a
  frozen decoder (``sae.aux_decoder=frozen``), b_dec at the geometric median: our defaults until 2026-12-05;
- ``free``: SAELens's free decoder (rows start at norm 0.1, encoder = their transpose, the gate L1 weighted
  by the row norms), aux decoder still frozen;
- ``free_aux``: ``free`` with the auxiliary loss training the decoder too (``sae.aux_decoder=trained``);
- ``unit_aux``: ``paper`` with the auxiliary loss training the decoder;
- ``free_aux_b0``: ``free_aux`` with b_dec at zero (SAELens's start).

``--arch jumprelu``:

- ``paper``: unit-norm decoder rows (``sae.decoder_norm=project``), b_dec at the geometric median, the
  threshold at the base learning rate: our defaults until 2026-12-05;
- ``free``: SAELens's free decoder (rows start at norm 0.1, encoder = their transpose);
- ``free_b0``: ``free`` with b_dec at zero (SAELens's start);
- ``paper_b0``: ``paper`` with b_dec at zero;
- ``thr10``, ``thr30``: ``paper`` with the thresholds learning at 10x / 30x the learning rate
  (``sae.threshold_lr_mult``; ``paper`` and the others have 1); ``thr10`` was the default from 2026-12-05
  to 2026-12-06;
- ``sparse_start``: ``thr10`` with ``sae.init_threshold`` left at its default since 2026-12-06, the sparse
  start (each latent's threshold where it fires on 7 % of the b_dec sample, ``saes/jumprelu.py``);
  every other variant with a unit-norm decoder starts its thresholds at 0.01, as they ran. Rows of
  ``sparse_start`` in ``results/jumprelu_sparse_start.jsonl`` whose ``start`` says "every threshold at 1.5"
  ran a first version (one threshold for all latents), some without the controller's floor;
- ``sparse_preact``: ``sparse_start`` with Anthropic's pre-activation loss on dead latents at their
  coefficient (``sae.pre_act_coeff=3e-6``): does it revive the latents the sparse start leaves dead?
- ``free10``: ``thr10`` with SAELens's free decoder (is the decoder why SAELens is ahead at dense L0?);
- ``free10_b0``: ``free10`` with b_dec at zero: SAELens's start with our thresholds' rate;
- ``ste``: ``thr10`` with the straight-through gradient passed to the pre-activations too
  (``sae.ste_to_input``, Anthropic's; the L0 term then trains the encoder as well);
- ``bw02``, ``bw0125``: ``thr10`` with the straight-through kernel 4x wider / narrower (``sae.bandwidth``
  0.2 / 0.0125; SAELens's and our default is 0.05): how hard the reconstruction pulls on the thresholds.

``--l1-warmup-steps N`` warms every variant's coefficient up linearly over its first N steps
(``optim.l1_warmup_steps``; the controller waits until it is over), so a run comes down to its L0 from
denser, as SAELens's JumpReLU does at this budget, instead of sitting at the target from early on.

``--clip-scope global`` clips one gradient norm over all parameters (``optim.grad_clip_scope``; SAELens's
trainer) instead of one per parameter group. ``--plain`` trains at the fixed ``--coeff`` with the plain
L0 term, no target (SAELens's way): ``--variants free_b0 --plain --coeff 12 --clip-scope global`` is
SAELens's JumpReLU recipe in our code (``benchmarks/results/jumprelu_diagnosis_l6.txt``).

Each run also prints how its latents' held-out firing frequencies spread
(``quality_vs_saelens.frequency_summary``: dead, rare under 1 %, dense over 50 %, 5 / 50 / 95 % quantiles):
two runs at one L0 can split it very differently.

``--seeds 0 1 2`` trains each variant once per initialisation seed (the data order stays the same), to
see a variant's seed-to-seed spread.

A sparsity coefficient gives each variant a different L0, so every run is steered to the same L0 by the
``sae.target_l0`` controller (``sae_lightning/sparsity.py``, as the trainer runs it), starting from
``--coeff`` (``l1`` for gated, ``sae.l0_coeff`` for jumprelu); normalized MSE is then compared at (nearly)
equal L0. Run it on data the quality benchmark does not score (a default chosen here must not be tuned on the
figures that judge it), e.g. layer 3 of the same model:
``python benchmarks/steered_ablation.py --acts <layer-3 cache> --arch gated --target-l0 60``; ``--help`` for
the rest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_vs_saelens as q
from train_step import ours_trainer, preset

from sae_lightning.config import CLIP_SCOPES, OptimConfig

MEDIAN = {"b_dec_init": "geometric_median"}
LOW_START = {"init_threshold": 0.01}  # JumpReLU's thresholds at SAELens's start: our default until 2026-12-06
VARIANTS: dict[str, dict[str, dict[str, object]]] = {
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


def run(arch: str, variant: str, target_l0: float | None, train_x: torch.Tensor, eval_x: torch.Tensor,
        args: argparse.Namespace) -> dict:
    """Train one variant steered to ``target_l0`` (None: at the fixed ``--coeff``) as ``quality_vs_saelens``
    trains (same batches, steps, lr, scoring); also count the latents that fire on no held-out row."""
    own = {OWN_COEFF[arch]: args.coeff} if arch in OWN_COEFF else {}
    cfg = preset(arch, d_sae=args.d_sae, target_l0=target_l0, **VARIANTS[arch][variant], **own)
    sae, step = ours_trainer(cfg, train_x.shape[1], args.coeff, lr=args.lr,
                             dead_window_tokens=args.dead_window * args.batch,
                             l1_warmup_steps=args.l1_warmup_steps, clip_scope=args.clip_scope)
    sae.init_from_data(train_x[:args.b_dec_sample])
    curve, freq, seconds = q.train_counting_fires(sae, step, train_x, eval_x, args)
    return {"arch": arch, "variant": variant, "target_l0": target_l0, "coeff": args.coeff, "l0": curve[-1][1],
            "nmse": curve[-1][2], "curve": curve, "seconds": seconds, "l1_warmup_steps": args.l1_warmup_steps,
            "clip_scope": args.clip_scope} | q.frequency_summary(freq)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--acts", required=True, help="activation cache directory or .npy (not the judged data)")
    p.add_argument("--arch", required=True, choices=list(VARIANTS))
    p.add_argument("--variants", nargs="+", help="default: all of the architecture's (module docstring)")
    p.add_argument("--target-l0", type=float, nargs="+", default=[60.0])
    p.add_argument("--coeff", type=float, default=3.0,
                   help="the coefficient the controller starts from (with --plain: the fixed coefficient)")
    p.add_argument("--l1-warmup-steps", type=int, default=0,
                   help="warm the coefficient up over this many steps (optim.l1_warmup_steps)")
    p.add_argument("--plain", action="store_true", help="no target: train at the fixed --coeff")
    p.add_argument("--clip-scope", choices=CLIP_SCOPES, default=OptimConfig().grad_clip_scope,
                   help="clip the gradient norm per parameter group or over all (optim.grad_clip_scope)")
    q.add_run_args(p, d_sae=3072, train_rows=474_000, eval_rows=25_000, batch=2048, steps=512, threads=2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="initialisation seeds per variant (the data order stays the same)")
    p.add_argument("--results", type=Path, help="append each run as a JSON line")
    args = p.parse_args()
    variants = args.variants or list(VARIANTS[args.arch])
    unknown = sorted(set(variants) - set(VARIANTS[args.arch]))
    if unknown:
        p.error(f"--variants {unknown}: {args.arch} has {list(VARIANTS[args.arch])}")
    torch.set_num_threads(args.threads)
    train_x, eval_x = q.load(args.acts, args)
    print(f"data: {Path(args.acts).name}, d_in {train_x.shape[1]}, d_sae {args.d_sae}, {args.steps} steps x "
          f"{args.batch} rows, lr {args.lr}, sae={args.arch}, "
          f"{'fixed coefficient' if args.plain else 'controller from coefficient'} {args.coeff}, "
          f"coefficient warm-up {args.l1_warmup_steps} steps, gradient clipped per {args.clip_scope}"
          f"{', plain L0 term (no target)' if args.plain else ''}")
    print(f"{'variant':12s} {'seed':>4s} {'target':>6s} {'L0':>7s} {'nmse':>7s} {'dead':>6s} {'rare':>6s} "
          f"{'dense':>6s} {'freq q05/q50/q95':>17s} {'seconds':>7s}  (L0, nmse) during training")
    for target in [None] if args.plain else args.target_l0:
        for variant, seed in ((v, s) for v in variants for s in args.seeds):
            torch.manual_seed(seed)
            r = run(args.arch, variant, target, train_x, eval_x, args) | {"seed": seed}
            path = " ".join(f"({c[1]:.0f}, {c[2]:.4f})" for c in r["curve"])
            shown = "-" if target is None else f"{target:.0f}"
            spread = "/".join(f"{f:.3f}" for f in r["freq_quantiles"])
            print(f"{variant:12s} {seed:4d} {shown:>6s} {r['l0']:7.2f} {r['nmse']:7.4f} {r['dead']:6.1%} "
                  f"{r['rare']:6.1%} {r['dense']:6.1%} {spread:>17s} {r['seconds']:7d}  {path}", flush=True)
            q.append_result(args.results, r | {"acts": Path(args.acts).name})


if __name__ == "__main__":
    main()
