"""The Lightning module of a group: every member's SAE trained on its hook's rows of each batch.

Each member is a ``MemberModule`` (``module.Trainee``: its SAE, firing statistics and ``sae.target_l0``
controller, under the names a run's module uses). A step runs each member's forward and backward in turn
(one member's activations held at a time; under DDP every forward, then ONE backward of the sum of the
losses, so DDP averages every gradient in one pass: the members share no parameter, so either way each gets
exactly its own loss's gradient), then each member's own gradient projection and clipping, one optimizer
step, and each member's renormalisation and statistics (``step.py``'s pieces, what a run runs).

The optimizer is ONE Adam whose parameter groups are the members' own (each with its member's learning
rate, betas and schedule: ``LambdaLR`` takes one multiplier per group). Adam keeps its state per parameter,
so this is each member's own Adam; one optimizer keeps Lightning's ``global_step`` equal to the batches
trained (it counts optimizer steps). ``member_checkpoint`` writes a member's share as a run's checkpoint.

A member whose loss becomes non-finite stops training (``failed_at`` holds the step, a buffer saved in
checkpoints; the message is saved too) while the others go on; every rank agrees on it under DDP. Metric
keys are ``<name>/train/...`` and ``<name>/val/...``; ``loggers.MemberLoggers`` sends them to the member's
own loggers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import Tensor, nn

from sae_lightning import heap
from sae_lightning.config import train_config_from_dict
from sae_lightning.group.data import as_slots
from sae_lightning.metrics import ReconstructionStats
from sae_lightning.saes.base import SAEOutput
from sae_lightning.train.module import (
    Trainee,
    TraineeSlot,
    broadcast_parameters,
    lr_lambda,
    merged_over_ranks,
    val_logs,
)
from sae_lightning.train.step import (
    DATA_INIT_ROWS,
    adam,
    clip_gradients,
    finish_step,
    forward_step,
    nonfinite_message,
)

log = logging.getLogger(__name__)


class Done(NamedTuple):
    """A member's step once its backward is done: what the optimizer step and the logs still need."""

    fire_counts: Tensor   # [d_sae] rows of the batch where each latent fired
    l0: Tensor            # the batch's mean L0 (the target-L0 controller's input)
    coeff: float          # the step's sparsity coefficient
    logs: dict[str, Tensor]   # ``Trainee.output_logs`` on a logging step, else empty


class MemberModule(Trainee, nn.Module):
    """One member's SAE, statistics and controller (a run's ``SAEModule`` without Lightning)."""

    def __init__(self, config: dict[str, Any], d_in: int, d_out: int | None = None) -> None:
        super().__init__()
        self.build_trainee(train_config_from_dict(config), d_in, d_out)


