"""Kernels for SAEs whose latents are k-sparse per token (TopK): the backward touches only active entries.

With k active latents per token, the encoder's gradient is non-zero only at the k chosen
pre-activations of each row, so ``grad W_enc = (x - b_dec)^T @ G`` with a [B, d_sae] matrix ``G``
holding k entries per row: a scatter of B*k scaled input rows instead of a dense
[d_in, B] x [B, d_sae] matmul. Decoding with ``F.embedding_bag`` (rows of ``W_dec`` gathered by index,
weighted by the latent values) is sparse in both directions through PyTorch's own backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx


def scatter_rows(index: Tensor, weights: Tensor, rows: Tensor, n_out: int) -> Tensor:
    """``out[i] = sum over (b, j) with index[b, j] == i of weights[b, j] * rows[b]``; out is [n_out, d].

    A [n_out, B] sparse COO matrix times the dense ``rows`` [B, d]: no [B*k, d] temporary.
    """
    n_rows, k = index.shape
    src = torch.arange(n_rows, device=index.device).repeat_interleave(k)
    coo = torch.sparse_coo_tensor(torch.stack([index.reshape(-1), src]), weights.reshape(-1), (n_out, n_rows),
                                  check_invariants=False)  # indices are in range by construction
    return torch.sparse.mm(coo, rows)


class _GatherPreActs(torch.autograd.Function):
    """Pre-activations at chosen indices, ``((x - b_dec) @ W_enc + b_enc)[b, index[b, j]]``, given their
    values (already computed densely without grad); the backward is sparse (see module docstring).
    ``x`` gets no gradient: it is data."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, index: Tensor,
                values: Tensor) -> Tensor:
        ctx.save_for_backward(x, w_enc, b_dec, index)
        return values.clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, w_enc, b_dec, index = ctx.saved_tensors
        grad = grad.to(w_enc.dtype)
        d_sae = w_enc.shape[1]
        grad_b_enc = grad.new_zeros(d_sae).index_add_(0, index.reshape(-1), grad.reshape(-1))
        grad_w_enc = scatter_rows(index, grad, x.to(w_enc.dtype) - b_dec, d_sae).t()
        grad_b_dec = -(w_enc @ grad_b_enc) if ctx.needs_input_grad[3] else None
        return None, grad_w_enc, grad_b_enc, grad_b_dec, None, None


def gather_pre_acts(x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor, index: Tensor,
                    values: Tensor) -> Tensor:
    """Differentiable (w.r.t. ``w_enc``, ``b_enc``, ``b_dec``) view of precomputed pre-activations
    ``values`` [B, k] at ``index`` [B, k]; see ``_GatherPreActs``."""
    return _GatherPreActs.apply(x, w_enc, b_enc, b_dec, index, values)


def decode_rows(values: Tensor, index: Tensor, w_dec: Tensor) -> Tensor:
    """``sum_j values[b, j] * w_dec[index[b, j]]`` [B, d_in] (no bias), differentiable in values and w_dec."""
    return F.embedding_bag(index, w_dec, per_sample_weights=values.to(w_dec.dtype), mode="sum")
