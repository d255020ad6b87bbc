"""Dead-latent resampling exactly as in Towards Monosemanticity (Bricken et al., 2023).

At each configured step, latents that have not fired over the dead-tracking window are re-initialised:
- sample inputs (independently, with replacement) with probability proportional to the squared loss;
- decoder row = that input, normalised to unit norm;
- encoder column = the same direction scaled to 0.2 x the mean encoder norm of the alive latents;
- encoder bias = 0, an architecture's other per-latent parameters (gated's ``r_mag``/``b_mag``, JumpReLU's
  threshold) back at their initial values, and Adam's moments of every touched entry reset to zero.
Under DDP rank 0 draws the inputs and broadcasts them, so every rank applies the same change.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)


@torch.no_grad()
def resample_dead_latents(sae: torch.nn.Module, dead: Tensor, inputs: Tensor,
                          optimizer: torch.optim.Optimizer | None,
                          generator: torch.Generator | None = None) -> Tensor:
    """Re-initialise ``dead`` latents of ``sae`` from ``inputs``; returns the chosen rows [n_dead, d_in]."""
    idx = dead.nonzero().squeeze(1)
    if idx.numel() == 0:
        return inputs[:0]
    x_hat = sae.decode(sae.encode(inputs))
    weights = ((x_hat - inputs) ** 2).sum(-1).square()
    if not torch.isfinite(weights).all() or weights.sum() <= 0:
        weights = torch.ones_like(weights)
    pick = torch.multinomial(weights.double().cpu(), idx.numel(), replacement=True,
                             generator=generator).to(inputs.device)
    chosen = inputs[pick]
    apply_resample(sae, idx, chosen, optimizer)
    return chosen


@torch.no_grad()
def apply_resample(sae: torch.nn.Module, idx: Tensor, chosen: Tensor,
                   optimizer: torch.optim.Optimizer | None) -> None:
    """Write the prescribed weights for latents ``idx`` from their chosen inputs; reset their Adam state."""
    alive = torch.ones(sae.d_sae, dtype=torch.bool, device=idx.device)
    alive[idx] = False
    enc_norms = sae.weights().W_enc.norm(dim=0)  # as used: a rescaled decoder's norms are in it
    alive_norm = enc_norms[alive].mean() if alive.any() else enc_norms.mean()
    direction = chosen / chosen.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    sae.W_dec[idx] = direction.to(sae.W_dec.dtype)
    sae.W_enc[:, idx] = (direction * 0.2 * alive_norm).T.to(sae.W_enc.dtype)
    sae.b_enc[idx] = 0.0
    extra = {name: getattr(sae, name) for name in sae.latent_init_values()}
    for name, value in sae.latent_init_values().items():
        extra[name][idx] = value
    if optimizer is not None:
        _reset_adam(optimizer, sae.W_dec, (idx, slice(None)))
        _reset_adam(optimizer, sae.W_enc, (slice(None), idx))
        for param in (sae.b_enc, *extra.values()):
            _reset_adam(optimizer, param, (idx,))


def _reset_adam(optimizer: torch.optim.Optimizer, param: Tensor, index: tuple) -> None:
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][index] = 0.0


class ResampleDeadLatents(L.Callback):
    """Calls :func:`resample_dead_latents` at ``steps`` on ``n_rows`` freshly sampled training rows, for the
    module's SAE number ``trainee`` (a group has one such callback per member that resamples)."""

    def __init__(self, steps: list[int], n_rows: int, seed: int = 0, trainee: int = 0) -> None:
        self.steps = set(steps)
        self.n_rows = n_rows
        self.seed = seed
        self.trainee = trainee

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        slot = pl_module.trainees()[self.trainee]
        if step not in self.steps or not slot.active:
            return
        latents, name = slot.trainee.latents, slot.prefix.rstrip("/") or "SAE"
        dead = latents.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            log.info("step %d: [%s] no dead latents to resample", step, name)
            return
        inputs = trainer.datamodule.sample_slots(self.n_rows)[slot.slot].to(pl_module.device)
        if trainer.world_size > 1:
            inputs = trainer.strategy.broadcast(inputs, src=0)
        gen = torch.Generator().manual_seed(self.seed + step)
        optimizer = trainer.optimizers[slot.optimizer]
        resample_dead_latents(slot.trainee.sae, dead, inputs, optimizer, generator=gen)
        latents.tokens_since_fired[dead] = 0
        pl_module.log(f"{slot.prefix}train/resampled", float(n_dead))
        log.info("step %d: [%s] resampled %d dead latents", step, name, n_dead)
