"""Steering the sparsity coefficient to a target L0 (``sae.target_l0``), Lightning-free.

Controller: the coefficient is ``base_coeff * warm-up * exp(log_scale)``; after each step the batch L0
(averaged over DDP ranks) updates an exponential moving average ``ema += EMA_WEIGHT * (L0 - ema)`` (the
first L0 seeds it), then an integral step in log space
``log_scale += clamp(RATE * (log(ema) - log(target)), -MAX_STEP, MAX_STEP)``: too many active latents raise
the coefficient, too few lower it, by the same factor for the same ratio at any scale of L0. The EMA damps
batch noise; the clamp bounds a step to a factor ``exp(MAX_STEP)``. With a two-sided sparsity term
(``two_sided=True``: JumpReLU's target term, which itself pushes L0 up under the target) the coefficient is
never lowered below its start (``log_scale >= 0``): under the target, lowering it would only weaken the term's
push back up, and a run that starts sparser than its target (JumpReLU's sparse start) would wind the
coefficient down to nothing on the way up and then overshoot (evidence: ``docs/decisions.md``). The state
(``log_scale``, ``ema``, ``updates``) is made of buffers of a module that ``SAEModule`` owns, so checkpoints
carry it and a resumed run continues bit-identically; the SAE folder does not hold it (it is training state,
not the model).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

RATE = 0.03  # log-coefficient change per step per unit of log(L0 / target)
EMA_WEIGHT = 0.1  # weight of the newest batch in the L0 average (a memory of ~10 steps)
MAX_STEP = 0.05  # largest change of log(coefficient) in one step (a factor of about 1.05)
L0_FLOOR = 1e-2  # log(L0) of a batch where nothing fired is taken at this L0, not -inf


class TargetL0(nn.Module):
    """Integral controller of the sparsity coefficient towards ``target`` L0; ``two_sided``: the sparsity
    term pushes L0 up under the target itself, so the coefficient stays at or above its start (module
    docstring)."""

    def __init__(self, target: float, two_sided: bool = False) -> None:
        super().__init__()
        self.target = float(target)
        self.two_sided = two_sided
        self.register_buffer("log_scale", torch.zeros((), dtype=torch.float64))
        self.register_buffer("ema", torch.zeros((), dtype=torch.float64))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def scale(self) -> float:
        """The factor on the coefficient: ``exp(log_scale)``."""
        return math.exp(float(self.log_scale))

    @torch.no_grad()
    def update(self, l0: Tensor | float) -> None:
        """One controller step after a training step whose L0 (mean over the whole batch) was ``l0``."""
        l0 = torch.as_tensor(l0, dtype=torch.float64, device=self.ema.device)
        self.ema.copy_(torch.where(self.updates == 0, l0, self.ema + EMA_WEIGHT * (l0 - self.ema)))
        error = self.ema.clamp(min=L0_FLOOR).log() - math.log(self.target)
        self.log_scale.add_((RATE * error).clamp(-MAX_STEP, MAX_STEP))
        if self.two_sided:
            self.log_scale.clamp_(min=0.0)
        self.updates.add_(1)
