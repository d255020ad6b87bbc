"""Kernels for SAEs whose latents are sparse per token (TopK, BatchTopK): only the active entries are touched.

The chosen entries are row-major, CSR-style: row ``b`` holds entries ``crow[b]:crow[b + 1]`` with latent
``index[e]`` and pre-activation ``pre[e]`` (TopK: k per row; BatchTopK: any number, no padding).
``sparse_decode`` computes ``sum_{e in row b} relu(pre[e]) * W_dec[index[e]]`` from those pre-activations
(already computed by the dense encoder matmul, without grad) and backpropagates to ``W_enc``, ``b_enc``,
``b_dec`` and ``W_dec`` through the entries only:

- value gradients: one dot product per entry, ``<grad_out[b], W_dec[index[e]]>`` (sampled matmul);
- ``grad W_dec = S^T @ grad_out`` and ``grad W_enc^T = G^T @ (x - b_dec)``, where ``S`` / ``G`` are
  [B, d_sae] matrices holding the entries' values (latent values / pre-activation gradients): two
  sparse-times-dense products sharing one latent-sorted CSR layout, instead of three dense
  [B, d_sae] x [d_sae, d_in]-sized matmuls;
- ``x`` gets no gradient (it is data).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx


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


class _SparseDecode(torch.autograd.Function):
    """See the module docstring; ``pre`` are the chosen pre-activations [n_entries] (no grad)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, w_dec: Tensor,
                crow: Tensor, index: Tensor, pre: Tensor) -> Tensor:
        values = torch.relu(pre).to(w_dec.dtype)
        ctx.save_for_backward(x, w_enc, b_dec, w_dec, crow, index, values)
        return F.embedding_bag(index, w_dec, crow[:-1], per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, w_enc, b_dec, w_dec, crow, index, values = ctx.saved_tensors
        grad_out = grad_out.contiguous().to(w_dec.dtype)
        d_sae = w_dec.shape[0]
        layout = LatentMajor(crow, index, d_sae)
        grad_w_dec = layout.scatter(values, grad_out)
        grad_pre = gathered_dots(crow, index, grad_out, w_dec) * (values > 0)
        grad_w_enc = layout.scatter(grad_pre, x.to(w_dec.dtype) - b_dec).t()
        grad_b_enc = grad_pre.new_zeros(d_sae).index_add_(0, index, grad_pre)
        grad_b_dec = -(w_enc @ grad_b_enc)
        return None, grad_w_enc, grad_b_enc, grad_b_dec, grad_w_dec, None, None, None


def sparse_decode(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, w_dec: Tensor, crow: Tensor,
                  index: Tensor, pre: Tensor) -> Tensor:
    """``out[b] = sum_{e in row b} relu(pre[e]) * w_dec[index[e]]`` [B, d_in] (no bias) over row-major
    entries: row ``b`` holds entries ``crow[b]:crow[b + 1]`` (any number per row), ``index`` their latents
    and ``pre`` [n_entries] their pre-activations ``((x - b_dec) @ w_enc + b_enc)``; sparse backward
    (module docstring)."""
    return _SparseDecode.apply(x, w_enc, b_enc, b_dec, w_dec, crow, index, pre)
