"""One grouped run: every member trained from one stream, each ending in its own ordinary run folder.

```
<group dir>/                  the layers/hooks run's folder, or <sweep dir>/.groups/<n> for a grouped sweep
  group.json                  the members (name, folder) and, at the end, each one's status
  checkpoints/                the group's checkpoints (every member, its optimizer, the stream): resuming;
                              no final.ckpt (each member's is in its folder; last.ckpt holds the end state)
  resume_key.json, train.log  the group fingerprint ``ckpt_path=last`` looks for; every member's log lines
<member run dir>/             an ordinary run folder (rundir.py): summary.json, sae/, checkpoints/final.ckpt
                              (the member alone, in a run's checkpoint format), csv/, wandb/, train.log
```
A member's ``train.log`` holds the group's lines and its own (``[name] ...``), not the other members'. A
member that diverges is recorded as a failed run (``summary.json`` status ``failed`` with the error) and the
others go on; a pre-empted group records every member as pre-empted and resumes as a whole with
``ckpt_path=last`` (or ``auto``) and the same command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sae_lightning.group.data import group_datamodule, member_slots
from sae_lightning.group.members import Member, check_members
from sae_lightning.group.memory import GroupMemoryError, check_fits, estimate_group, human
from sae_lightning.group.module import GroupModule
from sae_lightning.io import atomic_write_json
from sae_lightning.sweep.multirun import write_failure
from sae_lightning.train.callbacks import PreemptionCheckpoint
from sae_lightning.train.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    config_fingerprint,
    resolve_ckpt_path,
    shape_mismatches,
)
from sae_lightning.train.loggers import MemberLoggers, build_loggers, finish_member_runs
from sae_lightning.train.run import (
    BatchRecord,
    TrainingPreempted,
    build_trainer,
    check_free_space,
    common_callbacks,
    needs_final_validation,
    prepare_run_dir,
    resampling,
    runs_root,
    save_sae,
    scalar_metrics,
    write_summary,
)
from sae_lightning.train.rundir import RunDir, RunSummary

log = logging.getLogger(__name__)
GROUP_FILE = "group.json"  # marks a group folder (``compare`` does not list it as a run)


class _OnlyMember(logging.Filter):
    """A member's ``train.log``: every line but those tagged ``[other member]``."""

    def __init__(self, name: str, names: list[str]) -> None:
        super().__init__()
        self.own, self.others = f"[{name}]", [f"[{n}]" for n in names if n != name]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return self.own in message or not any(tag in message for tag in self.others)


@contextlib.contextmanager
def member_logs(members: list[Member], group_log: Path | None) -> Iterator[None]:
    """Append this process's log lines to each member's ``train.log`` (filtered) and to ``group_log``."""
    formatter = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    names = [m.name for m in members]
    handlers = []
    for path, flt in [*((Path(m.run_dir) / "train.log", _OnlyMember(m.name, names)) for m in members),
                      *([(group_log, None)] if group_log is not None else [])]:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(formatter)
        if flt is not None:
            handler.addFilter(flt)
        handlers.append(handler)
        logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()


def write_group_file(group: RunDir, members: list[Member], statuses: list[str] | None = None) -> None:
    """``group.json``: each member's name and folder (and, at the end, its status)."""
    entries = [{"name": m.name, "run_dir": str(m.run_dir)} for m in members]
    for entry, status in zip(entries, statuses or [], strict=False):
        entry["status"] = status
    atomic_write_json(group.path / GROUP_FILE, {"members": entries})


def group_fingerprint(members: list[Member]) -> str:
    """Equal for two invocations of the same group (members, their configs, in order)."""
    return config_fingerprint({"group": [[m.name, config_fingerprint(m.config)] for m in members]})


def member_metrics(metrics: dict[str, float], name: str, names: list[str]) -> dict[str, float]:
    """A member's own ``<name>/<key>`` metrics as ``<key>``, with the group's unprefixed ones."""
    prefixes = tuple(f"{n}/" for n in names)
    own = {k[len(name) + 1:]: v for k, v in metrics.items() if k.startswith(f"{name}/")}
    return {**{k: v for k, v in metrics.items() if not k.startswith(prefixes)}, **own}


def build_group_module(members: list[Member], dm: Any, hooks: list[tuple[int, str]]) -> GroupModule:
    """The group's module, each member's SAE sized for its hook and given its hook's scale."""
    where = member_slots(members, hooks)
    dims, scales = dm.slot_dims, dm.slot_norm_scales
    module = GroupModule([{"name": m.name, "config": m.config, "d_in": dims[x],
                           "d_out": None if y is None else dims[y], "slots": [x, y]}
                          for m, (x, y) in zip(members, where, strict=True)])
    for member, (x, y) in zip(module.members, where, strict=True):
        member.sae.set_input_scale(scales[x])
        if y is not None:
            member.sae.set_target_scale(scales[y])
    return module