class GroupModule(L.LightningModule):
    """Trains every member of ``members`` (plain dicts: ``name``, ``config``, ``d_in``, ``d_out`` and
    ``slots``, the batch slots of its input and target) from one stream."""

    def __init__(self, members: list[dict[str, Any]]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.names = [m["name"] for m in members]
        self.slots = [tuple(m["slots"]) for m in members]
        self.members = nn.ModuleList(MemberModule(m["config"], m["d_in"], m.get("d_out")) for m in members)
        sizes = [len(m.optimizer_groups()) for m in self.members]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.group_ranges = [range(a, a + n) for a, n in zip(starts, sizes, strict=True)]
        self.register_buffer("failed_at", torch.full((len(members),), -1, dtype=torch.long))
        self.errors: dict[int, str] = {}
        self._val_stats: list[ReconstructionStats] = []

    def active(self, i: int) -> bool:
        return int(self.failed_at[i]) < 0

    def trainees(self) -> list[TraineeSlot]:
        return [TraineeSlot(f"{name}/", m, 0, self.slots[i][0], self.active(i))
                for i, (name, m) in enumerate(zip(self.names, self.members, strict=True))]

    def _inputs(self, rows: list[Tensor], i: int) -> tuple[Tensor, Tensor | None]:
        x_slot, y_slot = self.slots[i]
        return rows[x_slot], (None if y_slot is None else rows[y_slot])

    # ----- training -------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Every member's data-dependent start from one sample of rows (a fresh run only, as in a run)."""
        if self.global_step > 0 or self.trainer.ckpt_path is not None:
            return
        rows = [r.to(self.device) for r in self.trainer.datamodule.sample_slots(DATA_INIT_ROWS)]
        for i, m in enumerate(self.members):
            m.init_from_rows(*self._inputs(rows, i))
        broadcast_parameters(self)

    def reduce_counts(self, counts: Tensor) -> tuple[Tensor, int]:
        world = self.trainer.world_size
        if world > 1:
            counts = self.trainer.strategy.reduce(counts.to(torch.float64), reduce_op="sum")
        return counts, world

    def mean_over_ranks(self, value: Tensor) -> Tensor:
        if self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(value.to(torch.float64), reduce_op="mean")
        return value

    def _diverged(self, outs: dict[int, Any]) -> list[int]:
        """Members whose loss is non-finite on any rank (with their NaN guard on)."""
        flags = torch.zeros(len(self.members), dtype=torch.float64, device=self.device)
        for i, out in outs.items():
            if self.members[i].cfg.optim.nan_guard and not torch.isfinite(out.loss):
                flags[i] = 1
        if self.trainer.world_size > 1:
            flags = self.trainer.strategy.reduce(flags, reduce_op="sum")
        return [i for i in outs if flags[i] > 0]

    def _fail(self, i: int, step: int, message: str) -> None:
        """Stop member ``i``; its non-finite weights are zeroed so the group's checkpoints stay writable
        (they are never used: the member's run is recorded as failed)."""
        self.failed_at[i] = step
        self.errors[i] = message
        with torch.no_grad():
            for p in self.members[i].parameters():
                p.nan_to_num_(0.0, 0.0, 0.0)
                p.grad = None   # zero_grad keeps it None: Adam leaves the member alone
        log.error("[%s] diverged and stopped; the other SAEs go on. %s",
                                          self.names[i], message)

    def training_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        step, rows = self.global_step, as_slots(batch)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        # Gradients are zeroed in place, not freed: reallocated at every backward, they would sit between the
        # members' step temporaries on the heap, and their pages be faulted in again after each heap.release.
        optimizer.zero_grad(set_to_none=False)
        log_now = step % self.trainer.log_every_n_steps == 0
        ddp = self.trainer.world_size > 1
        done = self._forward_backward(rows, step, log_now) if ddp else self._one_by_one(rows, step, log_now)
        if not done:
            self.trainer.should_stop = True
            return
        groups = optimizer.param_groups
        for i in done:
            m = self.members[i]
            m.sae.before_optimizer_step()
            clip_gradients([groups[g]["params"] for g in self.group_ranges[i]], m.cfg.optim.grad_clip,
                           m.cfg.optim.grad_clip_scope)
        optimizer.step()
        scheduler.step()
        for i, d in done.items():
            m = self.members[i]
            finish_step(m.sae, d.fire_counts, m.latents, rows[0].shape[0], self.reduce_counts)
            m.after_step(d.l0, step, self.mean_over_ranks)
        if log_now:
            for i, d in done.items():
                logs = {**d.logs, **self.members[i].state_logs(d.coeff)}
                logs["lr-Adam"] = torch.tensor(groups[self.group_ranges[i][0]]["lr"])
                self.log_dict({f"{self.names[i]}/{k}": v for k, v in logs.items()})
        self.log("saes", float(len(done)), prog_bar=True, logger=False)
        heap.release(self.device)   # the members' freed temporaries, before the next step (heap.py)

    def _forward(self, rows: list[Tensor], step: int, i: int) -> tuple[SAEOutput, float]:
        m = self.members[i]
        coeff = m.before_step(step)
        x, target = self._inputs(rows, i)
        return forward_step(m.sae, x, m.latents, coeff=coeff, target=target), coeff

    def _done(self, rows: list[Tensor], i: int, out: SAEOutput, coeff: float, log_now: bool) -> Done:
        """What member ``i``'s step needs once its backward is done (its output's logs on a logging step),
        so that its reconstruction goes before the next member's forward."""
        logs = self.members[i].output_logs(out, *self._inputs(rows, i)) if log_now else {}
        return Done(out.fire_counts, out.l0.detach(), coeff, logs)

    def _one_by_one(self, rows: list[Tensor], step: int, log_now: bool) -> dict[int, Done]:
        """One process: each member's forward then its backward, so one member's activations are held at a
        time (the gradients are those of one backward of the sum)."""
        done = {}
        for i, m in enumerate(self.members):
            if not self.active(i):
                continue
            out, coeff = self._forward(rows, step, i)
            if m.cfg.optim.nan_guard and not torch.isfinite(out.loss):
                self._fail(i, step, nonfinite_message(out, m.sae, step))
                continue
            self.manual_backward(out.loss)
            done[i] = self._done(rows, i, out, coeff, log_now)
            del out
        return done

    def _forward_backward(self, rows: list[Tensor], step: int, log_now: bool) -> dict[int, Done]:
        """DDP: every member's forward, the divergence every rank agrees on, then ONE backward of the sum
        (DDP averages every gradient in one pass; a stopped member has no gradients, so Adam leaves it)."""
        outs = {i: self._forward(rows, step, i) for i in range(len(self.members)) if self.active(i)}
        for i in self._diverged({i: out for i, (out, _) in outs.items()}):
            self._fail(i, step, nonfinite_message(outs.pop(i)[0], self.members[i].sae, step))
        if not outs:
            return {}
        stopped = [p for i, m in enumerate(self.members) if i not in outs for p in m.parameters()]
        loss = torch.stack([out.loss for out, _ in outs.values()]).sum()
        zeros = sum((p.sum() * 0.0 for p in stopped), torch.zeros((), device=loss.device))
        self.manual_backward(loss + zeros)
        for p in stopped:
            p.grad = None
        return {i: self._done(rows, i, out, coeff, log_now) for i, (out, coeff) in outs.items()}

    def configure_optimizers(self) -> dict[str, Any]:
        """One Adam over every member's parameter groups, one schedule multiplier per group."""
        groups, multipliers = [], []
        for m, span in zip(self.members, self.group_ranges, strict=True):
            groups += m.optimizer_groups()
            multipliers += [lr_lambda(m.cfg)] * len(span)
        opt = adam(groups)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, multipliers)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ----- validation -----------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_stats = [m.new_val_stats() for m in self.members]

    def validation_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> None:
        rows = as_slots(batch)
        for i, m in enumerate(self.members):
            if self.active(i):
                m.update_val_stats(self._val_stats[i], *self._inputs(rows, i))

    def on_validation_epoch_end(self) -> None:
        for i, m in enumerate(self.members):
            stats = merged_over_ranks(self._val_stats[i], self.trainer.world_size,
                                      m.cfg.latents.dense_threshold)
            self.log_dict({f"{self.names[i]}/{k}": v for k, v in val_logs(stats).items()})

    # ----- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["group_errors"] = {str(i): e for i, e in self.errors.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.errors = {int(i): e for i, e in checkpoint.get("group_errors", {}).items()}

    def member_checkpoint(self, i: int) -> dict[str, Any]:
        """Member ``i`` as a run's checkpoint (what ``checkpoints.load_sae_checkpoint`` reads), with its
        share of the optimizer as the Adam and schedule a run of its own would hold."""
        m, hp = self.members[i], self.hparams["members"][i]
        shared, shared_sched = self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler
        opt, sched = m.make_optimizer()
        for own, g in zip(opt.param_groups, self.group_ranges[i], strict=True):
            own.update({k: v for k, v in shared.param_groups[g].items() if k != "params"})
        for p in m.parameters():
            if p in shared.state:
                opt.state[p] = shared.state[p]
        sched.last_epoch = shared_sched.last_epoch
        sched._last_lr = [shared.param_groups[g]["lr"] for g in self.group_ranges[i]]
        return {"state_dict": {k: v.detach().cpu() for k, v in m.state_dict().items()},
                "hyper_parameters": {"config": hp["config"], "d_in": hp["d_in"], "d_out": hp.get("d_out")},
                "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()],
                "global_step": self.global_step, "epoch": 0, "pytorch-lightning_version": L.__version__}
