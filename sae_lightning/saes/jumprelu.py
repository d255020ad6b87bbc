"""JumpReLU SAE (Rajamanoharan et al. 2024) trained with straight-through estimators (STEs).

``z = pre * H(pre - theta)`` with ``pre = (x - b_dec) @ W_enc + b_enc``, a learned per-latent threshold
``theta`` and Heaviside ``H``. The loss is ``reconstruction + l0_coeff * L0`` with
``L0 = mean_tokens sum_i H(pre_i - theta_i)``, exactly the L0 the SAE reports. ``H`` has zero
derivative almost everywhere, so theta gets its gradient from the paper's pseudo-derivatives with a
rectangle kernel of width ``eps = sae.bandwidth``:
``d z / d theta = -(theta / eps) * K((pre - theta) / eps)``, ``d H / d theta = -(1 / eps) * K(...)``,
``K(u) = 1[|u| < 1/2]``; ``d z / d pre = H(pre - theta)`` and H passes no gradient to ``pre``.
The coefficient is ``sae.l0_coeff`` (the root key ``l1`` is refused: it is not an L1 penalty).

Anthropic's variants (as SAELens names them), each off by default:

- ``sae.ste_to_input=true`` (``jumprelu_ste_to_input``) also passes the kernel to ``pre``:
  ``d z / d pre = H + (theta / eps) K`` and ``d H / d pre = (1 / eps) K``, so the L0 term moves the encoder as
  well, pushing pre-activations near the threshold below it.
- ``sae.sparsity_loss=tanh`` (``jumprelu_sparsity_loss_mode="tanh"``) replaces the L0 term by
  ``mean_tokens sum_i tanh(c * z_i * ||W_dec,i||)`` with ``c = sae.tanh_scale``: a smooth count whose gradient
  reaches z (and, through the jump, the thresholds); with ``sae.target_l0`` the controller steers its
  coefficient.
- ``sae.pre_act_coeff > 0`` adds a loss that raises the pre-activations of dead latents towards their
  thresholds (``_pre_act_loss``); Anthropic pairs it with the two above.

Decoder (``sae.decoder_norm``, ``base.decoder_init``): ``project`` keeps the rows at unit norm, as the
paper; ``free`` leaves them free from norm 0.1 with ``W_enc = W_dec^T``, as SAELens's JumpReLU. The L0
penalty does not depend on the decoder, so the two train the same loss from different starts and under
different constraints.

With ``sae.target_l0 = T`` the L0 term is ``T/2 * log((L0 + 1) / (T + 1))^2`` instead of ``L0``: its
derivative in L0, ``T * log((L0 + 1) / (T + 1)) / (L0 + 1)``, is 0 at T, at most ``1/e`` above it (at most
the plain term's 1, so no gradient surge from a dense start) and negative below T: the thresholds are pushed
down when L0 is under the target. The plain term only pushes them up, and the reconstruction's pull down is
weak, so a run that falls below its target would stay there while the controller cuts the coefficient. The
controller (``sparsity.py``) still scales the coefficient, which removes the offset the reconstruction's
pull leaves.

``theta`` is trained directly and projected onto ``theta >= 0`` after each optimizer step, not trained as
``log theta`` as in the paper: Adam moves a parameter by about ``lr`` per step, so a log threshold started
at the paper's 0.001 ends within a factor ~2 of it after a thousand steps and the L0 coefficient barely
moves L0 (SAELens trains it directly too). Trained directly it is still rate-limited: with inputs scaled to
``E||x||^2 = d_in`` the pre-activations start with std about 1, so an L0 of 64 of 3072 needs thresholds near
2.5, which Adam at lr 1e-3 reaches after some 2,500 steps. So the thresholds are their own optimizer group at
``lr * sae.threshold_lr_mult`` (``param_groups``), clipped apart from the other weights (``step.py``).
SAE folders saved with ``log_threshold`` load as ``exp`` of it.

The start of the thresholds (``sae.init_threshold``):

- unset, with the unit-norm decoder: the sparse start. ``init_from_data`` sets each latent's threshold to the
  ``1 - SPARSE_START`` (93 %) quantile of its pre-activations on the sample the trainer starts ``b_dec``
  from, so every latent first fires on 7 % of the tokens and the run starts at L0 ~ 0.07 d_sae (before data:
  ``SPARSE_START_Z`` times the encoder's gain, the same quantile were the pre-activations Gaussian;
  resampling restarts a latent there). A run steered to a denser target comes up to it through the two-sided
  term, whose controller never lowers the coefficient below its start (``sparsity.py``). Why sparse: from a
  dense start (every latent firing on about half of the tokens) the thresholds rise together and hardly any
  latent becomes rare; from a sparse one latents compete for the tokens first and the dictionary spreads.
  A per-latent quantile, not one value, because the scale of the pre-activations differs between layers.
- unset, with ``sae.decoder_norm=free``: SAELens's 0.01 for every threshold.
- a number ``v``: every threshold starts at ``v``.

SAELens's JumpReLU recipe, exactly: ``sae.decoder_norm=free sae.b_dec_init=zeros sae.threshold_lr_mult=1
optim.grad_clip_scope=global`` and a fixed ``sae.l0_coeff`` (no target). It then takes SAELens's training
steps (``tests/benchmarks/test_benchmark_scripts.py``).

Kernels (``sae.sparse_kernel``, as ``relu.py``): the sparse kernels run on the entries in play, the active
ones (``pre > theta``) and those in the straight-through band (``|pre - theta| < eps / 2``, zero but with a
threshold gradient); outside them ``z``, ``H`` and every gradient are 0.

The evidence behind each default is in ``docs/decisions.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from sae_lightning.checks import check
from sae_lightning.saes.base import SAE, DecoderNormConfig, SAEOutput, Weights, decoder_init
from sae_lightning.saes.registry import register
from sae_lightning.saes.sparse_ops import layout


def _kernel(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel ``K((pre - theta) / eps) / eps`` [B, d_sae]."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)`` with the STE gradient for theta, and for pre too with ``ste_to_input``
    (module docstring)."""

    @staticmethod
    def forward(ctx: FunctionCtx, pre: Tensor, threshold: Tensor, bandwidth: float,
                ste_to_input: bool) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre, threshold = ctx.saved_tensors
        ste = threshold * _kernel(pre, threshold, ctx.bandwidth) * grad
        grad_pre = grad * (pre > threshold)
        if ctx.ste_to_input:
            grad_pre = grad_pre + ste
        return grad_pre, -ste.sum_to_size(threshold.shape), None, None