def check_group_resumable(path: Path, module: GroupModule) -> None:
    """Refuse a checkpoint of another group (other members or shapes)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    bad = shape_mismatches(ckpt["state_dict"], module.state_dict())
    if bad:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this group ({'; '.join(bad[:4])}). "
                              "Resume with the command that wrote it, or train afresh without ckpt_path")


def run_group(members: list[Member], group_dir: Path) -> list[RunSummary]:
    """Train every member from one stream; returns each member's summary, in order (see module docstring).

    Raises a ``UserError`` for a bad group before any work, ``TrainingPreempted`` after a SIGTERM/SIGUSR1
    checkpoint. A member's divergence is not raised: its summary says ``failed``.
    """
    check_members(members)
    base = members[0].cfg
    L.seed_everything(base.seed, workers=True)
    group = RunDir(group_dir)
    fingerprint = group_fingerprint(members)
    resume_from = resolve_ckpt_path(base.ckpt_path, group.path, runs_root(group.path), fingerprint)
    ckpt_dir = prepare_run_dir(group, fingerprint, resume_from)
    write_group_file(group, members)
    for m in members:
        Path(m.run_dir).mkdir(parents=True, exist_ok=True)
    hydra_log = group.path / "train.log"
    with member_logs(members, None if hydra_log.exists() else hydra_log):
        log.info("Training %d SAEs from one stream: %s", len(members), ", ".join(m.name for m in members))
        return _fit(members, group, ckpt_dir, resume_from)


def training_device(cfg: Any) -> torch.device:
    """The device the SAEs train on: the CPU, or this process's GPU (``LOCAL_RANK`` under DDP)."""
    accelerator = str(cfg.trainer.accelerator)
    if accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def check_memory(members: list[Member], dm: Any, hooks: list[tuple[int, str]]) -> None:
    """The memory guard (``group.memory``): refuse the group before training when its SAEs, their optimizer
    state and working sets, the stream's buffers and a live LM exceed the free memory of the device; the
    ``GroupMemoryError`` names how many fit and carries the ``estimate`` (the grouped launcher splits the
    group with it)."""
    where = member_slots(members, hooks)
    widths = [(dm.slot_dims[x], None if y is None else dm.slot_dims[y]) for x, y in where]
    lm = getattr(dm, "lm", None)
    estimate = estimate_group([m.cfg for m in members], widths, list(dm.slot_dims),
                              training_device(members[0].cfg), None if lm is None else lm.model)
    log.info("Memory: the group needs about %s of %s available on %s", human(estimate.total),
             human(estimate.available), estimate.device)
    try:
        check_fits(estimate, [m.name for m in members])
    except GroupMemoryError as err:
        err.estimate = estimate
        raise


def _fit(members: list[Member], group: RunDir, ckpt_dir: Path, resume_from: Path | None) -> list[RunSummary]:
    base = members[0].cfg
    dm, hooks = group_datamodule(members)
    check_memory(members, dm, hooks)
    module = build_group_module(members, dm, hooks)
    if resume_from is not None:
        check_group_resumable(resume_from, module)
        log.info("Resuming the group from %s", resume_from)
    check_free_space(ckpt_dir, module)
    if base.trainer.compile:
        for m in module.members:
            m.sae.compile()
    routes = {}
    for m in members:
        run = RunDir(m.run_dir)
        run.keep_previous_csv_log()
        routes[f"{m.name}/"] = build_loggers(m.cfg.logger, run, m.cfg.run_name or run.path.name, m.config,
                                             own_wandb_run=True)
    router = MemberLoggers(routes)
    preemption = PreemptionCheckpoint(ckpt_dir / "last.ckpt")
    callbacks = [*common_callbacks(base, ckpt_dir), preemption,
                 *(cb for i, m in enumerate(members) for cb in resampling(m.cfg, i))]
    if os.environ.get("SAE_LIGHTNING_RECORD_BATCHES") == "1":
        callbacks.append(BatchRecord(group.path / "batches.tsv"))
    trainer = build_trainer(base, group.path, [router], callbacks)
    start = time.perf_counter()
    status = 1
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from)
        seconds = time.perf_counter() - start
        fit_metrics = scalar_metrics(trainer)
        if needs_final_validation(base, trainer, dm, preemption):
            trainer.validate(module, datamodule=dm, verbose=False)
        status = 0
    finally:
        finish_member_runs(router._all(), status)
    metrics = {**fit_metrics, **scalar_metrics(trainer)}
    names = [m.name for m in members]
    resumed = {"resumed_from": str(resume_from) if resume_from else None}
    if preemption.saved_step is not None and trainer.global_step < base.max_steps:
        for m, member in zip(members, module.members, strict=True):
            write_summary(m.cfg, trainer, member.sae, RunDir(m.run_dir), preemption.ckpt_path, seconds,
                          member_metrics(metrics, m.name, names), m.config, status="preempted", **resumed)
        log.warning("Stopped by %s at step %d/%d; group checkpoint %s. Resume with the same command plus "
                    "ckpt_path=last", signal.Signals(preemption.signum).name, trainer.global_step,
                    base.max_steps, preemption.ckpt_path)
        raise TrainingPreempted(preemption.signum, trainer.global_step, preemption.ckpt_path)
    summaries = [_finish_member(i, m, module, trainer, seconds, member_metrics(metrics, m.name, names),
                                resumed) for i, m in enumerate(members)]
    if trainer.is_global_zero:
        write_group_file(group, members, [s.status for s in summaries])
    return summaries


def _finish_member(i: int, m: Member, module: GroupModule, trainer: L.Trainer, seconds: float,
                   metrics: dict[str, float], resumed: dict[str, Any]) -> RunSummary:
    """A finished member's final checkpoint, ``sae/`` and summary; a diverged one's failure summary."""
    run = RunDir(m.run_dir)
    if not module.active(i):
        error = f"NonFiniteError: {module.errors.get(i, 'the loss became non-finite')}"
        if trainer.is_global_zero:
            write_failure(run.path, error, error, m.overrides)
        return RunSummary(status="failed", run_dir=str(run.path), error=error, overrides=m.overrides)
    member = module.members[i]
    final = run.checkpoints / "final.ckpt"
    if trainer.is_global_zero:
        AtomicCheckpointIO().save_checkpoint(module.member_checkpoint(i), final)
        save_sae(member.sae, run, m.config)
    return write_summary(m.cfg, trainer, member.sae, run, final, seconds, metrics, m.config,
                         status="finished", sae_dir=str(run.sae), **resumed)
