"""Feature recovery: how well an SAE's decoder rows match a known dictionary (``activations=synthetic``).

Formulas (docs/metrics.md, "Feature recovery"), with ``C[i, j] = cos(true feature i, decoder row j)``:

- ``recovery_mean_max_cos = mean_i max_j C[i, j]``
- ``frac_features_recovered = #{i : max_j C[i, j] >= threshold} / n_features``
- ``frac_latents_unmatched = #{j : max_i C[i, j] < threshold} / d_sae``

The cosine is signed: a decoder row pointing against a feature cannot reconstruct its non-negative
coefficients. Cosines ignore row norms, so the activations' normalization scale does not matter.
"""

from __future__ import annotations

import torch
from torch import Tensor

RECOVERY_THRESHOLD = 0.9
BLOCK = 1024  # true features per block: the cosine matrix is never held whole


@torch.no_grad()
def feature_recovery(decoder: Tensor, dictionary: Tensor, threshold: float = RECOVERY_THRESHOLD
                     ) -> dict[str, float]:
    """Recovery metrics of ``decoder [d_sae, d]`` (rows are latent directions) against the true
    ``dictionary [n_features, d]``; zero rows have cosine 0 with everything."""
    if decoder.shape[1] != dictionary.shape[1]:
        raise ValueError(f"decoder rows have width {decoder.shape[1]} but the true dictionary has "
                         f"{dictionary.shape[1]}: they must live in the same space")
    dec = torch.nn.functional.normalize(decoder.detach().double(), dim=1)
    true = torch.nn.functional.normalize(dictionary.detach().to(dec), dim=1)
    best_for_feature = []
    best_for_latent = torch.full((dec.shape[0],), -1.0, dtype=dec.dtype)
    for block in true.split(BLOCK):
        cos = block @ dec.T
        best_for_feature.append(cos.max(dim=1).values)
        best_for_latent = torch.maximum(best_for_latent, cos.max(dim=0).values)
    best = torch.cat(best_for_feature)
    return {"recovery_mean_max_cos": float(best.mean()),
            "frac_features_recovered": float((best >= threshold).double().mean()),
            "frac_latents_unmatched": float((best_for_latent < threshold).double().mean())}