class _Step(torch.autograd.Function):
    """``H(pre - theta)`` with the STE gradient for theta; for pre none, or with ``ste_to_input`` its
    negation (``H`` depends on ``pre - theta`` only) (module docstring)."""

    @staticmethod
    def forward(ctx: FunctionCtx, pre: Tensor, threshold: Tensor, bandwidth: float,
                ste_to_input: bool) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre, threshold = ctx.saved_tensors
        ste = _kernel(pre, threshold, ctx.bandwidth) * grad
        return (ste if ctx.ste_to_input else None), -ste.sum_to_size(threshold.shape), None, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool) -> Tensor:
    """``pre * H(pre - theta)`` with the straight-through gradients (``_JumpReLU``); ``threshold``
    broadcasts against ``pre``. Shared with the cross-layer transcoder (``circuits/clt.py``)."""
    return _JumpReLU.apply(pre, threshold, bandwidth, ste_to_input)


def heaviside(pre: Tensor, threshold: Tensor, bandwidth: float, ste_to_input: bool) -> Tensor:
    """``H(pre - theta)`` with the straight-through gradients (``_Step``): what the L0 term counts."""
    return _Step.apply(pre, threshold, bandwidth, ste_to_input)


def l0_term(l0: Tensor, target: float | None) -> Tensor:
    """The L0 term the coefficient multiplies (module docstring): ``L0``; with a target ``T``,
    ``T/2 * log((L0 + 1) / (T + 1))^2``, which pushes L0 towards T from either side."""
    if target is None:
        return l0
    return target / 2 * torch.log((l0 + 1) / (target + 1)).square()


@torch.no_grad()
def sparse_start_thresholds(pre_of: Callable[[Tensor], Tensor], d_sae: int, n_rows: int,
                            device: torch.device) -> Tensor:
    """Each latent's threshold for the sparse start: the ``1 - SPARSE_START`` quantile of its
    pre-activations over ``n_rows`` sample rows, ``pre_of(cols)`` giving those of the latents ``cols``
    [n_rows, len(cols)] (computed ``QUANTILE_CHUNK`` latents at a time to bound memory), clamped at 0."""
    k = max(1, math.ceil((1 - SPARSE_START) * n_rows))
    out = torch.empty(d_sae, device=device)
    for cols in torch.arange(d_sae, device=device).split(QUANTILE_CHUNK):
        out[cols] = pre_of(cols).kthvalue(k, dim=0).values.clamp(min=0.0)
    return out


