"""Feature-density monitoring: dead/dense fractions and a density histogram, logged periodically."""

from __future__ import annotations

import lightning as L
import torch

from sae_lightning.train.loggers import loggers_for


class DensityMonitor(L.Callback):
    """Every ``every_n_steps`` logs the fraction of latents that fired on more than ``dense_threshold`` of
    the window's tokens, and a log10-density histogram to W&B when it is used (dead latents are
    ``train/dead_fraction_window``, logged by the module)."""

    def __init__(self, every_n_steps: int, dense_threshold: float) -> None:
        self.every_n_steps = every_n_steps
        self.dense_threshold = dense_threshold

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if self.every_n_steps <= 0 or trainer.global_step % self.every_n_steps != 0:
            return
        for slot in pl_module.trainees():
            dens = slot.trainee.latents.densities(reset=True)
            dense = (dens > self.dense_threshold).float().mean()
            pl_module.log(f"{slot.prefix}density/dense_fraction", dense)
            for lg in loggers_for(trainer, slot.prefix):
                if type(lg).__name__ == "WandbLogger":
                    import wandb

                    log10 = torch.log10(dens.clamp(min=1e-10)).cpu().numpy()
                    lg.experiment.log({"density/log10_histogram": wandb.Histogram(log10),
                                       "trainer/global_step": trainer.global_step})
