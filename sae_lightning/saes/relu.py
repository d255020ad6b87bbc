"""Standard ReLU SAE: pre-encoder bias, ReLU, loss = MSE + sparsity_coeff * L1.

``l1_variant``:
- ``plain``: L1 of the activations, decoder rows kept at unit norm (gradient projected, rows
  renormalised every step).
- ``decoder_norm`` (Anthropic, April 2024 update): L1 of activations weighted by their decoder row
  norms, ``sum_i z_i * ||W_dec[i]||``; the decoder is unconstrained and initialised with random rows
  of norm 0.1 and ``W_enc = W_dec^T``. The update also starts both biases at zero: ``conf/sae/relu_dn``
  sets ``b_dec_init: zeros``, since a centred ``b_dec`` trades L0 for MSE worse with this loss.
Both terms are means over tokens of sums over latents (SAELens scaling).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from sae_lightning.config import SAEConfig
from sae_lightning.saes.base import BLOCK_ROWS, SAE, SAEOutput, column_stats
from sae_lightning.saes.registry import register

DECODER_NORM_INIT = 0.1  # April 2024 update: "random directions with a fixed L2 norm of 0.1"


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
    """``z = relu((x - b_dec) @ W_enc + b_enc)``, ``x_hat = z @ W_dec + b_dec``."""

    def __init__(self, cfg: SAEConfig, d_in: int) -> None:
        weighted = cfg.l1_variant == "decoder_norm"
        super().__init__(cfg, d_in, decoder_init_norm=DECODER_NORM_INIT if weighted else 1.0,
                         unit_norm_decoder=not weighted)
        self.weighted_l1 = weighted

    def encode(self, x: Tensor) -> Tensor:
        """ReLU applied in place on the addmm result: no second [B, d_sae] buffer."""
        return torch.relu_(self.pre_acts(x))

    def l1(self, latent_sums: Tensor, n_rows: int) -> Tensor:
        """Mean over tokens of ``sum_i z_i`` (plain) or ``sum_i z_i ||W_dec[i]||`` (decoder_norm), from the
        per-latent sums of z over the batch (z >= 0, so |z| = z)."""
        if self.weighted_l1:
            return latent_sums @ torch.linalg.vector_norm(self.W_dec, dim=1) / n_rows
        return latent_sums.sum() / n_rows

    def forward(self, x: Tensor, *, sparsity_coeff: float, dead_mask: Tensor | None = None) -> SAEOutput:
        z, sums, fire_counts = _ReLUWithStats.apply(self.pre_acts(x))
        x_hat = self.decode(z)
        terms = {"l1": sparsity_coeff * self.l1(sums, x.shape[0])}
        return self._output(x, x_hat, fire_counts, terms, dead_mask)
