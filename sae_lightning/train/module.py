"""The LightningModule: one SAE, its optimiser and schedules, and metric logging around ``step.train_step``.

Training uses Lightning's manual optimisation so that the step itself (``sae_lightning.train.step``) is the
same code the benchmarks time; Lightning supplies the loop, DDP (``manual_backward`` averages gradients),
precision, checkpointing and logging. Hyperparameters hold only plain JSON values (the resolved config
as a dict and ``d_in``) so checkpoints load under ``torch.load(weights_only=True)``; the activation scale
is a buffer of the SAE, saved with its weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor

from sae_lightning.checks import check
from sae_lightning.config import TrainConfig, train_config_from_dict
from sae_lightning.metrics import ReconstructionStats, batch_metrics
from sae_lightning.saes import SAE, SAEOutput, build_sae
from sae_lightning.saes.base import PenalisedConfig
from sae_lightning.train.sparsity import TargetL0
from sae_lightning.train.step import DATA_INIT_ROWS, LatentStats, adam, train_step, warmup_scale


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
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


def split_batch(batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
    """(x, target) of a batch: a transcoder's stream yields ``(x, y)`` pairs, an SAE's a tensor."""
    if isinstance(batch, Tensor):
        return batch, None
    x, y = batch
    return x, y


class Trainee:
    """What one SAE under training is, Lightning-free: the SAE, its firing statistics (``latents``), the
    ``sae.target_l0`` controller and its config, with the per-step logic around ``step.train_step``. Mixed
    into ``SAEModule`` (one SAE per run) and into ``group.module.MemberModule`` (one of several SAEs trained
    from one stream), so both hold the same submodules under the same names: a member's state dict is a
    run's."""

    cfg: TrainConfig
    sae: SAE
    latents: LatentStats
    target_l0: TargetL0 | None

    def build_trainee(self, cfg: TrainConfig, d_in: int, d_out: int | None) -> None:
        """Build the SAE ``cfg.sae`` (a transcoder when ``d_out`` is given) and its statistics."""
        if (cfg.target_hook is None) != (d_out is None):
            raise ValueError(f"d_out={d_out} does not match target.name={cfg.target.name}: a transcoder "
                             "needs the target's width, an SAE none")
        self.cfg = cfg
        with torch.random.fork_rng():   # the start depends on the config's own seed alone
            torch.manual_seed(cfg.init_seed)
            self.sae = self.build_model(cfg, d_in, d_out)
        self.latents = LatentStats(self.sae.n_latents, cfg.latents.dead_window_tokens)
        target = cfg.sae.target_l0 if isinstance(cfg.sae, PenalisedConfig) else None
        if target is not None:
            n = self.sae.n_latents
            check(target < n, "sae.target_l0", target, f"must be below d_sae={n}" if n == self.sae.d_sae
                  else f"must be below the number of latents of every layer ({n})")
        # a submodule, so checkpoints hold the controller's state
        self.target_l0 = None if target is None else TargetL0(target, two_sided=self.sae.two_sided_target)

    def build_model(self, cfg: TrainConfig, d_in: int, d_out: int | None) -> SAE:
        """The model under training: the SAE ``cfg.sae`` (a transcoder when ``d_out`` is given)."""
        return build_sae(cfg.sae, d_in, d_out)

    def coeff_at(self, step: int) -> float:
        """The architecture's coefficient times the warm-up factor (``optim.l1_warmup_steps``) and, with
        ``sae.target_l0``, the controller's factor."""
        warm = warmup_scale(step, self.cfg.optim.l1_warmup_steps)
        steer = self.target_l0.scale() if self.target_l0 is not None else 1.0
        return self.sae.base_coeff(self.cfg.l1) * warm * steer

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """Adam's parameter groups of this SAE (``SAE.param_groups``) with its own betas."""
        betas = (self.cfg.optim.beta1, self.cfg.optim.beta2)
        return [{**g, "betas": betas} for g in self.sae.param_groups(self.cfg.lr)]

    def make_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """Adam over the SAE's parameter groups and its learning-rate schedule (``lr_lambda``)."""
        opt = adam(self.optimizer_groups())
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.cfg))

    def init_from_rows(self, rows: Tensor, targets: Tensor | None) -> None:
        """The SAE's data-dependent start (``SAE.init_from_data``) from sampled raw rows."""
        self.sae.init_from_data(rows, targets if self.sae.transcoder else None)

    def before_step(self, step: int) -> float:
        """``sae.set_progress(step / max_steps)``; returns this step's sparsity coefficient."""
        self.sae.set_progress(step / self.cfg.max_steps)
        return self.coeff_at(step)

    def after_step(self, l0: Tensor, step: int, mean_over_ranks: Callable[[Tensor], Tensor]) -> None:
        """The target-L0 controller's update from the batch's ``l0``, once the coefficient's warm-up is over
        (during it the coefficient is low on purpose)."""
        if self.target_l0 is not None and warmup_scale(step, self.cfg.optim.l1_warmup_steps) == 1:
            self.target_l0.update(mean_over_ranks(l0.detach()))

    def step_logs(self, out: SAEOutput, x: Tensor, target: Tensor | None, coeff: float) -> dict[str, Tensor]:
        """The ``train/*`` numbers logged every ``trainer.log_every_n_steps`` steps: :meth:`output_logs`
        and :meth:`state_logs`."""
        return {**self.output_logs(out, x, target), **self.state_logs(coeff)}

    @torch.no_grad()
    def output_logs(self, out: SAEOutput, x: Tensor, target: Tensor | None) -> dict[str, Tensor]:
        """The logged numbers of the step's forward: loss terms, reconstruction metrics and L0 of the batch
        (``metrics.batch_metrics``), as detached scalars."""
        x_hat = out.x_hat.detach() / self.sae.output_scale
        ref = x if target is None else target
        logs = {f"train/loss_{k}": v for k, v in out.terms.items() if k != "l0"}
        logs.update({f"train/{k}": v for k, v in batch_metrics(ref.reshape(-1, ref.shape[-1]),
                                                               x_hat.reshape(-1, x_hat.shape[-1]),
                                                               out.l0).items()})
        logs["train/loss"] = out.loss.detach()
        return logs

    @torch.no_grad()
    def state_logs(self, coeff: float) -> dict[str, Tensor]:
        """The logged numbers of the trainee after its optimizer step: dead fraction, coefficient, the
        SAE's own (``SAE.training_logs``) and the L0 target."""
        logs = {"train/dead_fraction_window": self.latents.dead_mask().float().mean(),
                "train/sparsity_coeff": torch.tensor(coeff)}
        logs.update({f"train/{k}": v for k, v in self.sae.training_logs().items()})
        if self.target_l0 is not None:
            logs["train/l0_target"] = torch.tensor(self.target_l0.target)
        return logs

    def new_val_stats(self) -> ReconstructionStats:
        return ReconstructionStats(self.cfg.latents.dense_threshold)

    def update_val_stats(self, stats: ReconstructionStats, x: Tensor, target: Tensor | None) -> None:
        z = self.sae.encode(x)
        stats.update(x if target is None else target, self.sae.decode(z, x), z)


