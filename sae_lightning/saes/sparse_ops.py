"""Kernels for SAEs whose latents are sparse per token: only the active entries are touched.

The entries are row-major, CSR-style (:class:`Entries`): row ``b`` holds entries ``crow[b]:crow[b + 1]``
with latent ``index[e]`` (TopK: k per row; BatchTopK and the penalised SAEs: any number, no padding). The
encoder's forward stays one dense matmul, computed without grad; everything after it runs on the entries:

- ``Entries.encode`` hands out the entries' pre-activations and backpropagates to ``W_enc``, ``b_enc`` and
  ``b_dec`` through them only: ``grad W_enc^T = G^T @ (x - b_dec)`` with ``G`` the [B, d_sae] matrix holding
  the entries' pre-activation gradients (one sparse-times-dense product), ``grad b_enc`` their per-latent
  sums, ``grad b_dec = -W_enc @ grad b_enc``; ``x`` gets no gradient (it is data);
- ``Entries.decode`` computes ``sum_{e in row b} v[e] * W_dec[index[e]]`` for values ``v`` [n_entries];
  the values' gradients are one dot product per entry, ``<grad_out[b], W_dec[index[e]]>`` (sampled matmul),
  and ``grad W_dec = S^T @ grad_out`` with ``S`` holding the values;
- what lies between (ReLU, JumpReLU's thresholds and straight-through estimators, the gated paths, the
  sparsity penalties) is ordinary autograd on [n_entries] tensors, the dense path's formulas on the entries.

The two sparse-times-dense products of the backward share one latent-sorted CSR layout (``LatentMajor``),
built once per step. They replace four dense [B, d_sae] x [d_sae, d_in]-sized matmuls; ``Dense`` is the
same interface on the whole [B, d_sae] matrix, the reference and the faster path while many latents fire.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from sae_lightning.saes.base import column_stats

KERNELS = ("auto", "sparse", "dense")  # the choices of sae.sparse_kernel
SPARSE_MAX_SHARE = 1 / 16  # "auto" (penalised SAEs) runs the sparse kernels when at most this share of a
# batch's [B, d_sae] entries is in play (docs/decisions.md)


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR matrix used only as a matmul operand (torch's "CSR support is in beta" warning muted)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def row_pointers(counts: Tensor) -> Tensor:
    """CSR row pointers [B + 1] of rows holding ``counts`` [B] entries each."""
    crow = counts.new_zeros(counts.numel() + 1)
    crow[1:] = counts.cumsum(0)
    return crow


def uniform_rows(n_rows: int, k: int, device: torch.device) -> Tensor:
    """Row pointers of ``n_rows`` rows of ``k`` entries each (TopK's [B, k] layout)."""
    return torch.arange(0, n_rows * k + 1, k, device=device)


class LatentMajor:
    """Row-major entries (token ``b`` of each from ``crow``, latent ``index``) sorted by latent, as a CSR
    pattern of [d_sae, B].

    ``scatter(weights, rows)`` = ``out[i] = sum_{entries e: index[e] = i} weights[e] * rows[token(e)]``, one
    sparse-dense matmul; the sort is shared by every scatter with the same entries.
    """

    def __init__(self, crow: Tensor, index: Tensor, d_sae: int) -> None:
        tokens = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=index.device), crow.diff(),
                                         output_size=index.numel())
        self.order = index.argsort()
        self.shape = (d_sae, crow.numel() - 1)
        self.crow = row_pointers(torch.bincount(index, minlength=d_sae))
        self.tokens = tokens[self.order]

    def scatter(self, weights: Tensor, rows: Tensor) -> Tensor:
        return _csr(self.crow, self.tokens, weights[self.order], self.shape) @ rows


def gathered_dots(crow: Tensor, index: Tensor, rows: Tensor, table: Tensor) -> Tensor:
    """``out[e] = <rows[token(e)], table[index[e]]>`` [n_entries] for the row-major entries (``crow``,
    ``index``): a sampled matmul over the entries only."""
    pattern = _csr(crow, index, rows.new_zeros(index.numel()), (rows.shape[0], table.shape[0]))
    return torch.sparse.sampled_addmm(pattern, rows, table.t(), beta=0.0).values()


