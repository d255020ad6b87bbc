"""JumpReLU SAE (Rajamanoharan et al. 2024) trained with straight-through estimators (STEs).

``z = pre * H(pre - theta)`` with ``pre = (x - b_dec) @ W_enc + b_enc``, a learned per-latent threshold
``theta = exp(log_threshold)`` and Heaviside ``H``. The loss is ``mse + sparsity_coeff * L0`` with
``L0 = mean_tokens sum_i H(pre_i - theta_i)``, exactly the L0 the SAE reports. ``H`` has zero
derivative almost everywhere, so theta gets its gradient from the paper's pseudo-derivatives with a
rectangle kernel of width ``eps = cfg.jumprelu_bandwidth``:
``d z / d theta = -(theta / eps) * K((pre - theta) / eps)``, ``d H / d theta = -(1 / eps) * K(...)``,
``K(u) = 1[|u| < 1/2]``; ``d z / d pre = H(pre - theta)`` and H passes no gradient to ``pre``.
Decoder rows are kept at unit norm, as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from sae_lightning.config import SAEConfig
from sae_lightning.saes.base import SAE, SAEOutput, column_stats
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


@register("jumprelu")
class JumpReLUSAE(SAE):
    """See module docstring. ``threshold`` is a property over the trained ``log_threshold``."""

    def __init__(self, cfg: SAEConfig, d_in: int) -> None:
        super().__init__(cfg, d_in)
        self.bandwidth = cfg.jumprelu_bandwidth
        init = torch.full((self.d_sae,), math.log(cfg.jumprelu_init_threshold))
        self.log_threshold = nn.Parameter(init)

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre * (pre > self.threshold)

    def forward(self, x: Tensor, *, sparsity_coeff: float, dead_mask: Tensor | None = None) -> SAEOutput:
        pre = self.pre_acts(x)
        theta = self.threshold
        z = _JumpReLU.apply(pre, theta, self.bandwidth)
        x_hat = self.decode(z)
        l0 = _Step.apply(pre, theta, self.bandwidth).sum(-1).mean()
        fire_counts = column_stats(z.detach())[1]
        return self._output(x, x_hat, fire_counts, {"l0_penalty": sparsity_coeff * l0}, dead_mask)
