"""One training run, from a validated config to the trained SAE folder, a final checkpoint and a summary.

``train.py`` is the thin Hydra entry point around :func:`run_training`; where each output goes is
``rundir.RunDir``'s business. A resumed run continues in the folder of the run it resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from omegaconf import OmegaConf
from torch import Tensor

from sae_lightning.cache.datamodule import datamodule_from_config
from sae_lightning.config import TrainConfig
from sae_lightning.saes import SAE
from sae_lightning.train.callbacks import DensityMonitor, PreemptionCheckpoint, ResampleDeadLatents
from sae_lightning.train.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    check_resumable,
    config_fingerprint,
    mark_run_dir,
    resolve_ckpt_path,
)
from sae_lightning.train.loggers import build_loggers, finish_wandb
from sae_lightning.train.module import SAEModule
from sae_lightning.train.rundir import RunDir, RunSummary

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


def common_callbacks(cfg: TrainConfig, ckpt_dir: Path) -> list[Callback]:
    """Checkpointing, progress and density monitoring: what every trainer has, a run's or a group's.

    ``last.ckpt`` is always overwritten in place (no ``last-v1.ckpt``): a pre-emption save or the run
    resumed in this directory may have written it, and ``ckpt_path=last`` must find the newest state there.
    """
    # With manual optimisation (module.py) Lightning warns that a step checkpoint holds the state AFTER the
    # optimizer step: that is what a resume needs (the step count, weights and Adam state agree).
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
                        save_last=True, save_top_k=1, filename="step{step}", auto_insert_metric_name=False,
                        enable_version_counter=False),
        TokensPerSecond(cfg.batch_size),
        DensityMonitor(cfg.callbacks.density_hist_every_n_steps, cfg.latents.dense_threshold),
    ]
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=max(1, cfg.trainer.log_every_n_steps // 2)))
    return callbacks


def resampling(cfg: TrainConfig, trainee: int = 0) -> list[Callback]:
    """Dead-latent resampling of the module's SAE number ``trainee``, when its config asks for it."""
    if not cfg.callbacks.resample:
        return []
    return [ResampleDeadLatents(cfg.callbacks.resample_steps, cfg.callbacks.resample_sample_rows,
                                cfg.init_seed, trainee)]


def build_callbacks(cfg: TrainConfig, ckpt_dir: Path) -> list[Callback]:
    """A run's callbacks: the common ones, the learning-rate monitor and the optional resampling."""
    return [*common_callbacks(cfg, ckpt_dir), LearningRateMonitor(logging_interval="step"), *resampling(cfg)]


def build_trainer(cfg: TrainConfig, run_dir: Path, loggers: list, callbacks: list[Callback]) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, max_steps=cfg.max_steps, max_epochs=-1, logger=loggers, callbacks=callbacks,
        log_every_n_steps=t.log_every_n_steps, val_check_interval=t.val_every_n_steps,
        check_val_every_n_epoch=None, limit_val_batches=t.limit_val_batches,
        default_root_dir=str(run_dir),
        enable_progress_bar=t.progress_bar, num_sanity_val_steps=0, deterministic=False,
        plugins=[AtomicCheckpointIO()],
    )


def runs_root(run_dir: Path) -> Path:
    """Where the runs of this experiment live: ``run_dir`` minus its per-invocation tail.

    Under Hydra that tail is the part of ``hydra.run.dir`` (``hydra.sweep.dir``/``subdir`` in a multirun)
    from the first component holding ``${now:...}`` or ``${hydra.job...}``, so the default
    ``outputs/train/${now:%Y-%m-%d}/${now:%H-%M-%S}`` gives ``outputs/train``. A fixed ``hydra.run.dir``
    gives the run dir itself. Outside Hydra it is the parent of ``run_dir``.
    """
    if not HydraConfig.initialized():
        return run_dir.parent
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        sweep = OmegaConf.to_container(hc.sweep, resolve=False)
        pattern = f"{sweep['dir']}/{sweep['subdir']}"
    else:
        pattern = OmegaConf.to_container(hc.run, resolve=False)["dir"]
    parts = [p for p in str(pattern).split("/") if p]
    varying = [i for i, p in enumerate(parts) if "${now" in p or "${hydra.job" in p]
    if not varying:
        return run_dir
    return run_dir.parents[min(len(parts) - varying[0], len(run_dir.parents)) - 1]