class _EncodeEntries(torch.autograd.Function):
    """The entries' pre-activations (given: computed without grad by the dense encoder matmul) with the
    encoder's backward through the entries only (module docstring)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor,
                entries: Entries, pre: Tensor) -> Tensor:
        ctx.save_for_backward(x, w_enc, b_dec)
        ctx.entries = entries
        return pre.clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_pre: Tensor) -> tuple[Tensor | None, ...]:
        x, w_enc, b_dec = ctx.saved_tensors
        entries: Entries = ctx.entries
        grad_pre = grad_pre.to(w_enc.dtype)
        grad_b_enc = entries.latent_sums(grad_pre, w_enc.dtype)
        grad_w_enc = entries.layout.scatter(grad_pre, x.to(w_enc.dtype) - b_dec).t() \
            if ctx.needs_input_grad[1] else None
        grad_b_dec = -(w_enc @ grad_b_enc) if ctx.needs_input_grad[3] else None
        return None, grad_w_enc, grad_b_enc if ctx.needs_input_grad[2] else None, grad_b_dec, None, None


class _EncodeGiven(torch.autograd.Function):
    """Dense pre-activations ``(x - b_dec) @ w_enc + b_enc`` [B, n] computed earlier without grad, with the
    encoder's backward of that matmul: ``grad w_enc = (x - b_dec)^T @ G``, ``grad b_enc`` the column sums of
    ``G``, ``grad b_dec = -w_enc @ grad b_enc`` (``x`` is data)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
                pre: Tensor) -> Tensor:
        ctx.save_for_backward(x, w_enc, b_dec)
        return pre.clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad_pre: Tensor) -> tuple[Tensor | None, ...]:
        x, w_enc, b_dec = ctx.saved_tensors
        grad_pre = grad_pre.to(w_enc.dtype)
        grad_b_enc = grad_pre.sum(0)
        grad_w_enc = (x.to(w_enc.dtype) - b_dec).t() @ grad_pre if ctx.needs_input_grad[1] else None
        grad_b_dec = -(w_enc @ grad_b_enc) if ctx.needs_input_grad[3] else None
        return None, grad_w_enc, grad_b_enc if ctx.needs_input_grad[2] else None, grad_b_dec, None


def encode_given(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, pre: Tensor) -> Tensor:
    """``pre`` = ``(x - b_dec) @ w_enc + b_enc`` (given, computed without grad: a sparse step's encoder
    matmul), differentiable in ``w_enc``, ``b_enc`` and ``b_dec`` as if computed here: the forward matmul is
    not run again."""
    return _EncodeGiven.apply(x, w_enc, b_enc, b_dec, pre.detach())


