"""One SAE training step, without Lightning: what ``SAEModule`` runs each step and what the benchmarks time.

``train_step`` = normalize the raw batch -> forward (loss terms) -> NaN guard -> backward -> the SAE's
gradient projection -> gradient-norm clipping -> optimizer step -> the SAE's renormalisation -> firing
statistics. The gradient norm is clipped per optimizer parameter group by default: JumpReLU's thresholds are
a group of their own and take the whole L0 term's gradient, which under one global norm would shrink the
encoder's and decoder's steps whenever the coefficient is large (evidence: ``docs/decisions.md``).
``clip_scope="global"`` (``optim.grad_clip_scope``) clips one norm over all parameters, as SAELens does.
``LatentStats`` tracks which latents are dead (for AuxK, ghost grads and resampling) and the firing
densities; its buffers are saved in checkpoints with the weights.

Two "dead" numbers exist and are named apart: ``dead_fraction_window`` (here: no firing in the last
``dead_window_tokens`` training tokens) and ``dead_fraction`` (metrics.py: no firing on a whole
evaluation set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from sae_lightning.checks import UserError
from sae_lightning.saes import SAE, SAEOutput

DATA_INIT_ROWS = 32_768  # training rows sampled for the data-dependent start (SAE.init_from_data)
FUSED_ADAM_DEVICES = ("cpu", "cuda")  # where torch's fused Adam kernel runs


def adam(groups: Iterable[dict[str, Any]]) -> torch.optim.Adam:
    """Adam over parameter ``groups`` as every training run builds it: torch's fused kernel (one pass over
    each parameter and its two moments; the reference loop makes about eight, which on a CPU costs as much
    as a sixth of a TopK step) when every parameter is a floating tensor on a device that has it, else the
    reference loop. Both compute Adam's update; they differ in rounding only (the last bit of a float32).
    A checkpoint keeps the choice it was trained with: ``load_state_dict`` restores the group's ``fused``."""
    groups = list(groups)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in FUSED_ADAM_DEVICES for p in params)
    return torch.optim.Adam(groups, fused=fused or None)


class NonFiniteError(UserError, FloatingPointError):
    """The loss or a weight became NaN/Inf; the message names the step and the quantity."""


class LatentStats(nn.Module):
    """Per-latent firing bookkeeping over training: tokens since each latent last fired, and fire counts
    over the current density window. Counts passed to :meth:`update` must already be summed over ranks."""

    def __init__(self, d_sae: int, dead_window_tokens: int) -> None:
        super().__init__()
        self.dead_window_tokens = dead_window_tokens
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.register_buffer("window_fire_counts", torch.zeros(d_sae, dtype=torch.float64))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, fire_counts: Tensor, n_rows: int) -> None:
        counts = fire_counts.detach().to(self.window_fire_counts.dtype)
        self.tokens_since_fired.add_(n_rows).masked_fill_(counts > 0, 0)
        self.window_fire_counts.add_(counts)
        self.window_tokens.add_(n_rows)

    def dead_mask(self) -> Tensor:
        """Latents that fired on none of the last ``dead_window_tokens`` training tokens."""
        return self.tokens_since_fired >= self.dead_window_tokens

    def densities(self, reset: bool = False) -> Tensor:
        """Per-latent firing frequency over the density window (optionally starting a new window)."""
        dens = self.window_fire_counts / self.window_tokens.clamp(min=1)
        if reset:
            self.window_fire_counts.zero_()
            self.window_tokens.zero_()
        return dens.float()


