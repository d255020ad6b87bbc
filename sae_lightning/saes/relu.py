"""Standard ReLU SAE: pre-encoder bias, ReLU, unit-norm decoder rows, loss = reconstruction + l1 * L1.

``L1 = mean_tokens sum_i z_i`` (z >= 0). Decoder rows stay at unit norm (gradient projected, rows
renormalised every step). The encoder starts as ``W_dec^T`` scaled by ``min(1, 2 d_in / d_sae)``: with
``d_sae`` random unit directions and half of the latents active, ``W_enc = W_dec^T`` would start the
reconstruction ``d_sae / (2 d_in)`` times too large; this gain starts it at about the input's size.

``sae.ghost_grads=true`` adds ghost grads (Anthropic, January 2024) on dead latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from sae_lightning.saes.base import BLOCK_ROWS, SAE, SAEConfig, SAEOutput, column_stats
from sae_lightning.saes.registry import register


@dataclass
class ReLUConfig(SAEConfig):
    """``sae=relu``: the L1 coefficient is the root key ``l1``."""

    architecture: str = "relu"
    ghost_grads: bool = False


class _ReLUWithStats(torch.autograd.Function):
    """``z = relu(pre)`` in place, with per-latent sums of z (differentiable: the L1 terms are linear in
    them) and firing counts, from one blockwise pass. The backward folds the sums' gradient and the
    ReLU mask into the incoming gradient in place: no [B, d_sae] temporaries beyond the one autograd
    hands over (autograd alone would allocate two more: an add for the L1 term, a threshold mask)."""

    @staticmethod
    def forward(ctx: FunctionCtx, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = pre.relu_()
        ctx.mark_dirty(pre)
        sums, counts = column_stats(z)  # float32 even under autocast: the L1 term stays precise
        ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(z)
        return z, sums, counts

    @staticmethod
    def backward(ctx: FunctionCtx, grad_z: Tensor | None, grad_sums: Tensor | None, _: None) -> Tensor:
        (z,) = ctx.saved_tensors
        if grad_z is None:
            grad = z.new_zeros(z.shape)
        else:  # the decoder matmul's fresh output: ours to overwrite, unless autograd passed a view
            grad = grad_z if grad_z.is_contiguous() else grad_z.contiguous()
        buf = z.new_empty(min(BLOCK_ROWS, z.shape[0]), z.shape[1])
        for g, block in zip(grad.split(BLOCK_ROWS), z.split(BLOCK_ROWS), strict=True):
            if grad_sums is not None:
                g.add_(grad_sums.to(g.dtype))
            g.mul_(torch.sign(block, out=buf[: block.shape[0]]))
        return grad


@register("relu")
class ReLUSAE(SAE):
    """``z = relu((u - b_dec) @ W_enc + b_enc)``, ``û = z @ W_dec + b_dec``."""

    config_class = ReLUConfig
    sparsity_key = "l1"

    def __init__(self, cfg: ReLUConfig, d_in: int, **init: float | bool) -> None:
        init.setdefault("encoder_gain", min(1.0, 2 * d_in / cfg.resolve_d_sae(d_in)))
        super().__init__(cfg, d_in, **init)

    def base_coeff(self, l1: float) -> float:
        return l1

    def encode_normalized(self, u: Tensor) -> Tensor:
        """ReLU applied in place on the addmm result: no second [B, d_sae] buffer."""
        return torch.relu_(self.pre_acts(u))

    def l1(self, latent_sums: Tensor, n_rows: int) -> Tensor:
        """Mean over tokens of ``sum_i z_i`` from the per-latent sums of z over the batch (z >= 0)."""
        return latent_sums.sum() / n_rows

    def forward(self, u: Tensor, *, sparsity_coeff: float, dead_mask: Tensor | None = None) -> SAEOutput:
        z, sums, fire_counts = _ReLUWithStats.apply(self.pre_acts(u))
        x_hat = self.decode_normalized(z)
        terms = {"l1": sparsity_coeff * self.l1(sums, u.shape[0]),
                 "ghost": self._ghost_loss(u, x_hat, dead_mask)}
        return self._output(u, x_hat, fire_counts, terms)

    def _ghost_loss(self, u: Tensor, x_hat: Tensor, dead_mask: Tensor | None) -> Tensor | None:
        """Ghost grads (Anthropic, Jan 2024) on the latents in ``dead_mask``; None if off, 0 if none dead.

        exp() of the dead latents' pre-activations, decoded without bias, rescaled (scale detached) to
        half the residual's norm, MSE against the (detached) residual, rescaled per token to the main
        reconstruction loss's value. Only dead latents' parameters get gradient (b_dec is detached here).
        """
        if not self.cfg.ghost_grads:
            return None
        if dead_mask is None or not bool(dead_mask.any()):
            return u.new_zeros(())
        dead = dead_mask.nonzero().squeeze(1)
        residual = (u - x_hat).detach()
        pre = torch.addmm(self.b_enc[dead], u - self.b_dec.detach(), self.W_enc[:, dead])
        ghost_out = torch.exp(pre) @ self.W_dec[dead]
        scale = residual.norm(dim=-1, keepdim=True) / (2 * ghost_out.norm(dim=-1, keepdim=True) + 1e-8)
        ghost_mse = ((ghost_out * scale.detach() - residual) ** 2).sum(-1)
        main_mse = (residual**2).sum(-1)
        return (ghost_mse * (main_mse / (ghost_mse.detach() + 1e-8))).mean()
