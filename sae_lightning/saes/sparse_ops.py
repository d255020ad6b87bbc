"""Kernels for SAEs whose latents are k-sparse per token (TopK): only the active entries are touched.

``sparse_decode`` computes ``sum_j relu(pre[b, j]) * W_dec[index[b, j]]`` from the k chosen
pre-activations of each token (already computed by the dense encoder matmul, without grad) and
backpropagates to ``W_enc``, ``b_enc``, ``b_dec`` and ``W_dec`` through those k entries only:

- value gradients: k dot products per token, ``<grad_out[b], W_dec[index[b, j]]>`` (sampled matmul);
- ``grad W_dec = S^T @ grad_out`` and ``grad W_enc^T = G^T @ (x - b_dec)``, where ``S`` / ``G`` are
  [B, d_sae] matrices holding k values per row (latent values / pre-activation gradients): two
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


class LatentMajor:
    """The (token, latent) pairs of ``index`` [B, k] sorted by latent, as a CSR pattern of [d_sae, B].

    ``scatter(weights, rows)`` = ``out[i] = sum_{(b, j): index[b, j] = i} weights[b, j] * rows[b]``, one
    sparse-dense matmul; the sort is shared by every scatter with the same index.
    """

    def __init__(self, index: Tensor, d_sae: int) -> None:
        n_rows, k = index.shape
        flat = index.reshape(-1)
        self.order = flat.argsort()
        self.shape = (d_sae, n_rows)
        self.crow = torch.zeros(d_sae + 1, dtype=torch.long, device=index.device)
        self.crow[1:] = torch.bincount(flat, minlength=d_sae).cumsum(0)
        self.tokens = torch.div(self.order, k, rounding_mode="floor")

    def scatter(self, weights: Tensor, rows: Tensor) -> Tensor:
        values = weights.reshape(-1)[self.order]
        return _csr(self.crow, self.tokens, values, self.shape) @ rows


def gathered_dots(index: Tensor, rows: Tensor, table: Tensor) -> Tensor:
    """``out[b, j] = <rows[b], table[index[b, j]]>`` [B, k], a sampled matmul over the k entries per row."""
    n_rows, k = index.shape
    crow = torch.arange(0, n_rows * k + 1, k, device=index.device)
    pattern = _csr(crow, index.reshape(-1), rows.new_zeros(n_rows * k), (n_rows, table.shape[0]))
    return torch.sparse.sampled_addmm(pattern, rows, table.t(), beta=0.0).values().view(n_rows, k)


class _SparseDecode(torch.autograd.Function):
    """See the module docstring; ``pre`` are the chosen pre-activations [B, k] (no grad)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, w_dec: Tensor,
                index: Tensor, pre: Tensor) -> Tensor:
        values = torch.relu(pre).to(w_dec.dtype)
        ctx.save_for_backward(x, w_enc, b_dec, w_dec, index, values)
        return F.embedding_bag(index, w_dec, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, w_enc, b_dec, w_dec, index, values = ctx.saved_tensors
        grad_out = grad_out.contiguous().to(w_dec.dtype)
        d_sae = w_dec.shape[0]
        layout = LatentMajor(index, d_sae)
        grad_w_dec = layout.scatter(values, grad_out)
        grad_pre = gathered_dots(index, grad_out, w_dec) * (values > 0)
        grad_w_enc = layout.scatter(grad_pre, x.to(w_dec.dtype) - b_dec).t()
        grad_b_enc = grad_pre.new_zeros(d_sae).index_add_(0, index.reshape(-1), grad_pre.reshape(-1))
        grad_b_dec = -(w_enc @ grad_b_enc)
        return None, grad_w_enc, grad_b_enc, grad_b_dec, grad_w_dec, None, None


def sparse_decode(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, w_dec: Tensor, index: Tensor,
                  pre: Tensor) -> Tensor:
    """``sum_j relu(pre[b, j]) * w_dec[index[b, j]]`` [B, d_in] (no bias), where ``pre`` [B, k] are the
    pre-activations ``((x - b_dec) @ w_enc + b_enc)`` at ``index``; sparse backward (module docstring)."""
    return _SparseDecode.apply(x, w_enc, b_enc, b_dec, w_dec, index, pre)
