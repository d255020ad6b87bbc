"""Anthropic's April 2024 update of the standard SAE: L1 weighted by decoder row norms.

``L1 = mean_tokens sum_i z_i ||W_dec[i]||``; the decoder is unconstrained. The update's init: random
decoder rows of norm 0.1, ``W_enc = W_dec^T``, both biases at zero (``b_dec_init`` defaults to ``zeros``;
the evidence is in ``docs/decisions.md``). SAELens's ``standard`` SAE trains the same loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_lightning.saes.registry import register
from sae_lightning.saes.relu import ReLUConfig, ReLUSAE


@dataclass
class ReLUDecoderNormConfig(ReLUConfig):
    """``sae=relu_dn``: the L1 coefficient is the root key ``l1``."""

    architecture: str = "relu_dn"  # the registry name, fixed by the class
    b_dec_init: str = "zeros"  # the update's start: b_dec at zero (module docstring)


@register("relu_dn")
class ReLUDecoderNormSAE(ReLUSAE):
    """:class:`ReLUSAE` with the decoder-norm-weighted L1 and an unconstrained decoder."""

    config_class = ReLUDecoderNormConfig
    decoder_norm = "free"

    def l1(self, latent_sums: Tensor, n_rows: int) -> Tensor:
        """Mean over tokens of ``sum_i z_i ||W_dec[i]||``."""
        return latent_sums @ torch.linalg.vector_norm(self.W_dec, dim=1) / n_rows
