"""Decoder-bias initialisation: the geometric median (Weiszfeld) or the mean of a sample of activations.

The geometric median is the point minimising the sum of Euclidean distances to the sample; unlike the
mean it is not dragged by a few outlier-norm rows (e.g. BOS-like positions), which is why Towards
Monosemanticity initialises ``b_dec`` with it.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

_MEDIANS: dict[tuple[str, tuple[int, ...], str], Tensor] = {}  # sample digest -> its geometric median
_MEDIANS_KEPT = 4


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-6, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's iteration on rows of ``points`` [n, d]; stops when a step is below ``tol`` times the
    median row norm (a scale that outliers do not inflate).

    Each step re-weights the rows by the inverse of their distance to the current estimate; ``eps``
    keeps the weight finite when the estimate lands on a data point. The weighted sum is one
    matrix-vector product, and the differences to the estimate reuse one buffer: a fresh [n, d] float64
    temporary per step would be mapped and zeroed by the OS each time.
    """
    pts = points.to(torch.float64)
    y = pts.mean(0)
    scale = pts.norm(dim=1).median().clamp(min=eps)
    diff = torch.empty_like(pts)
    for _ in range(max_iter):
        w = 1.0 / torch.sub(pts, y, out=diff).norm(dim=1).clamp(min=eps)
        y_next = (w @ pts) / w.sum()
        done = (y_next - y).norm() <= tol * scale
        y = y_next
        if done:
            break
    return y.to(points.dtype)


def decoder_bias_init(sample: Tensor, method: str) -> Tensor:
    """``b_dec`` initial value from ``sample`` [n, d_in] for ``method`` in geometric_median | mean | zeros."""
    if method == "geometric_median":
        return _shared_geometric_median(sample)
    if method == "mean":
        return sample.mean(0)
    if method == "zeros":
        return sample.new_zeros(sample.shape[1])
    raise ValueError(f"Unknown b_dec_init={method!r}: choose geometric_median, mean or zeros")


def _shared_geometric_median(sample: Tensor) -> Tensor:
    """``geometric_median(sample)``, computed once for equal samples: the SAEs of a group that read one
    slot start from the same rows, and Weiszfeld's iteration costs about as much as several training
    steps. Keyed by the sample's bytes (dtype and shape included), so only an identical sample is reused.
    SHA-256 reads the bytes about twice as fast as BLAKE2 where the CPU has SHA instructions, and the key
    is taken once per SAE of a group."""
    cpu = sample.detach().cpu().contiguous()
    key = (hashlib.sha256(cpu.view(torch.uint8).numpy()).hexdigest(), tuple(cpu.shape), str(cpu.dtype))
    if key not in _MEDIANS:
        if len(_MEDIANS) >= _MEDIANS_KEPT:
            del _MEDIANS[next(iter(_MEDIANS))]
        _MEDIANS[key] = geometric_median(sample).cpu()
    return _MEDIANS[key].to(sample.device).clone()
