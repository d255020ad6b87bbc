"""The LightningModule: one SAE, its optimiser and schedules, dead-latent tracking and metric logging.

The SAE itself (``saes/``) is a plain ``nn.Module``; this class adds what training needs around it.
Hyperparameters hold only plain JSON values (the resolved config as a dict, ``d_in``, ``norm_scale``) so
checkpoints load under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import Tensor

from sae_lightning.config import TrainConfig
from sae_lightning.metrics import ReconstructionStats, batch_metrics
from sae_lightning.saes import SAE, build_sae


class NonFiniteError(FloatingPointError):
    """The loss or a weight became NaN/Inf; the message names the step and the quantity."""


def train_config_from_dict(config: dict[str, Any]) -> TrainConfig:
    """Rebuild (and re-validate) a ``TrainConfig`` from the plain dict stored in a checkpoint."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), config))


def lr_lambda(cfg: TrainConfig):
    """Learning-rate multiplier per step: linear warm-up, constant, then optional linear/cosine decay to 0."""
    warm, total, opt = cfg.optim.lr_warmup_steps, cfg.max_steps, cfg.optim
    decay_start = int(opt.lr_decay_start * total)

    def fn(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if opt.lr_decay == "none" or step < decay_start or total <= decay_start:
            return 1.0
        frac = min(1.0, (step - decay_start) / (total - decay_start))
        return 1.0 - frac if opt.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return fn


class SAEModule(L.LightningModule):
    """Trains ``build_sae(config.sae, d_in)`` on normalised activations (raw * ``norm_scale``)."""

    def __init__(self, config: dict[str, Any], d_in: int, norm_scale: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = train_config_from_dict(config)
        self.sae: SAE = build_sae(self.cfg.sae, d_in)
        self.register_buffer("tokens_since_fired", torch.zeros(self.sae.d_sae, dtype=torch.long))
        self.register_buffer("window_fire_counts", torch.zeros(self.sae.d_sae, dtype=torch.float64))
        self.register_buffer("window_tokens", torch.zeros((), dtype=torch.long))
        self._val_stats: ReconstructionStats | None = None

    # ----- latent bookkeeping ---------------------------------------------------------------------
    def dead_mask(self) -> Tensor:
        """Latents that have not fired on any of the last ``callbacks.dead_window_tokens`` tokens."""
        return self.tokens_since_fired >= self.cfg.callbacks.dead_window_tokens

    def _track_firing(self, fire_counts: Tensor, n_rows: int) -> None:
        """Update dead/density statistics with this step's counts, summed over every DDP rank."""
        counts = fire_counts.detach().to(self.window_fire_counts.dtype)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            n_rows *= self.trainer.world_size
        fired = counts > 0
        self.tokens_since_fired.add_(n_rows).masked_fill_(fired, 0)
        self.window_fire_counts.add_(counts)
        self.window_tokens.add_(n_rows)

    def densities(self, reset: bool = False) -> Tensor:
        """Per-latent firing frequency over the current density window (optionally starting a new window)."""
        dens = self.window_fire_counts / self.window_tokens.clamp(min=1)
        if reset:
            self.window_fire_counts.zero_()
            self.window_tokens.zero_()
        return dens.float()

    def sparsity_coeff(self) -> float:
        """``l1`` with the optional linear warm-up over ``optim.l1_warmup_steps``."""
        warm = self.cfg.optim.l1_warmup_steps
        scale = min(1.0, (self.global_step + 1) / warm) if warm else 1.0
        return self.cfg.l1 * scale

    # ----- training -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Initialise the decoder bias from a data sample on a fresh run (identical on every rank).

        On a resume the weights are already restored here but ``global_step`` is not yet (Lightning restores
        the loops after this hook), so ``trainer.ckpt_path`` is what tells a resume apart.
        """
        if self.global_step > 0 or self.trainer.ckpt_path is not None:
            return
        dm = self.trainer.datamodule
        sample = dm.sample(min(32_768, self.cfg.callbacks.resample_sample_rows)).to(self.device)
        self.sae.init_b_dec(sample)
        if self.trainer.world_size > 1:
            self.sae.b_dec.data = self.trainer.strategy.broadcast(self.sae.b_dec.data, src=0)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        coeff = self.sparsity_coeff()
        out = self.sae(batch, sparsity_coeff=coeff, dead_mask=self.dead_mask())
        self._check_finite(out.loss, out.terms)
        self._track_firing(out.fire_counts, batch.shape[0])
        if self.global_step % self.trainer.log_every_n_steps == 0:
            logs = {f"train/loss_{k}": v for k, v in out.terms.items()}
            batch_stats = batch_metrics(batch, out.x_hat.detach(), out.l0)
            logs.update({f"train/{k}": v for k, v in batch_stats.items()})
            logs["train/loss"] = out.loss.detach()
            logs["train/dead_fraction"] = self.dead_mask().float().mean()
            logs["train/sparsity_coeff"] = torch.tensor(coeff)
            self.log_dict(logs, prog_bar=False)
            self.log("l0", out.l0.detach(), prog_bar=True, logger=False)
        self.log("loss", out.loss.detach(), prog_bar=True, logger=False)
        return out.loss

    def _check_finite(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        """Stop with an error naming the step and every non-finite quantity (the NaN guard)."""
        if not self.cfg.callbacks.nan_guard or torch.isfinite(loss):
            return
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        bad += [n for n, p in self.sae.named_parameters() if not torch.isfinite(p).all()]
        raise NonFiniteError(
            f"Non-finite loss at step {self.global_step}: loss={loss.item()}; non-finite: "
            f"{', '.join(bad) or 'loss only'}. Training stopped; the last good checkpoint is kept. "
            f"Lower lr (now {self.cfg.lr}) or enable optim.grad_clip."
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Runs after AMP unscaling, before clipping: the SAE's gradient projection goes here."""
        self.sae.before_optimizer_step()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.after_optimizer_step()

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.Adam(self.sae.parameters(), lr=self.cfg.lr,
                               betas=(self.cfg.optim.beta1, self.cfg.optim.beta2))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----- validation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_stats = ReconstructionStats(self.cfg.callbacks.dense_threshold)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        z = self.sae.encode(batch)
        self._val_stats.update(batch, self.sae.decode(z), z)

    def on_validation_epoch_end(self) -> None:
        """Log whole-validation-set numbers: under DDP every rank's statistics are gathered and merged
        exactly (averaging per-rank explained variances would not give the set's)."""
        stats = self._val_stats
        if self.trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[ReconstructionStats | None] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, stats)
            stats = ReconstructionStats(self.cfg.callbacks.dense_threshold)
            for other in gathered:
                stats.merge(other)
        if stats.n_tokens == 0:
            return
        values = stats.compute()
        keys = ("mse", "nmse", "explained_variance", "l0", "cosine_sim", "dead_fraction")
        self.log_dict({f"val/{k}": float(values[k]) for k in keys if k in values})
