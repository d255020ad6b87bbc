"""Standard ReLU SAE: pre-encoder bias, ReLU, unit-norm decoder rows, loss = reconstruction + l1 * L1.

``L1 = mean_tokens sum_i z_i`` (z >= 0). Decoder rows stay at unit norm (gradient projected, rows
renormalised every step). The encoder starts as ``W_dec^T`` scaled by ``min(1, 2 d_in / d_sae)``: with
``d_sae`` random unit directions and half of the latents active, ``W_enc = W_dec^T`` would start the
reconstruction ``d_sae / (2 d_in)`` times too large; this gain starts it at about the input's size.

``sae.ghost_grads=true`` adds ghost grads (Anthropic, January 2024) on dead latents.

p-annealing (Karvonen et al. 2024; dictionary_learning's ``PAnnealTrainer``), off by default
(``p_end == p_start == 1``): the penalty becomes ``S_p = mean_tokens sum_i w_i z_i^p`` (that trainer's
``Lp^p`` option; ``w_i = 1`` for relu, as there, where the decoder is unit-norm; ``||W_dec[i]||`` for relu_dn)
with p held at ``sae.p_start`` until the fraction ``sae.p_anneal_start`` of training, then linear to
``sae.p_end`` at the last step (:func:`p_at`; the reference updates p in a few steps, or every step with
``n_sparsity_updates="continuous"``, which we follow). Coefficient rescaling: the reference multiplies the
coefficient, at each change of p, by ``S_p_old / S_p_new`` measured on recent batches, so the penalty's size
does not jump; over many small changes that product telescopes to ``S_1 / S_p``. We use that ratio on the
current batch, detached: the term is ``coeff * (S_1 / S_p).detach() * S_p``, whose value is ``coeff * S_1``
(the L1 term's scale at every p) and whose gradient is the Lp^p penalty's. It needs no state to checkpoint
or to keep equal across DDP ranks; unlike the reference it also follows the latents at a fixed p. The term
keeps the key ``l1`` (logged ``train/loss_l1``: ``coeff * S_1``).

Kernels (``sae.sparse_kernel``): after the encoder's dense matmul, the sparse kernels (``sparse_ops``) run
the decoder, the penalty and the whole backward on the positive entries alone; the other latents are 0
and pass no gradient, so it is the same function with the same gradients. ``auto`` picks them in each step
whose batch has few positive entries (``sparse_ops.layout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from sae_lightning.checks import check
from sae_lightning.saes.base import (
    BLOCK_ROWS,
    SAE,
    PenalisedConfig,
    SAEOutput,
    column_stats,
    decoder_init,
)
from sae_lightning.saes.registry import register
from sae_lightning.saes.sparse_ops import Dense, Entries, layout


@dataclass
class ReLUConfig(PenalisedConfig):
    """``sae=relu``: the L1 coefficient is the root key ``l1``; ``p_start``/``p_end``/``p_anneal_start``
    anneal the penalty's exponent (module docstring)."""

    architecture: str = "relu"  # the registry name, fixed by the class
    ghost_grads: bool = False  # ghost grads (Anthropic, January 2024) on dead latents
    p_start: float = 1.0  # the penalty's exponent p until p_anneal_start (1: the L1 penalty)
    p_end: float = 1.0  # p at the last step, reached linearly (= p_start: no annealing)
    p_anneal_start: float = 0.5  # fraction of training where p starts to move

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 < self.p_start <= 1, "sae.p_start", self.p_start, "must be in (0, 1]")
        check(0 < self.p_end <= 1, "sae.p_end", self.p_end, "must be in (0, 1]")
        check(0 <= self.p_anneal_start < 1, "sae.p_anneal_start", self.p_anneal_start,
              "is the fraction of training where annealing starts: in [0, 1)")


def p_at(cfg: ReLUConfig, fraction: float) -> float:
    """The penalty's exponent at ``fraction`` of training: ``p_start`` up to ``p_anneal_start``, then linear
    to ``p_end`` at 1."""
    ramp = (fraction - cfg.p_anneal_start) / (1 - cfg.p_anneal_start)
    return cfg.p_start + (cfg.p_end - cfg.p_start) * min(1.0, max(0.0, ramp))


