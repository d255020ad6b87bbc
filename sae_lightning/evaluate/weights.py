"""Per-latent numbers read off the SAE's weights alone (SAEBench's weight-based core metrics).

Directions are compared by cosine, so they do not depend on the input scale ``s``; ``encoder_norm`` is
reported for the SAE run on raw activations (``W_enc · s``, as in the SAELens export), the space SAEBench
evaluates in.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_lightning.saes.base import Weights

CHUNK = 1024  # rows compared at once: a [CHUNK, d_sae] block instead of the full d_sae² matrix


class SAEWeights(Protocol):
    """What is read here: ``weights()`` (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``
    as the model computes with them, ``saes.base.Weights``) and ``input_scale``."""

    input_scale: Tensor

    def weights(self) -> Weights: ...


@torch.no_grad()
def max_cosine_similarity(rows: Tensor, chunk: int = CHUNK) -> Tensor:
    """For each row ``v_i`` of ``rows [n, d]``: ``max_{j != i} cos(v_i, v_j)``, shape ``[n]`` (float32).

    Computed ``chunk`` rows at a time, so memory is ``chunk · n``, not ``n²``; a zero row has cosine 0
    with everything."""
    unit = F.normalize(rows.detach().float(), dim=-1)
    n = unit.shape[0]
    out = torch.empty(n, device=unit.device)
    for lo in range(0, n, chunk):
        sims = unit[lo:lo + chunk] @ unit.T  # [c, n]
        idx = torch.arange(sims.shape[0], device=unit.device)
        sims[idx, idx + lo] = -torch.inf  # not with itself
        out[lo:lo + chunk] = sims.max(dim=1).values
    return out


@torch.no_grad()
def latent_weight_stats(sae: SAEWeights) -> dict[str, Tensor]:
    """Per-latent ``[d_sae]`` tensors (float32, CPU), with ``e_i = W_enc[:, i]`` and ``d_i = W_dec[i]``:

    - ``encoder_norm = s ||e_i||`` (raw-activation units), ``encoder_bias = b_enc[i]``
    - ``encoder_decoder_cosine_sim = cos(e_i, d_i)`` (NaN for a transcoder: its decoder rows live in another
      space than its encoder columns)
    - ``max_encoder_cosine_sim = max_{j != i} cos(e_i, e_j)``, ``max_decoder_cosine_sim`` likewise for ``d``
    """
    used = sae.weights()  # as the model computes with them (a rescaled decoder's rows at unit norm)
    enc, dec = used.W_enc.detach().float().T, used.W_dec.detach().float()  # both [d_sae, d_in]
    stats = {
        "encoder_norm": enc.norm(dim=-1) * float(sae.input_scale),
        "encoder_bias": used.b_enc.detach().float(),
        "encoder_decoder_cosine_sim": (F.cosine_similarity(enc, dec, dim=-1) if enc.shape == dec.shape
                                       else enc.new_full((enc.shape[0],), float("nan"))),
        "max_encoder_cosine_sim": max_cosine_similarity(enc),
        "max_decoder_cosine_sim": max_cosine_similarity(dec),
    }
    return {name: t.cpu() for name, t in stats.items()}