def prepare_run_dir(run: RunDir, fingerprint: str, resume_from: Path | None) -> Path:
    """Create ``run/checkpoints`` and record the config fingerprint, failing early and clearly when the
    directory is not writable or already holds another run's checkpoints (which would be overwritten)."""
    existing = sorted(p.name for p in run.checkpoints.glob("*.ckpt"))
    if existing and (resume_from is None or resume_from.parent != run.checkpoints):
        raise CheckpointError(f"{run.checkpoints} already holds checkpoints of an earlier run "
                              f"({', '.join(existing)}) that this run would overwrite. Add ckpt_path=last "
                              "to continue that run, or choose another hydra.run.dir")
    try:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
        mark_run_dir(run.resume_key, fingerprint)
    except OSError as err:
        raise CheckpointError(f"cannot write to the output directory {run.path} ({err.strerror or err}). "
                              "Make it writable or choose another with hydra.run.dir=<dir>") from None
    return run.checkpoints


def resumed_run(invocation_dir: Path, resume_from: Path | None) -> RunDir:
    """The folder this run writes into: the resumed run's own folder when it continues one (so a run
    killed twice keeps its history in one place), else this invocation's."""
    if resume_from is not None and resume_from.parent.name == "checkpoints":
        original = resume_from.parent.parent.resolve()
        if original != invocation_dir.resolve():
            log.info("Resuming run %s in its own folder (this invocation's Hydra files: %s)", original,
                     invocation_dir)
            return RunDir(original)
    return RunDir(invocation_dir)


@contextlib.contextmanager
def log_also_to(path: Path) -> Iterator[None]:
    """Append this process's log records to ``path`` too (a resumed run's own ``train.log``)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def check_free_space(ckpt_dir: Path, module: SAEModule) -> None:
    """Refuse to start when the disk cannot hold the checkpoints this run writes (weights + two Adam moments,
    up to four files at once: step, last, its temporary and final)."""
    need = 4 * 3 * sum(t.numel() * t.element_size() for t in module.state_dict().values())
    free = shutil.disk_usage(ckpt_dir).free
    if free < need:
        raise CheckpointError(f"{ckpt_dir} has {free / 2**20:.0f} MiB free but this run's checkpoints need "
                              f"about {need / 2**20:.0f} MiB. Free disk space or choose another output "
                              "directory with hydra.run.dir=<dir>")


class BatchRecord(Callback):
    """Debug mode (``SAE_LIGHTNING_RECORD_BATCHES=1``): append ``step<TAB>sha256`` of every training batch
    to ``run_dir/batches.tsv``, one flushed line per step, so a resume can be checked for skipped or
    repeated data."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Tensor,
                             batch_idx: int) -> None:
        digest = hashlib.sha256()
        for rows in [batch] if isinstance(batch, Tensor) else batch:
            digest.update(rows.detach().cpu().contiguous().numpy().tobytes())
        with self.path.open("a") as f:
            f.write(f"{trainer.global_step}\t{digest.hexdigest()[:16]}\n")


class TrainingPreempted(SystemExit):
    """Training stopped on SIGTERM/SIGUSR1 after saving a checkpoint; exits with status 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        super().__init__(128 + signum)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def scalar_metrics(trainer: L.Trainer) -> dict[str, float]:
    """The trainer's latest logged scalars (``train/*``, ``val/*``, ...) as plain floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


def write_summary(cfg: TrainConfig, trainer: L.Trainer, sae: SAE, run: RunDir, checkpoint: Path,
                  seconds: float, metrics: dict[str, float], config: dict[str, Any],
                  **extra: Any) -> RunSummary:
    """The run's ``summary.json`` with its final ``metrics`` (rank 0 writes it)."""
    summary = RunSummary(
        run_dir=str(run.path), checkpoint=str(checkpoint), steps=trainer.global_step,
        tokens=trainer.global_step * cfg.batch_size * trainer.world_size, train_seconds=round(seconds, 1),
        architecture=cfg.sae.architecture, d_in=sae.d_in, d_sae=sae.d_sae, metrics=metrics, config=config,
        **extra)
    if trainer.is_global_zero:
        run.write_summary(summary)
    return summary


def save_sae(sae: SAE, run: RunDir, config: dict[str, Any], folder: Path | None = None) -> Path:
    """Write the trained SAE folder (``SAE.save``, into ``folder``, by default ``run.sae``) with the training
    config as its provenance."""
    sae.metadata = {"train_config": config}
    return sae.save(run.sae if folder is None else folder)


def needs_final_validation(cfg: TrainConfig, trainer: L.Trainer, dm: L.LightningDataModule,
                           preemption: PreemptionCheckpoint) -> bool:
    """Whether the finished run's summary would otherwise lack validation numbers for its final weights
    (Lightning validates every ``val_every_n_steps`` steps only, and not after the last one)."""
    finished = preemption.saved_step is None or trainer.global_step >= cfg.max_steps
    return finished and dm.has_validation and trainer.global_step % cfg.trainer.val_every_n_steps != 0