class _ReLUWithStats(torch.autograd.Function):
    """``z = relu(pre)`` in place, with per-latent sums of z (differentiable: the L1 terms are linear in
    them) and firing counts, from one blockwise pass. The backward folds the sums' gradient and the
    ReLU mask into the incoming gradient in place: no [B, d_sae] temporaries beyond the one autograd
    hands over (autograd alone would allocate two more: an add for the L1 term, a threshold mask)."""

    @staticmethod
    def forward(ctx: FunctionCtx, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z = pre.relu_()
        ctx.mark_dirty(pre)
        sums, counts = column_stats(z)  # float32 even under autocast: the L1 term stays precise
        ctx.mark_non_differentiable(counts)
        ctx.save_for_backward(z)
        return z, sums, counts

    @staticmethod
    def backward(ctx: FunctionCtx, grad_z: Tensor | None, grad_sums: Tensor | None, _: None) -> Tensor:
        (z,) = ctx.saved_tensors
        if grad_z is None:
            grad = z.new_zeros(z.shape)
        else:  # the decoder matmul's fresh output: ours to overwrite, unless autograd passed a view
            grad = grad_z if grad_z.is_contiguous() else grad_z.contiguous()
        buf = z.new_empty(min(BLOCK_ROWS, z.shape[0]), z.shape[1])
        for g, block in zip(grad.split(BLOCK_ROWS), z.split(BLOCK_ROWS), strict=True):
            if grad_sums is not None:
                g.add_(grad_sums.to(g.dtype))
            g.mul_(torch.sign(block, out=buf[: block.shape[0]]))
        return grad


@register("relu")
class ReLUSAE(SAE):
    """``z = relu((u - b_dec) @ W_enc + b_enc)``, ``û = z @ W_dec + b_dec``; after the encoder's matmul, the
    training step runs on the positive entries alone when few are (``sae.sparse_kernel``, ``sparse_ops``)."""

    config_class = ReLUConfig
    sparsity_key = "l1"

    decoder_norm: ClassVar[str] = "project"  # the decoder parametrisation (``decoder_init``): fixed per class

    def __init__(self, cfg: ReLUConfig, d_in: int, d_out: int | None = None) -> None:
        super().__init__(cfg, d_in, d_out=d_out, **decoder_init(self.decoder_norm, cfg, d_in))
        self.p = cfg.p_start

    def base_coeff(self, l1: float) -> float:
        return l1

    def set_progress(self, fraction: float) -> None:
        self.p = p_at(self.cfg, fraction)

    def encode_normalized(self, u: Tensor) -> Tensor:
        """ReLU applied in place on the addmm result: no second [B, d_sae] buffer."""
        return torch.relu_(self.pre_acts(u))

    def l1(self, latent_sums: Tensor, n_rows: int) -> Tensor:
        """Mean over tokens of ``sum_i z_i`` from the per-latent sums of z over the batch (z >= 0)."""
        return latent_sums.sum() / n_rows

    def forward(self, u: Tensor, *, target: Tensor | None = None, sparsity_coeff: float,
                dead_mask: Tensor | None = None) -> SAEOutput:
        target = u if target is None else target
        w = self.weights()
        pre = self.pre_acts(u, w=w)
        lat = layout(pre > 0, self.cfg.sparse_kernel)
        if isinstance(lat, Entries):
            z = torch.relu(lat.encode(u, w.W_enc, w.b_enc, self.input_center(), pre))
            sums, fire_counts = lat.latent_sums(z), lat.fire_counts(z)
        else:
            z, sums, fire_counts = _ReLUWithStats.apply(pre)
        x_hat = self.with_skip(lat.decode(z, w.W_dec, self.b_dec), u)
        penalty = self.l1(sums, u.shape[0]) if self.p == 1 else self.lp_penalty(z, lat, u.shape[0])
        terms = {"l1": sparsity_coeff * penalty, "ghost": self._ghost_loss(u, target, x_hat, dead_mask)}
        return self._output(target, x_hat, fire_counts, terms)

    def lp_penalty(self, z: Tensor, lat: Entries | Dense, n_rows: int) -> Tensor:
        """``(S_1 / S_p).detach() * S_p`` with ``S_p`` the Lp^p penalty (module docstring), z >= 0 the latents
        as laid out by ``lat``.

        ``z^p`` is taken on the non-zero entries only: its derivative ``p z^(p-1)`` is infinite at 0.
        """
        active = z > 0
        zp = torch.where(active, torch.where(active, z, 1.0).pow(self.p), 0.0)
        s_p = self.l1(lat.latent_sums(zp), n_rows)
        with torch.no_grad():
            s_1 = self.l1(lat.latent_sums(z), n_rows)
            ratio = s_1 / s_p.clamp(min=torch.finfo(s_p.dtype).tiny)
        return s_p * ratio

    def _ghost_loss(self, u: Tensor, target: Tensor, x_hat: Tensor,
                    dead_mask: Tensor | None) -> Tensor | None:
        """Ghost grads (Anthropic, Jan 2024) on the latents in ``dead_mask``; None if off, 0 if none dead.

        exp() of the dead latents' pre-activations, decoded without bias, rescaled (scale detached) to
        half the residual's norm, MSE against the (detached) residual, rescaled per token to the main
        reconstruction loss's value. Only dead latents' parameters get gradient (b_dec is detached here).
        """
        if not self.cfg.ghost_grads:
            return None
        if dead_mask is None or not bool(dead_mask.any()):
            return u.new_zeros(())
        dead = dead_mask.nonzero().squeeze(1)
        residual = (target - x_hat).detach()
        pre = torch.addmm(self.b_enc[dead], u - self.input_center().detach(), self.W_enc[:, dead])
        ghost_out = torch.exp(pre) @ self.W_dec[dead]
        scale = residual.norm(dim=-1, keepdim=True) / (2 * ghost_out.norm(dim=-1, keepdim=True) + 1e-8)
        ghost_mse = ((ghost_out * scale.detach() - residual) ** 2).sum(-1)
        main_mse = (residual**2).sum(-1)
        return (ghost_mse * (main_mse / (ghost_mse.detach() + 1e-8))).mean()
