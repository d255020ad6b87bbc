"""BatchTopK SAE (Bussmann et al. 2024): TopK over the whole batch in training, JumpReLU at inference.

Training: ``a = relu((x - b_dec) @ W_enc + b_enc)`` [B, d_sae]; the ``k * B`` largest entries of ``a``
over the whole batch are kept and the rest zeroed, so rows keep different numbers of latents and the
L0 averages (at most) k per token. AuxK on dead latents is TopK's (per row, ``aux_k`` dead latents).

Inference (``encode``) cannot depend on the other rows of a batch, so it is a JumpReLU with one global
threshold: ``z = pre * (pre > theta)``. ``theta`` is estimated during training from ``m_t``, the smallest
positive kept activation of batch t: the first batch sets ``theta = m_1``, later ones move it by an
exponential moving average ``theta <- (1 - threshold_lr) theta + threshold_lr m_t`` (SAELens's rule,
except that it starts at ``m_1`` instead of 0). Under DDP ``m_t`` is the minimum over every rank's
batch (each rank selects ``k * B_rank`` latents of its own rows), so all ranks keep the same theta.
``theta`` (buffer ``threshold``) and the number of batches it has seen (``threshold_batches``) are
saved with the weights; before any training ``theta = 0`` and ``encode`` is a plain ReLU.

Decoding (``sae.sparse_kernel``): ``dense`` scatters the kept values into [B, d_sae] and multiplies by
``W_dec``; ``sparse`` pads every row to the largest per-row count (pads are latent 0 with value 0, which
add nothing and get no gradient) and uses TopK's sparse kernels. ``auto`` is sparse when
``k <= d_sae / 32``: on CPU (``benchmarks/batchtopk_kernels.py``, d_in 512, d_sae 8192, batch 1024) the
padded sparse step was about 1.5x faster than the dense one at k = 16, 64, 256 (rows padded to 36, 94,
346 latents), as fast at k = 512 (655) and 1.26x slower at k = 1024 (1237), where TopK's rule
(``k <= d_sae / 8``) would still pick it. A trained SAE's rows spread more than these random ones,
so the padding grows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sae_lightning.checks import check
from sae_lightning.saes.base import SAEOutput
from sae_lightning.saes.registry import register
from sae_lightning.saes.topk import TopKConfig, TopKSAE

SPARSE_MAX_DENSITY = 1 / 32  # "auto" uses the sparse kernels when k / d_sae is at most this (measured)


@dataclass
class BatchTopKConfig(TopKConfig):
    """``sae=batchtopk``: TopK's keys (``k`` is now the mean number of latents per token over a batch)
    and ``threshold_lr``, the moving-average weight of each batch in the inference threshold."""

    architecture: str = "batchtopk"
    threshold_lr: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.threshold_lr <= 1, "sae.threshold_lr", self.threshold_lr, "must be in (0, 1]")


def batch_top(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices into ``pre.view(-1)`` of the ``k * B`` largest ``relu(pre)`` over the whole batch, sorted
    ascending (so row-major), and those ``relu(pre)`` values."""
    acts = torch.relu(pre).view(-1)
    n = min(k * pre.shape[0], acts.numel())
    flat = acts.topk(n, sorted=False).indices.sort().values
    return flat, acts[flat]


def padded_rows(flat: Tensor, values: Tensor, n_rows: int, d_sae: int) -> tuple[Tensor, Tensor]:
    """The row-major entries ``flat`` (indices into a [n_rows, d_sae] matrix) with their ``values`` (no
    grad) as [n_rows, m] latent indices and values, m the largest count of any row; pads are latent 0
    with value 0."""
    rows = torch.div(flat, d_sae, rounding_mode="floor")
    counts = torch.bincount(rows, minlength=n_rows)
    slot = torch.arange(flat.numel(), device=flat.device) - (counts.cumsum(0) - counts)[rows]
    width = max(int(counts.max()), 1)
    index, padded = flat.new_zeros(n_rows, width), values.new_zeros(n_rows, width)
    index[rows, slot] = flat - rows * d_sae
    padded[rows, slot] = values
    return index, padded


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """See module docstring. ``threshold`` is the global inference threshold (a buffer)."""

    config_class = BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, d_in: int, d_out: int | None = None) -> None:
        super().__init__(cfg, d_in, d_out)
        if cfg.sparse_kernel == "auto":
            self.sparse = cfg.k <= SPARSE_MAX_DENSITY * self.d_sae
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.long))

    def encode_normalized(self, u: Tensor) -> Tensor:
        pre = self.pre_acts(u)
        return pre * (pre > self.threshold.to(pre.dtype))

    def forward(self, u: Tensor, *, target: Tensor | None = None, sparsity_coeff: float,
                dead_mask: Tensor | None = None) -> SAEOutput:
        target = u if target is None else target
        pre, flat, values, fire_counts = self.select(u)
        if self.sparse:
            index, padded = padded_rows(flat, pre.view(-1)[flat], u.shape[0], self.d_sae)
            x_hat = self.with_skip(self._decode_top(u, padded, index) + self.b_dec, u)  # TopK's kernels
        else:
            x_hat = self.with_skip(self.decode_normalized(self.dense_latents(pre, flat, values)), u)
        auxk = self._auxk(u, target, x_hat, pre, dead_mask)
        return self._output(target, x_hat, fire_counts, {"auxk": auxk})

    def select(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The training selection: (pre-activations [B, d_sae], row-major flat indices of the kept entries,
        their relu'd values, per-latent fire counts); updates the threshold in training mode. Without grad
        on the sparse path: ``sparse_decode`` does its backward."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.sparse):
            pre = self.pre_acts(u)
        flat, values = batch_top(pre, self.k)
        with torch.no_grad():
            fire_counts = torch.bincount(flat[values > 0] % self.d_sae, minlength=self.d_sae)
            if self.training:
                self.update_threshold(values)
        return pre, flat, values, fire_counts

    @staticmethod
    def dense_latents(pre: Tensor, flat: Tensor, values: Tensor) -> Tensor:
        """The kept ``values`` at row-major indices ``flat`` of a zero matrix shaped like ``pre``."""
        return torch.zeros_like(pre).view(-1).index_put((flat,), values).view_as(pre)

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """One step of the threshold estimate (module docstring) from the kept values of a batch."""
        positive = kept[kept > 0]
        smallest = positive.min().double() if positive.numel() else kept.new_tensor(float("inf")).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        if torch.isinf(smallest):
            return
        lr = self.cfg.threshold_lr if self.threshold_batches > 0 else 1.0
        self.threshold.mul_(1 - lr).add_(lr * smallest)
        self.threshold_batches.add_(1)
