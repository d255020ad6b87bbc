"""Per-prefix reconstruction numbers for nested (Matryoshka) SAEs: how well the first m latents alone
reconstruct the held-out rows, for every prefix size m the SAE was trained with.

Any SAE with a ``prefix_reconstructions(x) -> {m: x̂_m}`` method (raw activations in and out) qualifies;
the numbers are ``ReconstructionStats``'s, over the same held-out rows as the main metrics.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from sae_lightning.evaluate.pipeline import Rows
from sae_lightning.metrics import ReconstructionStats


def has_prefixes(sae: nn.Module) -> bool:
    return callable(getattr(sae, "prefix_reconstructions", None))


@torch.inference_mode()
def prefix_metrics(rows: Iterable[Rows], sae: nn.Module) -> dict[str, float]:
    """``nmse_p<m>`` and ``explained_variance_p<m>`` for each prefix size ``m`` of ``sae``."""
    stats: dict[int, ReconstructionStats] = {}
    param = next(sae.parameters())
    for batch in rows:
        x = batch.acts.to(device=param.device, dtype=param.dtype)
        for m, x_hat in sae.prefix_reconstructions(x).items():
            stats.setdefault(m, ReconstructionStats()).update(x, x_hat)
    out: dict[str, float] = {}
    for m, s in stats.items():
        values = s.compute()
        out |= {f"nmse_p{m}": values["nmse"], f"explained_variance_p{m}": values["explained_variance"]}
    return out