SPARSITY_LOSSES = ("l0", "tanh")
SPARSE_START = 0.07  # sparse start: each latent fires on this fraction of the data sample (module docstring)
SPARSE_START_Z = 1.476  # P(N(0, 1) > 1.476) = 0.07: the start before data, pre-activations taken as Gaussian
SAELENS_INIT_THRESHOLD = 0.01  # SAELens's start of the thresholds, the default with its free decoder
QUANTILE_CHUNK = 1024  # latents whose start is computed at once


@dataclass
class JumpReLUConfig(DecoderNormConfig):
    """``sae=jumprelu``: ``l0_coeff`` weighs the L0 penalty; thresholds start at ``init_threshold`` and learn
    at ``threshold_lr_mult`` times the learning rate; the straight-through kernel has width ``bandwidth``
    and with ``ste_to_input`` passes its gradient to the pre-activations too; ``sparsity_loss``: l0 | tanh
    (scale ``tanh_scale``); ``pre_act_coeff`` weighs the dead latents' pre-activation loss;
    ``decoder_norm``: project | free (module docstring)."""

    architecture: str = "jumprelu"  # the registry name, fixed by the class
    l0_coeff: float = 5.0  # weight of the L0 term (the start value with target_l0)
    init_threshold: float | None = None  # every threshold's start; None: the sparse start (module docstring)
    bandwidth: float = 0.05  # width eps of the straight-through rectangle kernel (SAELens's)
    threshold_lr_mult: float = 10.0  # the thresholds learn at lr times this
    ste_to_input: bool = False  # the straight-through gradient reaches the pre-activations too
    sparsity_loss: str = "l0"  # l0: the L0 term | tanh: Anthropic's smooth count
    tanh_scale: float = 4.0  # c of the tanh count tanh(c * z_i * ||W_dec,i||)
    pre_act_coeff: float = 0.0  # weight of the dead latents' pre-activation loss (Anthropic: 3e-6; 0: off)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.sparsity_loss in SPARSITY_LOSSES, "sae.sparsity_loss", self.sparsity_loss,
              f"must be one of {SPARSITY_LOSSES}")
        check(self.tanh_scale > 0, "sae.tanh_scale", self.tanh_scale, "must be > 0")
        check(self.pre_act_coeff >= 0, "sae.pre_act_coeff", self.pre_act_coeff, "must be >= 0")
        check(self.l0_coeff >= 0, "sae.l0_coeff", self.l0_coeff, "must be >= 0")
        check(self.init_threshold is None or self.init_threshold > 0, "sae.init_threshold",
              self.init_threshold, "must be > 0 (or null: the default start, module docstring)")
        check(self.bandwidth > 0, "sae.bandwidth", self.bandwidth, "must be > 0")
        check(self.threshold_lr_mult > 0, "sae.threshold_lr_mult", self.threshold_lr_mult, "must be > 0")


