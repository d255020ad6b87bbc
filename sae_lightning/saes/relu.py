"""Standard ReLU SAE: pre-encoder bias, ReLU, loss = MSE + sparsity_coeff * L1.

``l1_variant``:
- ``plain``: L1 of the activations, decoder rows kept at unit norm (gradient projected, rows
  renormalised every step).
- ``decoder_norm`` (Anthropic, April 2024 update): L1 of activations weighted by their decoder row
  norms, ``sum_i z_i * ||W_dec[i]||``; the decoder is unconstrained and initialised with random rows
  of norm 0.1 and ``W_enc = W_dec^T``.
Both terms are means over tokens of sums over latents (SAELens scaling).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sae_lightning.config import SAEConfig
from sae_lightning.saes.base import SAE, SAEOutput, count_active
from sae_lightning.saes.registry import register

DECODER_NORM_INIT = 0.1  # April 2024 update: "random directions with a fixed L2 norm of 0.1"


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

    def l1(self, z: Tensor) -> Tensor:
        """Mean over tokens of ``sum_i z_i`` (plain) or ``sum_i z_i ||W_dec[i]||`` (decoder_norm); z >= 0."""
        if self.weighted_l1:
            return z.sum(0) @ torch.linalg.vector_norm(self.W_dec, dim=1) / z.shape[0]
        return z.sum() / z.shape[0]

    def forward(self, x: Tensor, *, sparsity_coeff: float, dead_mask: Tensor | None = None) -> SAEOutput:
        z = self.encode(x)
        x_hat = self.decode(z)
        return self._output(x, x_hat, count_active(z), {"l1": sparsity_coeff * self.l1(z)}, dead_mask)