class _DecodeEntries(torch.autograd.Function):
    """``out[b] = sum_{e in row b} values[e] * w_dec[index[e]]`` with the backward through the entries only
    (module docstring)."""

    @staticmethod
    def forward(ctx: FunctionCtx, values: Tensor, w_dec: Tensor, entries: Entries) -> Tensor:
        values = values.to(w_dec.dtype)
        ctx.save_for_backward(values, w_dec)
        ctx.entries = entries
        return F.embedding_bag(entries.index, w_dec, entries.crow[:-1], per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        values, w_dec = ctx.saved_tensors
        entries: Entries = ctx.entries
        grad_out = grad_out.contiguous().to(w_dec.dtype)
        grad_values = gathered_dots(entries.crow, entries.index, grad_out, w_dec) \
            if ctx.needs_input_grad[0] else None
        grad_w_dec = entries.layout.scatter(values, grad_out) if ctx.needs_input_grad[1] else None
        return grad_values, grad_w_dec, None


class Entries:
    """Row-major entries of a [B, d_sae] latent matrix (module docstring): row ``b`` holds entries
    ``crow[b]:crow[b + 1]``, latents ``index``. Tensors of the latents are [n_entries], one value per entry;
    per-latent tensors ([d_sae]) are read at the entries with :meth:`per_entry`."""

    def __init__(self, crow: Tensor, index: Tensor, d_sae: int, rows: Tensor | None = None) -> None:
        self.crow, self.index, self.d_sae, self.rows = crow, index, d_sae, rows
        self._layout: LatentMajor | None = None

    @classmethod
    def where(cls, mask: Tensor) -> Entries:
        """The entries where ``mask`` [B, d_sae] is True."""
        rows, index = mask.nonzero(as_tuple=True)
        return cls(row_pointers(torch.bincount(rows, minlength=mask.shape[0])), index, mask.shape[1], rows)

    @property
    def layout(self) -> LatentMajor:
        """The latent-sorted layout shared by the backward's scatters (built on first use)."""
        if self._layout is None:
            self._layout = LatentMajor(self.crow, self.index, self.d_sae)
        return self._layout

    def encode(self, x: Tensor, w_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor, pre: Tensor) -> Tensor:
        """The entries of ``pre`` [B, d_sae] (``(x - b_dec) @ w_enc + b_enc``, ``b_enc`` None when ``pre`` has
        no bias), differentiable in ``w_enc``, ``b_enc`` and ``b_dec`` through the entries only."""
        return _EncodeEntries.apply(x, w_enc, b_enc, b_dec, self, pre.detach()[self.rows, self.index])

    def encode_values(self, x: Tensor, w_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor,
                      pre: Tensor) -> Tensor:
        """As :meth:`encode`, from the entries' pre-activations ``pre`` [n_entries] (without grad)."""
        return _EncodeEntries.apply(x, w_enc, b_enc, b_dec, self, pre.detach())

    def per_entry(self, per_latent: Tensor) -> Tensor:
        """A per-latent tensor [d_sae] read at each entry's latent."""
        return per_latent[self.index]

    def decode(self, values: Tensor, w_dec: Tensor, bias: Tensor | None = None) -> Tensor:
        """``values @ w_dec (+ bias)`` [B, d_out] of the entries' ``values``."""
        out = _DecodeEntries.apply(values, w_dec, self)
        return out if bias is None else out + bias

    def latent_sums(self, values: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Per-latent sums [d_sae] of the entries' ``values`` (float32 by default, like ``column_stats``)."""
        return values.new_zeros(self.d_sae, dtype=dtype).index_add_(0, self.index, values.to(dtype))

    def fire_counts(self, values: Tensor) -> Tensor:
        """Rows in which each latent is non-zero [d_sae] (int64)."""
        return torch.bincount(self.index[values.detach() != 0], minlength=self.d_sae)


class Dense:
    """:class:`Entries`'s interface on the whole [B, d_sae] matrix: the dense reference."""

    @staticmethod
    def encode(x: Tensor, w_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor, pre: Tensor) -> Tensor:
        """``pre`` itself (computed with grad by the dense matmul)."""
        return pre

    @staticmethod
    def per_entry(per_latent: Tensor) -> Tensor:
        return per_latent

    @staticmethod
    def decode(values: Tensor, w_dec: Tensor, bias: Tensor | None = None) -> Tensor:
        return values @ w_dec if bias is None else torch.addmm(bias, values, w_dec)

    @staticmethod
    def latent_sums(values: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return values.sum(0, dtype=dtype)

    @staticmethod
    def fire_counts(values: Tensor) -> Tensor:
        return column_stats(values.detach())[1]


def layout(in_play: Tensor, kernel: str) -> Entries | Dense:
    """How this step computes the latents whose entries ``in_play`` [B, d_sae] may be non-zero or need a
    gradient: ``Entries.where(in_play)`` under ``kernel`` ``sparse``, and under ``auto`` when the batch's
    share of them is at most ``SPARSE_MAX_SHARE`` (dense while a run is still dense); else ``Dense``."""
    if kernel == "dense" or (kernel == "auto"
                             and int(torch.count_nonzero(in_play)) > SPARSE_MAX_SHARE * in_play.numel()):
        return Dense()
    return Entries.where(in_play)


def sparse_decode(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, w_dec: Tensor, crow: Tensor,
                  index: Tensor, pre: Tensor) -> Tensor:
    """``out[b] = sum_{e in row b} relu(pre[e]) * w_dec[index[e]]`` [B, d_in] (no bias) over row-major
    entries: row ``b`` holds entries ``crow[b]:crow[b + 1]`` (any number per row), ``index`` their latents
    and ``pre`` [n_entries] their pre-activations ``((x - b_dec) @ w_enc + b_enc)``; sparse backward
    (module docstring)."""
    entries = Entries(crow, index, w_dec.shape[0])
    return entries.decode(torch.relu(entries.encode_values(x, w_enc, b_enc, b_dec, pre)), w_dec)