@register("jumprelu")
class JumpReLUSAE(SAE):
    """JumpReLU SAE: ``z = pre * H(pre - theta)`` with a learned per-latent threshold ``theta`` (parameter
    ``threshold``, kept >= 0, its own optimizer group) trained by straight-through estimators against
    reconstruction + ``sae.l0_coeff`` * L0 (module docstring)."""

    config_class = JumpReLUConfig
    sparsity_key = "sae.l0_coeff"

    def __init__(self, cfg: JumpReLUConfig, d_in: int, d_out: int | None = None) -> None:
        init = decoder_init(cfg.decoder_norm, cfg, d_in)
        super().__init__(cfg, d_in, d_out=d_out, **init)
        self.bandwidth = cfg.bandwidth
        self.sparse_start = cfg.init_threshold is None and cfg.decoder_norm == "project"
        if cfg.init_threshold is not None:
            self.init_threshold = cfg.init_threshold
        elif self.sparse_start:  # until init_from_data: pre-activations start with std about the encoder gain
            self.init_threshold = SPARSE_START_Z * init["encoder_gain"]
        else:
            self.init_threshold = SAELENS_INIT_THRESHOLD
        self.threshold = nn.Parameter(torch.full((self.d_sae,), self.init_threshold))

    def base_coeff(self, l1: float) -> float:
        return self.cfg.l0_coeff

    @property
    def two_sided_target(self) -> bool:
        """With ``sae.target_l0`` the L0 term is two-sided (module docstring); the tanh term is not."""
        return self.cfg.sparsity_loss == "l0"

    def latent_init_values(self) -> dict[str, float]:
        return {"threshold": self.init_threshold}

    @torch.no_grad()
    def init_from_data(self, inputs: Tensor, targets: Tensor | None = None) -> None:
        """``b_dec`` (base class), then, for the sparse start, each latent's threshold at the
        ``1 - SPARSE_START`` quantile of its pre-activations on ``inputs`` (module docstring)."""
        super().init_from_data(inputs, targets)
        if not self.sparse_start:
            return
        u = self.normalize(inputs.to(self.b_dec))
        w = self.weights()
        self.threshold.copy_(sparse_start_thresholds(
            lambda cols: self.pre_acts(u, w=Weights(w.W_enc[:, cols], w.b_enc[cols], w.W_dec[cols])),
            self.d_sae, u.shape[0], u.device))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The thresholds at ``lr * sae.threshold_lr_mult`` (module docstring), the rest at ``lr``."""
        rest = [p for p in self.parameters() if p is not self.threshold]
        return [{"params": rest, "lr": lr},
                {"params": [self.threshold], "lr": lr * self.cfg.threshold_lr_mult}]

    def upgrade_weights(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """A folder that stores ``log_threshold`` (the paper's parametrisation) holds ``log theta``."""
        if "log_threshold" in weights and "threshold" not in weights:
            weights = dict(weights)
            weights["threshold"] = weights.pop("log_threshold").exp()
        return weights

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """The decoder constraint (base class; none when free) and ``theta >= 0``: below 0 the gate passes
        negative pre-activations."""
        super().after_optimizer_step()
        self.threshold.clamp_(min=0.0)

    def encode_normalized(self, u: Tensor) -> Tensor:
        pre = self.pre_acts(u)
        return pre * (pre > self.threshold)

    def forward(self, u: Tensor, *, target: Tensor | None = None, sparsity_coeff: float,
                dead_mask: Tensor | None = None) -> SAEOutput:
        w = self.weights()
        dense_pre = self.pre_acts(u, w=w)
        # in play: active (pre > theta) or in the straight-through band (|pre - theta| < eps / 2)
        with torch.no_grad():
            lat = layout(dense_pre - self.threshold > -self.bandwidth / 2, self.cfg.sparse_kernel)
        pre = lat.encode(u, w.W_enc, w.b_enc, self.input_center(), dense_pre)
        theta = lat.per_entry(self.threshold)
        z = jumprelu(pre, theta, self.bandwidth, self.cfg.ste_to_input)
        x_hat = self.with_skip(lat.decode(z, w.W_dec, self.b_dec), u)
        n_rows = u.shape[0]
        if self.cfg.sparsity_loss == "tanh":
            scale = lat.per_entry(self.cfg.tanh_scale * self.W_dec.norm(dim=1))
            term = torch.tanh(z * scale).sum() / n_rows
        else:
            term = self.l0_term(heaviside(pre, theta, self.bandwidth, self.cfg.ste_to_input).sum() / n_rows)
        return self._output(u if target is None else target, x_hat, lat.fire_counts(z),
                            {"l0_penalty": sparsity_coeff * term,
                             "pre_act": self._pre_act_loss(dense_pre, dead_mask)})

    def _pre_act_loss(self, pre: Tensor, dead_mask: Tensor | None) -> Tensor | None:
        """Anthropic's pre-activation loss on the dead latents (as SAELens applies it):
        ``sae.pre_act_coeff * mean_tokens sum_{i dead} relu(theta_i - pre_i) * ||W_dec,i||``, which raises a
        dead latent's pre-activations towards its threshold. None if off, 0 if none is dead."""
        if not self.cfg.pre_act_coeff:
            return None
        if dead_mask is None or not bool(dead_mask.any()):
            return pre.new_zeros(())
        gap = (self.threshold - pre).relu() * (dead_mask * self.W_dec.norm(dim=1))
        return self.cfg.pre_act_coeff * gap.sum(-1).mean()

    def l0_term(self, l0: Tensor) -> Tensor:
        """The L0 term the coefficient multiplies (module docstring): ``L0``; with ``sae.target_l0 = T``,
        ``T/2 * log((L0 + 1) / (T + 1))^2``, which pushes L0 towards T from either side."""
        return l0_term(l0, self.cfg.target_l0)
