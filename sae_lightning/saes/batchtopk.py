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

Training selection: ``batch_top`` ranks only the entries above half the current inference threshold when
there are enough of them (exact: the same entries as ranking all B x d_sae; a full-batch ``topk`` is most
of the step on CPU).

Decoding (``sae.sparse_kernel``): ``dense`` scatters the kept values into [B, d_sae] and multiplies by
``W_dec``; ``sparse`` runs TopK's sparse kernels on the kept entries, whatever each row's count (CSR row
pointers, no padding). ``auto`` is TopK's rule (sparse when ``k <= d_sae / 8``): below that density the
sparse step is the faster one (``docs/decisions.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sae_lightning.checks import check
from sae_lightning.saes.base import SAEOutput, Weights
from sae_lightning.saes.registry import register
from sae_lightning.saes.sparse_ops import row_pointers
from sae_lightning.saes.topk import TopKConfig, TopKSAE

HINT_FRACTION = 0.5  # batch_top ranks only entries above this fraction of the inference threshold


@dataclass
class BatchTopKConfig(TopKConfig):
    """``sae=batchtopk``: TopK's keys (``k`` is now the mean number of latents per token over a batch)
    and ``threshold_lr``, the moving-average weight of each batch in the inference threshold."""

    architecture: str = "batchtopk"  # the registry name, fixed by the class
    threshold_lr: float = 0.01  # weight of each batch in the inference threshold's moving average

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.threshold_lr <= 1, "sae.threshold_lr", self.threshold_lr, "must be in (0, 1]")


def batch_top(pre: Tensor, k: int, hint: float = 0.0) -> tuple[Tensor, Tensor]:
    """Indices into ``pre.view(-1)`` of the ``k * B`` largest ``relu(pre)`` over the whole batch, sorted
    ascending (so row-major), and those ``relu(pre)`` values.

    ``hint`` > 0, a guess below the cut (the inference threshold is one), makes it faster and changes
    nothing: when at least ``k * B`` entries exceed it, the largest all do, so only those are ranked
    (a full ``topk`` over B x d_sae entries is most of a BatchTopK step on CPU); otherwise all are."""
    acts = torch.relu(pre).view(-1)
    n = min(k * pre.shape[0], acts.numel())
    candidates = (acts > hint).nonzero().squeeze(1) if hint > 0 else None
    if candidates is not None and candidates.numel() >= n:
        flat = candidates[acts[candidates].topk(n, sorted=False).indices].sort().values
    else:
        flat = acts.topk(n, sorted=False).indices.sort().values
    return flat, acts[flat]


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE: the ``k * B`` largest activations of a batch kept in training, a JumpReLU with one
    global threshold (the buffer ``threshold``, estimated during training) at inference (module docstring)."""

    config_class = BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig, d_in: int, d_out: int | None = None) -> None:
        super().__init__(cfg, d_in, d_out)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_batches", torch.zeros((), dtype=torch.long))

    def encode_normalized(self, u: Tensor) -> Tensor:
        pre = self.pre_acts(u)
        return pre * (pre > self.threshold.to(pre.dtype))

    def forward(self, u: Tensor, *, target: Tensor | None = None, sparsity_coeff: float,
                dead_mask: Tensor | None = None) -> SAEOutput:
        target = u if target is None else target
        w = self.weights()
        pre, flat, values, fire_counts = self.select(u, w)
        if self.sparse:
            x_hat = self.with_skip(self.decode_kept(u, pre, flat, w) + self.b_dec, u)
        else:
            x_hat = self.with_skip(torch.addmm(self.b_dec, self.dense_latents(pre, flat, values), w.W_dec), u)
        auxk = self._auxk(u, target, x_hat, pre, dead_mask, w)
        return self._output(target, x_hat, fire_counts, {"auxk": auxk})

    def select(self, u: Tensor, w: Weights) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The training selection by the weights as used ``w``: (pre-activations [B, d_sae], row-major flat
        indices of the kept entries, their relu'd values, per-latent fire counts); updates the threshold in
        training mode. Without grad on the sparse path: ``sparse_decode`` does its backward."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.sparse):
            pre = self.pre_acts(u, w=w)
        flat, values = batch_top(pre, self.k, hint=HINT_FRACTION * float(self.threshold))
        with torch.no_grad():
            fire_counts = torch.bincount(flat[values > 0] % self.d_sae, minlength=self.d_sae)
            if self.training:
                self.update_threshold(values)
        return pre, flat, values, fire_counts

    def decode_kept(self, u: Tensor, pre: Tensor, flat: Tensor, w: Weights,
                    latents: tuple[int, int] | None = None) -> Tensor:
        """The sparse kernels' decode (no bias) of the kept row-major entries ``flat`` of ``pre``, only
        those whose latent is in ``[start, end) = latents`` when given."""
        rows = torch.div(flat, self.d_sae, rounding_mode="floor")
        index = flat - rows * self.d_sae
        entries = pre.view(-1)[flat]
        if latents is not None:
            keep = (index >= latents[0]) & (index < latents[1])
            rows, index, entries = rows[keep], index[keep], entries[keep]
        crow = row_pointers(torch.bincount(rows, minlength=u.shape[0]))
        return self.decode_entries(u, crow, index, entries, w)

    @staticmethod
    def dense_latents(pre: Tensor, flat: Tensor, values: Tensor) -> Tensor:
        """The kept ``values`` at row-major indices ``flat`` of a zero matrix shaped like ``pre``."""
        return torch.zeros_like(pre).view(-1).index_put((flat,), values).view_as(pre)

    def training_logs(self) -> dict[str, Tensor]:
        """``threshold``: the inference threshold estimate, on the normalized input's scale."""
        return {"threshold": self.threshold.detach().float()}

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """One step of the threshold estimate (module docstring) from the kept values of a batch."""
        update_threshold(self.threshold, self.threshold_batches, kept, self.cfg.threshold_lr)


@torch.no_grad()
def update_threshold(threshold: Tensor, batches: Tensor, kept: Tensor, lr: float) -> None:
    """One step of the inference-threshold estimate (module docstring), in place on the scalar buffers
    ``threshold`` and ``batches`` (batches seen), from the kept values of a batch; shared with the
    cross-layer transcoder (``circuits/clt.py``)."""
    positive = kept[kept > 0]
    smallest = positive.min().double() if positive.numel() else kept.new_tensor(float("inf")).double()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    if torch.isinf(smallest):
        return
    step = lr if batches > 0 else 1.0
    threshold.mul_(1 - step).add_(step * smallest.to(threshold.dtype))
    batches.add_(1)
