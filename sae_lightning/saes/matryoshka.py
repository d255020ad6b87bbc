"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries in one.

Latents are selected by BatchTopK over the whole dictionary (saes/batchtopk.py, with its inference
threshold and AuxK). For each prefix size ``m`` in ``sae.prefixes`` (strictly increasing, the last one
``d_sae``) the first ``m`` latents alone reconstruct the input, with the decoder bias:
``û_m = z[:, :m] @ W_dec[:m] + b_dec``. The loss is the SUM of the prefixes' reconstruction losses
(each ``mean_tokens ||û_m - u||^2``, as our MSE) plus AuxK on the full reconstruction's residual, as in
the paper and SAELens (``MatryoshkaBatchTopKTrainingSAE``). Terms: ``reconstruction`` (the full
dictionary) and ``reconstruction_p<m>`` for each smaller prefix. The prefix reconstructions are
cumulative sums of the blocks ``z[:, a:b] @ W_dec[a:b]``: one full decode's worth of FLOPs. With the
sparse kernels (``sae.sparse_kernel``, BatchTopK's rule) each block decodes its own kept entries, so the
blocks together touch each kept entry once.

Inference is BatchTopK's JumpReLU, so the SAE exports to SAELens as ``jumprelu``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sae_lightning.checks import check
from sae_lightning.saes.base import SAEOutput, Weights
from sae_lightning.saes.batchtopk import BatchTopKConfig, BatchTopKSAE
from sae_lightning.saes.registry import register


def default_prefixes(d_sae: int) -> list[int]:
    """``d_sae / 64, d_sae / 16, d_sae / 4, d_sae`` (rounded; sizes below 1 and repeats dropped)."""
    return sorted({max(1, round(d_sae / 4**j)) for j in range(4)})


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    """``sae=matryoshka``: BatchTopK's keys and ``prefixes``, the nested dictionary sizes (strictly
    increasing, the last equal to d_sae); empty: ``d_sae / 64, d_sae / 16, d_sae / 4, d_sae``.
    ``decoder_norm`` defaults to ``project``, not TopK's ``rescale``, which does worse under the nested
    losses (``docs/decisions.md``)."""

    architecture: str = "matryoshka"  # the registry name, fixed by the class
    decoder_norm: str = "project"  # not TopK's rescale (class docstring)
    prefixes: list[int] = field(default_factory=list)
    """nested dictionary sizes, the last d_sae; empty: default_prefixes"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(all(m > 0 for m in self.prefixes), "sae.prefixes", self.prefixes, "sizes must be > 0")
        check(all(a < b for a, b in zip(self.prefixes, self.prefixes[1:], strict=False)), "sae.prefixes",
              self.prefixes, "must be strictly increasing")


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE):
    """Matryoshka BatchTopK SAE: BatchTopK whose loss sums the reconstructions of nested prefixes of the
    dictionary (module docstring); ``prefixes`` are the resolved sizes, the last one ``d_sae``."""

    config_class = MatryoshkaConfig

    def __init__(self, cfg: MatryoshkaConfig, d_in: int, d_out: int | None = None) -> None:
        super().__init__(cfg, d_in, d_out)
        self.prefixes = list(cfg.prefixes) or default_prefixes(self.d_sae)
        check(self.prefixes[-1] == self.d_sae, "sae.prefixes", cfg.prefixes,
              f"the last prefix must be the dictionary size d_sae={self.d_sae}")

    def forward(self, u: Tensor, *, target: Tensor | None = None, sparsity_coeff: float,
                dead_mask: Tensor | None = None) -> SAEOutput:
        target = u if target is None else target
        w = self.weights()
        pre, flat, values, fire_counts = self.select(u, w)
        if self.sparse:
            x_hats = self.sparse_prefix_decodes(u, pre, flat, w)
        else:
            x_hats = self.prefix_decodes(self.dense_latents(pre, flat, values), u, w)
        n = u.shape[0]
        inner = {f"reconstruction_p{m}": (x_hat - target).pow(2).sum() / n
                 for m, x_hat in zip(self.prefixes[:-1], x_hats, strict=False)}
        full = x_hats[-1]
        auxk = self._auxk(u, target, full, pre, dead_mask, w)
        return self._output(target, full, fire_counts, {**inner, "auxk": auxk})

    def prefix_decodes(self, z: Tensor, u: Tensor, w: Weights) -> list[Tensor]:
        """``z[:, :m] @ W_dec[:m] + b_dec`` (+ the skip of the normalized input ``u``) for every prefix ``m``
        (normalized space, ``W_dec`` of the weights as used ``w``), smallest first."""
        out, x_hat, start = [], self.with_skip(self.b_dec.expand(u.shape[0], -1), u), 0
        for end in self.prefixes:
            x_hat = torch.addmm(x_hat, z[:, start:end], w.W_dec[start:end])
            out.append(x_hat)
            start = end
        return out

    def sparse_prefix_decodes(self, u: Tensor, pre: Tensor, flat: Tensor, w: Weights) -> list[Tensor]:
        """``prefix_decodes`` from the kept entries ``flat`` of ``pre`` by the sparse kernels, one block of
        latents ``[start, end)`` at a time."""
        out, x_hat, start = [], self.with_skip(self.b_dec.expand(u.shape[0], -1), u), 0
        for end in self.prefixes:
            x_hat = x_hat + self.decode_kept(u, pre, flat, w, latents=(start, end))
            out.append(x_hat)
            start = end
        return out

    @torch.no_grad()
    def prefix_reconstructions(self, x: Tensor) -> dict[int, Tensor]:
        """Raw-scale reconstructions of raw activations ``x`` by each prefix's latents alone (inference
        latents, ``encode``), keyed by prefix size; the last one equals ``decode(encode(x), x)``."""
        z = self.encode(x)
        scale = self.output_scale.to(z.dtype)
        x_hats = self.prefix_decodes(z, self.normalize(x), self.weights())
        return {m: x_hat / scale for m, x_hat in zip(self.prefixes, x_hats, strict=True)}