def run_training(cfg: TrainConfig, run_dir: Path, config_dict: dict[str, Any]) -> RunSummary:
    """Train one SAE; returns (and writes to ``summary.json``) where things went and the metrics.

    ``cfg.ckpt_path`` resumes (see ``sae_lightning.train.checkpoints``): ``last``, ``auto``, a file or a run
    dir.
    Raises ``TrainingPreempted`` after a SIGTERM/SIGUSR1 checkpoint; ``NonFiniteError`` on NaN/Inf, with no
    checkpoint of the bad weights written.
    """
    L.seed_everything(cfg.seed, workers=True)
    fingerprint = config_fingerprint(config_dict)
    resume_from = resolve_ckpt_path(cfg.ckpt_path, run_dir, runs_root(run_dir), fingerprint)
    run = resumed_run(run_dir, resume_from)
    if run.path == run_dir.resolve() or run.path == run_dir:
        return fit(cfg, run, config_dict, fingerprint, resume_from)
    with log_also_to(run.path / "train.log"):
        return fit(cfg, run, config_dict, fingerprint, resume_from)


def build_module(cfg: TrainConfig, config_dict: dict[str, Any]) -> tuple[L.LightningDataModule, SAEModule]:
    """The run's datamodule and module, the model given its activation scales: one SAE, or with
    ``clt=true`` a cross-layer transcoder on the group stream (``circuits/training.py``)."""
    if cfg.clt:
        from sae_lightning.circuits.training import build_clt_module

        return build_clt_module(cfg, config_dict)
    dm = datamodule_from_config(cfg)
    module = SAEModule(config_dict, d_in=dm.d_in, d_out=dm.d_out)
    module.sae.set_input_scale(dm.norm_scale)
    if dm.target_norm_scale is not None:
        module.sae.set_target_scale(dm.target_norm_scale)
    return dm, module


def fit(cfg: TrainConfig, run: RunDir, config_dict: dict[str, Any], fingerprint: str,
        resume_from: Path | None) -> RunSummary:
    """Build, fit and save in ``run`` (see :func:`run_training`)."""
    ckpt_dir = prepare_run_dir(run, fingerprint, resume_from)
    dm, module = build_module(cfg, config_dict)
    if resume_from is not None:
        check_resumable(resume_from, module)
        log.info("Resuming from %s", resume_from)
    check_free_space(ckpt_dir, module)
    if cfg.trainer.compile:
        module.sae.compile()
    run.keep_previous_csv_log()
    loggers = build_loggers(cfg.logger, run, cfg.run_name or run.path.name, config_dict)
    preemption = PreemptionCheckpoint(ckpt_dir / "last.ckpt")
    callbacks = [*build_callbacks(cfg, ckpt_dir), preemption]
    if os.environ.get("SAE_LIGHTNING_RECORD_BATCHES") == "1":
        callbacks.append(BatchRecord(run.path / "batches.tsv"))
    trainer = build_trainer(cfg, run.path, loggers, callbacks)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from)
        seconds = time.perf_counter() - start
        fit_metrics = scalar_metrics(trainer)  # validate() below starts a fresh set
        if needs_final_validation(cfg, trainer, dm, preemption):
            trainer.validate(module, datamodule=dm, verbose=False)
    finally:
        finish_wandb()
    resumed = {"resumed_from": str(resume_from) if resume_from else None}
    if preemption.saved_step is not None and trainer.global_step < cfg.max_steps:
        write_summary(cfg, trainer, module.sae, run, preemption.ckpt_path, seconds,
                      {**fit_metrics, **scalar_metrics(trainer)}, config_dict, status="preempted", **resumed)
        log.warning("Stopped by %s at step %d/%d; checkpoint %s. Resume with the same command plus "
                    "ckpt_path=last", signal.Signals(preemption.signum).name, trainer.global_step,
                    cfg.max_steps, preemption.ckpt_path)
        raise TrainingPreempted(preemption.signum, trainer.global_step, preemption.ckpt_path)
    final_ckpt = ckpt_dir / "final.ckpt"
    # weights_only=False: the full training state (optimizer, loops), so a run can go on from it; the file
    # still loads with torch.load(weights_only=True): nothing but tensors and plain values is in it
    trainer.save_checkpoint(final_ckpt, weights_only=False)
    folder = run.clt if cfg.clt else run.sae
    sae_dir = save_sae(module.sae, run, config_dict, folder) if trainer.is_global_zero else folder
    return write_summary(cfg, trainer, module.sae, run, final_ckpt, seconds,
                         {**fit_metrics, **scalar_metrics(trainer)}, config_dict, status="finished",
                         sae_dir=str(sae_dir), **resumed)