class TraineeSlot(NamedTuple):
    """One SAE of a Lightning module, as callbacks see it: its metric-key prefix (``""`` for a run's only
    SAE, ``"<name>/"`` for a group member), the trainee, its optimizer's index, the batch slot of its input
    rows, and whether it is still training (a diverged group member is not)."""

    prefix: str
    trainee: Trainee
    optimizer: int
    slot: int
    active: bool


def merged_over_ranks(stats: ReconstructionStats, world_size: int,
                      dense_threshold: float) -> ReconstructionStats:
    """Every rank's validation statistics merged exactly (averaging per-rank explained variances would not
    give the whole set's)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return stats
    gathered: list[ReconstructionStats | None] = [None] * world_size
    torch.distributed.all_gather_object(gathered, stats)
    merged = ReconstructionStats(dense_threshold)
    for other in gathered:
        merged.merge(other)
    return merged


VAL_KEYS = ("mse", "nmse", "explained_variance", "l0", "cosine_sim", "dead_fraction")


def val_logs(stats: ReconstructionStats) -> dict[str, float]:
    """The ``val/*`` numbers of a whole validation set (none when it was empty)."""
    if stats.n_tokens == 0:
        return {}
    values = stats.compute()
    return {f"val/{k}": float(values[k]) for k in VAL_KEYS if k in values}


class SAEModule(Trainee, L.LightningModule):
    """Trains ``build_sae(config.sae, d_in, d_out)`` on raw activation batches (the SAE normalizes them);
    ``d_out`` given: a transcoder trained on ``(x, y)`` batches."""

    def __init__(self, config: dict[str, Any], d_in: int, d_out: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.build_trainee(train_config_from_dict(config), d_in, d_out)
        self._val_stats: ReconstructionStats | None = None

    def sparsity_coeff(self) -> float:
        """This step's coefficient (:meth:`Trainee.coeff_at`)."""
        return self.coeff_at(self.global_step)

    def trainees(self) -> list[TraineeSlot]:
        return [TraineeSlot("", self, 0, 0, True)]

    # ----- training -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """The SAE's data-dependent start (``SAE.init_from_data``: the decoder bias, JumpReLU's thresholds)
        from a sample on a fresh run (the same rows on every rank; rank 0's weights are broadcast anyway).

        On a resume the weights are already restored here but ``global_step`` is not yet (Lightning restores
        the loops after this hook), so ``trainer.ckpt_path`` is what tells a resume apart.
        """
        if self.global_step > 0 or self.trainer.ckpt_path is not None:
            return
        rows, targets = self.sample_rows(self.trainer.datamodule, DATA_INIT_ROWS)
        self.init_from_rows(rows.to(self.device), None if targets is None else targets.to(self.device))
        broadcast_parameters(self)

    def sample_rows(self, dm: Any, n: int) -> tuple[Tensor, Tensor | None]:
        """``n`` raw training rows of the datamodule (and a transcoder's targets at the same positions)."""
        return dm.sample(n), (dm.sample_targets(n) if self.sae.transcoder else None)

    def split(self, batch: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """A batch of the datamodule as (raw input rows, a transcoder's raw target rows or None)."""
        return split_batch(batch)

    def reduce_counts(self, counts: Tensor) -> tuple[Tensor, int]:
        """Fire counts summed over every DDP rank, and the world size."""
        world = self.trainer.world_size
        if world > 1:
            counts = self.trainer.strategy.reduce(counts.to(torch.float64), reduce_op="sum")
        return counts, world

    def mean_over_ranks(self, value: Tensor) -> Tensor:
        """``value`` averaged over every DDP rank (equal batches per rank: the whole batch's mean)."""
        if self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(value.to(torch.float64), reduce_op="mean")
        return value

    def training_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        step = self.global_step
        coeff = self.before_step(step)
        x, target = self.split(batch)
        out = train_step(self.sae, self.optimizers(), x, self.latents, coeff=coeff,
                         grad_clip=self.cfg.optim.grad_clip, clip_scope=self.cfg.optim.grad_clip_scope,
                         step=step, nan_guard=self.cfg.optim.nan_guard,
                         backward=self.manual_backward, reduce_counts=self.reduce_counts, target=target)
        self.lr_schedulers().step()
        self.after_step(out.l0, step, self.mean_over_ranks)
        if step % self.trainer.log_every_n_steps == 0:
            self.log_dict(self.step_logs(out, x, target, coeff), prog_bar=False)
            self.log("l0", out.l0.detach(), prog_bar=True, logger=False)
        self.log("loss", out.loss.detach(), prog_bar=True, logger=False)
        return out.loss.detach()

    def configure_optimizers(self) -> dict[str, Any]:
        opt, sched = self.make_optimizer()
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----- validation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_stats = self.new_val_stats()

    def validation_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        self.update_val_stats(self._val_stats, *self.split(batch))

    def on_validation_epoch_end(self) -> None:
        """Log whole-validation-set numbers: under DDP every rank's statistics are gathered and merged."""
        stats = merged_over_ranks(self._val_stats, self.trainer.world_size, self.cfg.latents.dense_threshold)
        self.log_dict(val_logs(stats))


def broadcast_parameters(module: L.LightningModule) -> None:
    """Rank 0's parameters on every rank (after a data-dependent start that may differ per rank)."""
    if module.trainer.world_size > 1:
        for p in module.parameters():
            p.data = module.trainer.strategy.broadcast(p.data, src=0)