def warmup_scale(step: int, warmup_steps: int) -> float:
    """Linear warm-up factor of the sparsity coefficient: ``(step + 1) / warmup_steps``, capped at 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def nonfinite_message(out: SAEOutput, sae: SAE, step: int) -> str:
    """What the NaN guard reports: the step and every non-finite quantity."""
    bad = [k for k, v in out.terms.items() if not torch.isfinite(v).all()]
    bad += [n for n, p in sae.named_parameters() if not torch.isfinite(p).all()]
    return (f"Non-finite loss at step {step}: loss={out.loss.item()}; non-finite: "
            f"{', '.join(bad) or 'loss only'}. Training stopped; the last good checkpoint is kept."
            " Lower lr or enable optim.grad_clip.")


def check_finite(out: SAEOutput, sae: SAE, step: int) -> None:
    """The NaN guard: raise naming the step and every non-finite quantity, before any weight changes."""
    if not torch.isfinite(out.loss):
        raise NonFiniteError(nonfinite_message(out, sae, step))


def forward_step(sae: SAE, x: Tensor, stats: LatentStats, *, coeff: float,
                 target: Tensor | None = None) -> SAEOutput:
    """The forward of a training step on the raw batch ``x`` (and a transcoder's raw ``target``)."""
    y = None if target is None else sae.normalize_target(target)
    return sae(sae.normalize(x), target=y, sparsity_coeff=coeff, dead_mask=stats.dead_mask())


def clip_gradients(groups: list[list[Tensor]], grad_clip: float, clip_scope: str = "group") -> None:
    """Clip the gradient norm of each parameter group (``SAE.param_groups``: module docstring), or one norm
    over all of them (``clip_scope="global"``); nothing when ``grad_clip`` is 0."""
    if grad_clip > 0:
        for params in groups if clip_scope == "group" else [[p for g in groups for p in g]]:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)


def finish_step(sae: SAE, fire_counts: Tensor, stats: LatentStats, n_rows: int,
                reduce_counts: Callable[[Tensor], tuple[Tensor, int]] | None = None) -> None:
    """After the optimizer step: the SAE's renormalisation and the firing statistics (``fire_counts``, an
    ``SAEOutput``'s) of ``n_rows`` rows (times the world size)."""
    sae.after_optimizer_step()
    counts, world = reduce_counts(fire_counts) if reduce_counts else (fire_counts, 1)
    stats.update(counts, n_rows * world)


def apply_step(sae: SAE, optimizer: torch.optim.Optimizer, out: SAEOutput, stats: LatentStats, n_rows: int, *,
               grad_clip: float, clip_scope: str = "group",
               reduce_counts: Callable[[Tensor], tuple[Tensor, int]] | None = None) -> None:
    """After the backward: the SAE's gradient projection, clipping, the optimizer step, then
    :func:`finish_step`."""
    sae.before_optimizer_step()
    clip_gradients([g["params"] for g in optimizer.param_groups], grad_clip, clip_scope)
    optimizer.step()
    finish_step(sae, out.fire_counts, stats, n_rows, reduce_counts)


def train_step(sae: SAE, optimizer: torch.optim.Optimizer, x: Tensor, stats: LatentStats, *,
               coeff: float, grad_clip: float, step: int, clip_scope: str = "group", nan_guard: bool = True,
               backward: Callable[[Tensor], None] = Tensor.backward,
               reduce_counts: Callable[[Tensor], tuple[Tensor, int]] | None = None,
               target: Tensor | None = None) -> SAEOutput:
    """One optimisation step on the raw batch ``x`` [B, d_in] (a transcoder's raw ``target`` [B, d_out]
    too); returns the forward's ``SAEOutput``.

    ``backward`` and ``optimizer`` may be Lightning's (``manual_backward``, a ``LightningOptimizer``) so
    that DDP gradient averaging and precision plugins apply. ``reduce_counts(fire_counts)`` returns the
    counts summed over ranks and the multiplier of the row count (the world size).
    """
    out = forward_step(sae, x, stats, coeff=coeff, target=target)
    if nan_guard:
        check_finite(out, sae, step)
    optimizer.zero_grad(set_to_none=True)
    backward(out.loss)
    apply_step(sae, optimizer, out, stats, x.shape[0], grad_clip=grad_clip, clip_scope=clip_scope,
               reduce_counts=reduce_counts)
    return out
