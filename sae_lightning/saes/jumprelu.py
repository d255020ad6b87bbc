"""JumpReLU SAE (Rajamanoharan et al. 2024) trained with straight-through estimators (STEs).

``z = pre * H(pre - theta)`` with ``pre = (x - b_dec) @ W_enc + b_enc``, a learned per-latent threshold
``theta`` and Heaviside ``H``. The loss is ``reconstruction + l0_coeff * L0`` with
``L0 = mean_tokens sum_i H(pre_i - theta_i)``, exactly the L0 the SAE reports. ``H`` has zero
derivative almost everywhere, so theta gets its gradient from the paper's pseudo-derivatives with a
rectangle kernel of width ``eps = sae.bandwidth``:
``d z / d theta = -(theta / eps) * K((pre - theta) / eps)``, ``d H / d theta = -(1 / eps) * K(...)``,
``K(u) = 1[|u| < 1/2]``; ``d z / d pre = H(pre - theta)`` and H passes no gradient to ``pre``.
The coefficient is ``sae.l0_coeff`` (the root key ``l1`` is refused: it is not an L1 penalty).

Decoder (``sae.decoder_norm``, ``base.decoder_init``): ``project`` (default) keeps the rows at unit norm, as
the paper; ``free`` leaves them free from norm 0.1 with ``W_enc = W_dec^T``, as SAELens's JumpReLU. The L0
penalty does not depend on the decoder, so the two train the same loss from different starts and under
different constraints. On SmolLM2 layer 3 (not the layer the quality benchmark scores;
``benchmarks/results/jumprelu_ablation_l3.txt``, both steered towards L0 500 from ``l0_coeff`` 5), the paper's
choices (``project``, b_dec at the geometric median) ended at L0 674, normalized MSE 0.178; SAELens's
(``free``, b_dec at zero) at L0 1644, 0.195: hence the defaults.

``theta`` is trained directly and projected onto ``theta >= 0`` after each optimizer step, not trained as
``log theta`` as in the paper: Adam moves a parameter by about ``lr`` per step, so a log threshold started
at the paper's 0.001 ends within a factor ~2 of it after a thousand steps and the L0 coefficient barely
moves L0 (SAELens made the same change, its issue #494). The defaults ``init_threshold`` 0.01 and
``bandwidth`` 0.05 are SAELens's; SAE folders saved with ``log_threshold`` load as ``exp`` of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from sae_lightning.checks import check
from sae_lightning.saes.base import SAE, DecoderNormConfig, SAEOutput, column_stats, decoder_init
from sae_lightning.saes.registry import register


def _kernel(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel ``K((pre - theta) / eps) / eps`` [B, d_sae]."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype) / bandwidth


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)`` with the STE gradient for theta (module docstring)."""

    @staticmethod
    def forward(ctx: FunctionCtx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold)
        grad_theta = -(threshold * _kernel(pre, threshold, ctx.bandwidth) * grad).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """``H(pre - theta)`` with the STE gradient for theta and none for pre (module docstring)."""

    @staticmethod
    def forward(ctx: FunctionCtx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        pre, threshold = ctx.saved_tensors
        return None, -(_kernel(pre, threshold, ctx.bandwidth) * grad).sum(0), None


@dataclass
class JumpReLUConfig(DecoderNormConfig):
    """``sae=jumprelu``: ``l0_coeff`` weighs the L0 penalty; thresholds start at ``init_threshold``; the
    straight-through kernel has width ``bandwidth``; ``decoder_norm``: project | free (module docstring)."""

    architecture: str = "jumprelu"
    l0_coeff: float = 5.0
    init_threshold: float = 0.01
    bandwidth: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.l0_coeff >= 0, "sae.l0_coeff", self.l0_coeff, "must be >= 0")
        check(self.init_threshold > 0, "sae.init_threshold", self.init_threshold, "must be > 0")
        check(self.bandwidth > 0, "sae.bandwidth", self.bandwidth, "must be > 0")


@register("jumprelu")
class JumpReLUSAE(SAE):
    """See module docstring."""

    config_class = JumpReLUConfig
    sparsity_key = "sae.l0_coeff"

    def __init__(self, cfg: JumpReLUConfig, d_in: int, d_out: int | None = None) -> None:
        super().__init__(cfg, d_in, d_out=d_out, **decoder_init(cfg.decoder_norm, cfg, d_in))
        self.bandwidth = cfg.bandwidth
        self.threshold = nn.Parameter(torch.full((self.d_sae,), cfg.init_threshold))

    def base_coeff(self, l1: float) -> float:
        return self.cfg.l0_coeff

    def latent_init_values(self) -> dict[str, float]:
        return {"threshold": self.cfg.init_threshold}

    def upgrade_weights(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """A folder written when the threshold was trained as ``log_threshold`` holds ``log theta``."""
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
        pre = self.pre_acts(u)
        theta = self.threshold
        z = _JumpReLU.apply(pre, theta, self.bandwidth)
        x_hat = self.with_skip(self.decode_normalized(z), u)
        l0 = _Step.apply(pre, theta, self.bandwidth).sum(-1).mean()
        fire_counts = column_stats(z.detach())[1]
        return self._output(u if target is None else target, x_hat, fire_counts,
                            {"l0_penalty": sparsity_coeff * l0})
