"""TopK SAE (Gao et al., OpenAI 2024): keep the k largest pre-activations, AuxK loss on dead latents.

``z = relu(topk_k((x - b_dec) @ W_enc + b_enc))``, decoder rows at unit norm. The sparsity is fixed
by k (``sae.k``): TopK has no sparsity coefficient, and the root key ``l1`` is refused. AuxK: the
residual ``e = x - x_hat`` (detached) is
reconstructed, without bias, from the ``aux_k`` largest pre-activations among dead latents; the term
is ``aux_coeff * mean_tokens ||e - e_hat||^2`` (sum over d_in, like our MSE), zero when none are dead.

Decoder norm (``sae.decoder_norm``): ``rescale`` (default, as SAELens) keeps the decoder rows as free
parameters initialised at norm 0.1 (encoder = their transpose) and computes with them divided by their
norms, the norms multiplied into the encoder (``SAE.weights``); ``project`` keeps the rows at unit norm
by gradient projection and renormalisation after each step (Gao et al.). The function is the same; the
optimisation is not: Adam steps on different parameters, from rows at norm 0.1 instead of 1.

``b_dec_init`` defaults to the geometric median of a data sample, so the encoder sees centred inputs from
the first step: on a residual stream, whose few outlier dimensions hold most of the norm as a near-constant
offset, a zero start spends the early steps (and many latents) learning that offset. The evidence for
these defaults is in ``docs/decisions.md``.

Two implementations of the same function (``sae.sparse_kernel``): ``dense`` scatters the k
values into a [B, d_sae] matrix and decodes with a matmul (the reference); ``sparse`` decodes only
the k active rows and backpropagates only through the k active entries (``sparse_ops``). The encoder
forward is a dense matmul in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sae_lightning.checks import check
from sae_lightning.saes.base import FREE_INIT_NORM, SAE, SAEConfig, SAEOutput, Weights
from sae_lightning.saes.registry import register
from sae_lightning.saes.sparse_ops import encode_given, sparse_decode, uniform_rows

SPARSE_MAX_DENSITY = 1 / 8  # "auto" uses the sparse kernels when k / d_sae is at most this


@dataclass
class TopKConfig(SAEConfig):
    """``sae=topk``: ``k`` active latents per token; AuxK with ``aux_k`` dead latents, weight ``aux_coeff``;
    ``sparse_kernel``: auto | sparse | dense; ``decoder_norm``: rescale | project; ``b_dec_init`` the
    geometric median (module docstring)."""

    architecture: str = "topk"  # the registry name, fixed by the class
    k: int = 32  # active latents per token
    aux_k: int = 512  # dead latents AuxK reconstructs the residual from, per token
    aux_coeff: float = 1.0 / 32  # AuxK's weight in the loss
    sparse_kernel: str = "auto"  # auto (sparse when k <= d_sae / 8) | sparse | dense
    decoder_norm: str = "rescale"  # rescale: free rows used at unit norm | project: rows kept at unit norm

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.k > 0, "sae.k", self.k, "must be > 0")
        check(self.aux_k > 0, "sae.aux_k", self.aux_k, "must be > 0")
        check(self.aux_coeff >= 0, "sae.aux_coeff", self.aux_coeff, "must be >= 0")
        check(self.sparse_kernel in ("auto", "sparse", "dense"), "sae.sparse_kernel", self.sparse_kernel,
              "choose auto, sparse or dense")
        check(self.decoder_norm in ("rescale", "project"), "sae.decoder_norm", self.decoder_norm,
              "choose rescale or project")


@register("topk")
class TopKSAE(SAE):
    """TopK SAE: the ``sae.k`` largest pre-activations of each token kept (after a ReLU), AuxK on dead latents
    (module docstring); ``self.sparse`` says which implementation ``forward`` uses."""

    config_class = TopKConfig
    sparsity_key = "sae.k"

    def __init__(self, cfg: TopKConfig, d_in: int, d_out: int | None = None) -> None:
        rescale = cfg.decoder_norm == "rescale"
        super().__init__(cfg, d_in, d_out=d_out, rescaled_decoder=rescale,
                         decoder_init_norm=FREE_INIT_NORM if rescale else 1.0)
        check(cfg.k <= self.d_sae, "sae.k", cfg.k, f"exceeds the dictionary size d_sae={self.d_sae}")
        self.k = cfg.k
        auto = cfg.k <= SPARSE_MAX_DENSITY * self.d_sae
        self.sparse = cfg.sparse_kernel == "sparse" or (cfg.sparse_kernel == "auto" and auto)

    def encode_normalized(self, u: Tensor) -> Tensor:
        pre = self.pre_acts(u)
        top, index = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(1, index, torch.relu(top))

    def forward(self, u: Tensor, *, target: Tensor | None = None, sparsity_coeff: float,
                dead_mask: Tensor | None = None) -> SAEOutput:
        target = u if target is None else target
        w = self.weights()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.sparse):
            pre = self.pre_acts(u, w=w)  # without grad on the sparse path: sparse_decode does its backward
        top, index = pre.topk(self.k, dim=-1, sorted=False)
        x_hat = self.with_skip(self._decode_top(u, top, index, w) + self.b_dec, u)
        with torch.no_grad():  # latents with a non-positive top value are zero after the ReLU
            fired = index.masked_fill(top <= 0, self.d_sae).reshape(-1)
            fire_counts = torch.bincount(fired, minlength=self.d_sae + 1)[: self.d_sae]
        auxk = self._auxk(u, target, x_hat, pre, dead_mask, w)
        return self._output(target, x_hat, fire_counts, {"auxk": auxk})

    def _decode_top(self, x: Tensor, top: Tensor, index: Tensor, w: Weights) -> Tensor:
        """``sum_j relu(top[:, j]) * W_dec[index[:, j]]`` (no bias): sparse kernels or the dense reference."""
        if self.sparse:
            crow = uniform_rows(top.shape[0], top.shape[1], top.device)
            return self.decode_entries(x, crow, index.reshape(-1), top.reshape(-1), w)
        z = top.new_zeros(top.shape[0], self.d_sae).scatter(1, index, torch.relu(top))
        return z @ w.W_dec

    def decode_entries(self, x: Tensor, crow: Tensor, index: Tensor, pre: Tensor, w: Weights) -> Tensor:
        """The sparse kernels' decode (no bias) of row-major entries: row ``b`` keeps latents
        ``index[crow[b]:crow[b + 1]]`` with pre-activations ``pre[...]`` (saes/sparse_ops.py), by the
        weights as used ``w``."""
        return sparse_decode(x, w.W_enc, w.b_enc, self.input_center(), w.W_dec, crow, index, pre)

    def _auxk(self, x: Tensor, target: Tensor, x_hat: Tensor, pre: Tensor,
              dead_mask: Tensor | None, w: Weights) -> Tensor:
        """AuxK term (module docstring) on the residual ``target - x_hat``; 0 when ``dead_mask`` is None or
        all False.

        The sparse kernels decode the ``aux_k`` entries per row only when they are a small share of the dead
        latents (the rule that picks the main path); otherwise, e.g. 200 dead latents of which all are
        kept, a dense product over the dead columns alone (``B x n_dead x d_in``) is several times cheaper
        than ``B x n_dead`` sparse entries. Same function either way."""
        if dead_mask is None or not bool(dead_mask.any()):
            return x.new_zeros(())
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(self.cfg.aux_k, dead.numel())
        residual = (target - x_hat).detach()
        if self.sparse and k_aux <= SPARSE_MAX_DENSITY * dead.numel():
            top, pos = pre[:, dead].topk(k_aux, dim=-1, sorted=False)
            e_hat = self._decode_top(x, top, dead[pos], w)
        else:
            e_hat = self._decode_dead(x, pre, dead, k_aux, w)
        return self.cfg.aux_coeff * (e_hat - residual).pow(2).sum(-1).mean()

    def _decode_dead(self, x: Tensor, pre: Tensor, dead: Tensor, k_aux: int, w: Weights) -> Tensor:
        """``relu(topk_{k_aux}(pre[:, dead])) @ W_dec[dead]`` (no bias) with dense products over the dead
        latents only; when ``pre`` has no grad (sparse path), its dead columns get the encoder's backward
        without running the forward matmul again (``encode_given``)."""
        sub = Weights(w.W_enc[:, dead], w.b_enc[dead], w.W_dec[dead])
        pre_dead = pre[:, dead] if pre.requires_grad else \
            encode_given(x, sub.W_enc, sub.b_enc, self.input_center(), pre[:, dead])
        if k_aux < dead.numel():
            top, pos = pre_dead.topk(k_aux, dim=-1, sorted=False)
            z = torch.zeros_like(pre_dead).scatter(1, pos, torch.relu(top))
        else:
            z = torch.relu(pre_dead)
        return z @ sub.W_dec
