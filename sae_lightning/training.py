"""One training run, from a validated config to a final checkpoint and a ``summary.json``.

``train.py`` is the thin Hydra entry point around :func:`run_training`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from sae_lightning.datamodule import ActivationDataModule

from sae_lightning.callbacks import DensityMonitor, ResampleDeadLatents
from sae_lightning.config import TrainConfig
from sae_lightning.loggers import build_loggers, finish_wandb
from sae_lightning.module import SAEModule

log = logging.getLogger(__name__)


class TokensPerSecond(Callback):
    """Shows activations/s (tokens/s) in the progress bar and logs it."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._t0: float | None = None
        self._step0 = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._step0 = now, trainer.global_step
            return
        steps = trainer.global_step - self._step0
        if steps and trainer.global_step % trainer.log_every_n_steps == 0:
            rate = steps * self.batch_size * trainer.world_size / (now - self._t0)
            pl_module.log("tok/s", rate, prog_bar=True)


def build_callbacks(cfg: TrainConfig, ckpt_dir: Path) -> list[Callback]:
    """Checkpointing, progress, density monitoring and the optional interventions named in the config."""
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
                        save_last=True, save_top_k=1, filename="step{step}", auto_insert_metric_name=False),
        TokensPerSecond(cfg.batch_size),
        DensityMonitor(cfg.callbacks.density_hist_every_n_steps, cfg.callbacks.dense_threshold),
        LearningRateMonitor(logging_interval="step"),
    ]
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps // 2)))
    if cfg.callbacks.resample:
        callbacks.append(ResampleDeadLatents(cfg.callbacks.resample_steps, cfg.callbacks.resample_sample_rows,
                                             cfg.seed))
    return callbacks


def build_trainer(cfg: TrainConfig, run_dir: Path, loggers: list, callbacks: list[Callback]) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, max_steps=cfg.max_steps, max_epochs=-1, logger=loggers, callbacks=callbacks,
        log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        gradient_clip_val=cfg.optim.grad_clip or None, default_root_dir=str(run_dir),
        enable_progress_bar=t.progress_bar, num_sanity_val_steps=0, deterministic=False,
    )


def run_training(cfg: TrainConfig, run_dir: Path, config_dict: dict[str, Any]) -> dict[str, Any]:
    """Train one SAE; returns (and writes to ``run_dir/summary.json``) where things went and the metrics."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    dm = ActivationDataModule.from_config(cfg)
    module = SAEModule(config_dict, d_in=dm.d_in, norm_scale=dm.norm_scale)
    if cfg.trainer.compile:
        module.sae.compile()
    ckpt_dir = run_dir / "checkpoints"
    run_name = cfg.run_name or run_dir.name
    loggers = build_loggers(cfg.logger, run_dir, run_name, config_dict)
    trainer = build_trainer(cfg, run_dir, loggers, build_callbacks(cfg, ckpt_dir))
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=cfg.ckpt_path)
    finally:
        finish_wandb()
    final_ckpt = ckpt_dir / "final.ckpt"
    trainer.save_checkpoint(final_ckpt)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if torch.is_tensor(v) and v.numel() == 1}
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": str(final_ckpt),
        "steps": trainer.global_step,
        "tokens": trainer.global_step * cfg.batch_size * trainer.world_size,
        "train_seconds": round(time.perf_counter() - start, 1),
        "d_in": dm.d_in,
        "d_sae": module.sae.d_sae,
        "architecture": cfg.sae.architecture,
        "l1": cfg.l1,
        "metrics": metrics,
        "csv_log": str(run_dir / "csv" / "metrics.csv"),
        "config": asdict(cfg),
    }
    if trainer.is_global_zero:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
