"""The SAE contract (``SAEOutput``, ``SAE``) and what every architecture shares.

Loss scaling (same as SAELens, so its coefficients transfer): ``mse = ((x_hat - x)**2).sum(-1).mean()``
(sum over d_in, mean over tokens); every sparsity term is a mean over tokens of a sum over latents,
multiplied by the ``sparsity_coeff`` the caller passes each step.

Weights use SAELens names and shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``
(rows are latent directions), ``b_dec [d_in]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_lightning.config import SAEConfig
from sae_lightning.saes.init import decoder_bias_init

BLOCK_ROWS = 256  # row blocks for passes over [B, d_sae] tensors: a reused buffer stays in cache


@torch.no_grad()
def column_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-latent sums (float32) and non-zero counts (int64) over the rows of ``z`` [B, d_sae], z >= 0.

    One blockwise pass in float32 (exact counts also when z is bf16/fp16 under autocast): each block is
    copied into a small reused buffer, summed with a ones-vector matmul, replaced by its ``sign`` and
    summed again. ``count_nonzero`` instead converts the whole [B, d_sae] mask to int64 (8 bytes per
    entry), several times slower at training batch sizes.
    """
    n_rows = min(BLOCK_ROWS, z.shape[0])
    buf = z.new_empty(n_rows, z.shape[1], dtype=torch.float32)
    ones = buf.new_ones(1, n_rows)
    sums, counts = buf.new_zeros(1, z.shape[1]), buf.new_zeros(1, z.shape[1])
    with torch.autocast(z.device.type, enabled=False):
        for block in z.split(n_rows):
            n = block.shape[0]
            b = buf[:n].copy_(block)
            sums.addmm_(ones[:, :n], b)
            counts.addmm_(ones[:, :n], b.sign_())
    return sums[0], counts[0].round().long()


@dataclass
class SAEOutput:
    """What one training forward returns (see docs/design.md, section saes/)."""

    x_hat: Tensor  # [B, d_in]
    loss: Tensor  # scalar, what the optimizer minimises
    terms: dict[str, Tensor]  # detached scalars for logging
    fire_counts: Tensor  # [d_sae] rows of the batch where each latent was non-zero (int64)
    l0: Tensor  # scalar, mean number of non-zero latents per row


class SAE(nn.Module):
    """Base class: parameters, pre-encoder bias, decoder-norm constraint, ghost grads, output assembly.

    Subclasses implement ``encode`` and ``forward``. With ``unit_norm_decoder`` the decoder rows are kept
    at unit norm: ``before_optimizer_step`` removes the gradient component parallel to each row and
    ``after_optimizer_step`` renormalises the rows.
    """

    def __init__(self, cfg: SAEConfig, d_in: int, *, decoder_init_norm: float = 1.0,
                 unit_norm_decoder: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_in = d_in
        self.d_sae = cfg.resolve_d_sae(d_in)
        self.unit_norm_decoder = unit_norm_decoder
        w_dec = torch.randn(self.d_sae, d_in)
        w_dec *= decoder_init_norm / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        # Encoder initialised as the decoder's transpose and stored latent-major (``W_enc.t()`` is
        # contiguous): each latent's encoder column is contiguous, and sparse kernels that produce the
        # gradient as [d_sae, d_in] hand it over without a transposing copy.
        self.W_enc = nn.Parameter(w_dec.clone().t())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # ----- the contract ---------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [B, d_sae]."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """``z @ W_dec + b_dec`` as one fused addmm."""
        return torch.addmm(self.b_dec, z, self.W_dec)

    def forward(self, x: Tensor, *, sparsity_coeff: float, dead_mask: Tensor | None = None) -> SAEOutput:
        raise NotImplementedError

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove from each decoder row's gradient its component along that row (unit-norm decoders only)."""
        grad = self.W_dec.grad
        if not self.unit_norm_decoder or grad is None:
            return
        w = self.W_dec
        # row-wise dot products as a batched matmul: linalg.vecdot materialises a [d_sae, d_in] product
        along = torch.bmm(grad.unsqueeze(1), w.unsqueeze(2)).view(-1)
        coef = along / torch.linalg.vector_norm(w, dim=1).square()
        grad.addcmul_(coef[:, None], w, value=-1.0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows to unit norm (unit-norm decoders only)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True))

    @torch.no_grad()
    def init_b_dec(self, sample: Tensor) -> None:
        """Set ``b_dec`` from an activation sample [n, d_in] using ``cfg.b_dec_init``."""
        self.b_dec.copy_(decoder_bias_init(sample.to(self.b_dec), self.cfg.b_dec_init))

    # ----- shared pieces --------------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``(x - b_dec) @ W_enc + b_enc`` [B, d_sae].

        Computed as ``x @ W_enc + (b_enc - b_dec @ W_enc)`` in one addmm: the same function, but the
        backward needs no [B, d_sae] x [d_sae, d_in] matmul for the gradient of ``x - b_dec`` (a
        matrix-vector product gives b_dec's share), which saves a sixth of a dense step's FLOPs.
        """
        return torch.addmm(self.b_enc - self.b_dec @ self.W_enc, x, self.W_enc)

    def _ghost_loss(self, x: Tensor, x_hat: Tensor, dead_mask: Tensor | None) -> Tensor | None:
        """Ghost grads (Anthropic, Jan 2024) on the latents in ``dead_mask``; None if off, 0 if none dead.

        exp() of the dead latents' pre-activations, decoded without bias, rescaled (scale detached) to
        half the residual's norm, MSE against the (detached) residual, rescaled per token to the main
        MSE's value. Only dead latents' parameters get gradient (b_dec is detached here).
        """
        if not self.cfg.ghost_grads:
            return None
        if dead_mask is None or not bool(dead_mask.any()):
            return x.new_zeros(())
        dead = dead_mask.nonzero().squeeze(1)
        residual = (x - x_hat).detach()
        pre = torch.addmm(self.b_enc[dead], x - self.b_dec.detach(), self.W_enc[:, dead])
        ghost_out = torch.exp(pre) @ self.W_dec[dead]
        scale = residual.norm(dim=-1, keepdim=True) / (2 * ghost_out.norm(dim=-1, keepdim=True) + 1e-8)
        ghost_mse = ((ghost_out * scale.detach() - residual) ** 2).sum(-1)
        main_mse = (residual**2).sum(-1)
        return (ghost_mse * (main_mse / (ghost_mse.detach() + 1e-8))).mean()

    def _output(self, x: Tensor, x_hat: Tensor, fire_counts: Tensor, terms: dict[str, Tensor | None],
                dead_mask: Tensor | None) -> SAEOutput:
        """Sum MSE, the given loss ``terms`` (None = absent) and ghost grads into an ``SAEOutput``."""
        mse = F.mse_loss(x_hat, x, reduction="sum") / x.shape[0]
        parts = {"mse": mse, **terms, "ghost": self._ghost_loss(x, x_hat, dead_mask)}
        parts = {name: t for name, t in parts.items() if t is not None}
        loss = torch.stack(list(parts.values())).sum()
        l0 = fire_counts.sum() / x.shape[0]
        logged = {name: t.detach() for name, t in parts.items()} | {"l0": l0}
        return SAEOutput(x_hat=x_hat, loss=loss, terms=logged, fire_counts=fire_counts, l0=l0)
