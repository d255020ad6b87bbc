"""``hydra/launcher=grouped``: the jobs of a sweep that share an activation stream train in one process.

``python train.py -m experiment=quickstart l1=1,2,5,10 sae.dict_mult=4,8 hydra/launcher=grouped`` composes
and validates every job as train.py would, writes each job's folder and ``.hydra/`` as Hydra's basic
launcher does, groups the jobs by :func:`~sae_lightning.group.members.stream_key` (same model, text,
activations, batch size, token budget, seed, trainer...) and trains each group with
:func:`sae_lightning.group.run.run_group`, from one stream; with ``evaluate.enabled=true`` each finished job
is then evaluated (``sae_lightning.evaluate.after``). Every job keeps its own folder, W&B grouping and tags,
objective and evaluation, so the sweep's comparison page is that of an ungrouped sweep.

- Jobs that cannot share a stream (a swept ``batch_size``, ``model``, ``seed``...) fall into separate
  groups, run one after the other; ``hydra.launcher.strict=true`` refuses them instead, naming the keys.
- A group whose SAEs do not fit in memory together (``run_group`` refuses it before any work with a
  ``GroupMemoryError`` carrying its estimate, :mod:`sae_lightning.group.memory`) runs as consecutive groups
  that do (``hydra.launcher.split_by_memory``, on by default).
- A job whose config is refused, or whose SAE diverges, is recorded failed in its ``summary.json`` and
  returns NaN; the others go on. A group that fails as a whole (refused before work, or crashed) records
  each of its jobs failed and the next group starts. A pre-emption signal stops the sweep (after the
  group's checkpoint), as it stops a job of an ungrouped sweep.
- A group's own checkpoints and log go to ``<sweep dir>/.groups/<first>-<last job number>``: the same
  folder when the same sweep is started again (``ckpt_path=auto`` resumes it).

What the other Hydra plugins do with it: the basic sweeper hands this launcher the whole grid at once
(unless ``hydra.sweeper.max_batch_size`` cuts it into batches; groups form within a batch). Optuna's
sweeper calls ``launch`` once per batch of ``hydra.sweeper.n_jobs`` trials (``sweep=optuna_lr`` sets 1),
asking for the next batch only after this one returned, so the trials of a batch are grouped and each
batch is its own group; raise ``n_jobs`` to group more trials, at the price of sampling each batch from
fewer finished trials. The submitit launchers (``hydra/launcher=slurm``, ``local_parallel``) are
launchers themselves: with them nothing is grouped, each job is its own process or SLURM job.

Hydra instantiates launchers only from the ``hydra_plugins`` namespace package: the class it builds is
``hydra_plugins.sae_lightning_grouped.GroupedLauncher``, a subclass of :class:`GroupedLauncher` here. This
module imports no torch at import time, since Hydra imports it in every Hydra app while scanning plugins.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

if TYPE_CHECKING:
    from sae_lightning.group.members import Member
    from sae_lightning.train.rundir import RunSummary

log = logging.getLogger(__name__)


@dataclass
class GroupedLauncherConf:
    """The options of ``hydra/launcher=grouped``."""

    _target_: str = "hydra_plugins.sae_lightning_grouped.GroupedLauncher"  # the class Hydra builds (shim)
    strict: bool = False  # jobs that need more than one activation stream are an error, naming the keys
    split_by_memory: bool = True  # split a group whose SAEs do not fit in memory together


ConfigStore.instance().store(group="hydra/launcher", name="grouped", node=GroupedLauncherConf,
                             provider="sae_lightning")


@dataclass
class Job:
    """One job of a batch: its number, Hydra's record of it, where it sits in the sweep (``job_context``)
    and its member, None when its config was refused (then it is already recorded failed)."""

    num: int
    ret: JobReturn
    ctx: dict[str, Any]
    member: Member | None


def by_stream(jobs: list[Job]) -> list[list[Job]]:
    """The jobs grouped by the stream their SAEs need, in the order of each group's first job."""
    from sae_lightning.group.members import stream_key

    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(stream_key(job.member.config), []).append(job)
    return list(groups.values())


def group_folder(jobs: list[Job]) -> str:
    """``000-007``: the group's first and last job numbers (``004`` for one job); the same for the same
    group of a sweep started again, and distinct for the parts of a group split to fit memory."""
    first, last = jobs[0].num, jobs[-1].num
    return f"{first:03d}" if len(jobs) == 1 else f"{first:03d}-{last:03d}"


def job_numbers(jobs: list[Job]) -> str:
    """``000..007`` for consecutive job numbers, else ``001, 003``."""
    nums = [job.num for job in jobs]
    if len(nums) > 1 and nums == list(range(nums[0], nums[0] + len(nums))):
        return f"{nums[0]:03d}..{nums[-1]:03d}"
    return ", ".join(f"{n:03d}" for n in nums)


def stream_error(groups: list[list[Job]], swept: list[str]) -> str:
    """Why ``strict`` refuses the batch: the swept keys, and the config keys, whose values make the first
    job of a later group need another stream than the first job of the first group."""
    from sae_lightning.group.members import PER_SAE_KEYS, stream_config, stream_differences
    from sae_lightning.sweep.multirun import job_values

    first = groups[0][0]
    differ: dict[str, None] = {}
    changing: dict[str, None] = {}
    for group in groups[1:]:
        other = group[0]
        differ.update(dict.fromkeys(stream_differences(stream_config(first.member.config),
                                                       stream_config(other.member.config))))
        mine, theirs = job_values(first.ctx["overrides"], swept), job_values(other.ctx["overrides"], swept)
        changing.update(dict.fromkeys(k for k in swept if k.split(".")[0] not in PER_SAE_KEYS
                                      and mine.get(k) != theirs.get(k)))
    keys = ", ".join(changing or differ)
    return (f"hydra.launcher.strict=true: the jobs of this sweep need {len(groups)} activation streams, not "
            f"one: the swept key(s) {keys} change the stream ({', '.join(differ)} differ(s) between job "
            f"{first.member.name} and the others). Sweep them separately, or drop hydra.launcher.strict to "
            "train one group per stream")


class GroupedLauncher(Launcher):
    """A Hydra launcher that writes every job's folder, then trains the jobs group by group, each group of
    jobs that share an activation stream in this process from one stream."""

    def __init__(self, strict: bool = False, split_by_memory: bool = True) -> None:
        self.strict, self.split_by_memory = strict, split_by_memory
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Write and validate every job, then train them group by group; every job returns its objective
        (NaN when it failed) with status COMPLETED, so the sweep and Optuna go on."""
        from sae_lightning.checks import ConfigError
        from sae_lightning.console import quiet_console, user_errors_as_messages
        from sae_lightning.sweep.multirun import read_swept_keys

        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Writing %d jobs and grouping them by activation stream", len(job_overrides))
        jobs = [self._write_job(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        self._console_logging()
        valid = [job for job in jobs if job.member is not None]
        for job in jobs:
            if job.member is None:
                self._failed(job, "the job's config was refused (its summary.json says why)")
        streams = by_stream(valid)
        if self.strict and len(streams) > 1:
            with user_errors_as_messages():
                raise ConfigError(stream_error(streams, read_swept_keys(sweep_dir)))
        for n, group in enumerate(streams, 1):
            log.info("group %d: %d job%s (%s) share%s one stream", n, len(group), "s" * (len(group) > 1),
                     job_numbers(group), "" if len(group) > 1 else "s")
        if streams:
            quiet_console()  # as train.py does before training: each Lightning line once, no tips
        for group in streams:
            self._train(group, sweep_dir)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return [job.ret for job in jobs]

    def _write_job(self, num: int, overrides: list[str]) -> Job:
        """Compose job ``num`` and let Hydra write its folder and ``.hydra/`` (as the basic launcher does),
        with a task that validates the job instead of training it."""
        assert self.config is not None and self.hydra_context is not None
        log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = num
            sweep_config.hydra.job.num = num
        seen: dict[str, Any] = {}
        ret = run_job(hydra_context=self.hydra_context, task_function=lambda cfg: as_member(cfg, seen),
                      config=sweep_config, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # off this job's log
        return Job(num, ret, seen["ctx"], ret.return_value)  # as_member never raises (refused: None)

    def _console_logging(self) -> None:
        """The jobs' console logging (Hydra's ``job_logging`` without its file handlers) for training the
        groups: each job's ``train.log`` and the group's log are ``run_group``'s."""
        assert self.config is not None
        conf = OmegaConf.to_container(self.config.hydra.job_logging, resolve=False)
        if isinstance(conf, dict) and isinstance(conf.get("handlers"), dict):
            handlers = conf["handlers"]
            files = [k for k, h in handlers.items() if str(h.get("class", "")).endswith("FileHandler")]
            for name in files:
                del handlers[name]
            root = conf.get("root") or {}
            root["handlers"] = [h for h in root.get("handlers", []) if h not in files]
        configure_log(OmegaConf.create(conf), self.config.hydra.verbose)

    def _memory_parts(self, err: Exception, n: int) -> list[list[int]] | None:
        """When ``run_group`` refused a group of ``n`` SAEs for memory (its ``GroupMemoryError`` carries the
        group's ``estimate``) and ``split_by_memory`` is on: consecutive parts (indices) that each fit;
        None otherwise. Raises ``GroupMemoryError`` when one SAE does not fit even alone."""
        estimate = getattr(err, "estimate", None)
        if not self.split_by_memory or estimate is None or n == 1:
            return None
        parts = self._split_to_fit(estimate)
        return parts if len(parts) > 1 else None

    def _split_to_fit(self, estimate: Any) -> list[list[int]]:
        from sae_lightning.group.memory import split_to_fit

        return split_to_fit(estimate.members, estimate.shared, estimate.available)

    def _failed(self, job: Job, message: str) -> None:
        """A failed job's return: NaN for the basic sweeper; under Optuna a failed job (a failed trial)."""
        from sae_lightning.sweep.multirun import JobFailed, failed_return

        try:
            job.ret.return_value = failed_return(self.config.hydra, message)
        except JobFailed as err:
            job.ret.status, job.ret.return_value = JobStatus.FAILED, err

    def _run_group(self, members: list[Member], group_dir: Path) -> list[RunSummary]:
        from sae_lightning.group.run import run_group

        return run_group(members, group_dir)

    def _train(self, jobs: list[Job], sweep_dir: Path) -> None:
        """Train one group in ``<sweep dir>/.groups/<first>-<last job>`` and set each job's return value. A
        pre-emption is passed on to the launcher's signal handler (e.g. submitit's) and stops the sweep."""
        from sae_lightning.evaluate.after import evaluate_finished
        from sae_lightning.train.callbacks.preemption import pass_on_signal
        from sae_lightning.train.run import TrainingPreempted

        group_dir = sweep_dir / ".groups" / group_folder(jobs)
        try:
            summaries = self._run_group([job.member for job in jobs], group_dir)
        except TrainingPreempted as stopped:
            pass_on_signal(stopped.signum)
            raise
        except Exception as err:  # the sweep goes on with the next group
            self._group_failed(jobs, sweep_dir, err, traceback.format_exc())
            return
        for job, summary in zip(jobs, summaries, strict=True):
            if summary.status == "finished":
                job.ret.return_value = job.member.cfg.objective.value(summary.metrics)
                evaluate_finished(summary, job.member.cfg)
            else:
                log.error("Job %s (%s) FAILED: %s", job.num, " ".join(job.ctx["overrides"]), summary.error)
                self._failed(job, summary.error or "failed")

    def _group_failed(self, jobs: list[Job], sweep_dir: Path, err: Exception, trace: str) -> None:
        """A group that ``run_group`` refused or that crashed: trained as consecutive parts when it was too
        big for memory, else each of its jobs recorded failed with the error."""
        from sae_lightning.sweep.multirun import record_failure
        from sae_lightning.train.loggers import finish_wandb

        try:
            parts = self._memory_parts(err, len(jobs))
        except Exception as alone:  # one SAE does not fit even alone: that is the group's error
            err, trace, parts = alone, traceback.format_exc(), None
        if parts is not None:
            groups = [[jobs[i] for i in part] for part in parts]
            log.info("the %d SAEs of jobs %s do not fit in memory together: %d groups (%s)", len(jobs),
                     job_numbers(jobs), len(groups), "; ".join(job_numbers(group) for group in groups))
            for group in groups:
                self._train(group, sweep_dir)
            return
        for job in jobs:
            record_failure(job.ctx, err, trace)
            self._failed(job, f"{type(err).__name__}: {err}")
        finish_wandb(exit_code=1)


def as_member(cfg: DictConfig, seen: dict[str, Any]) -> Member | None:
    """``run_job``'s task: validate the job as train.py does, group and tag it for W&B as a sweep job, and
    return it as a member; a refused job is recorded failed (``summary.json``) and gives None. Its place in
    the sweep goes to ``seen["ctx"]``."""
    from sae_lightning.checks import ConfigError
    from sae_lightning.config import check_sparsity_override, to_config
    from sae_lightning.group.members import Member
    from sae_lightning.sweep.multirun import (
        _with_wandb_grouping,
        job_context,
        needs_fresh_process,
        record_failure,
    )

    ctx = seen["ctx"] = job_context()
    _with_wandb_grouping(cfg, ctx)
    try:
        train_cfg = to_config(cfg)
        check_sparsity_override(train_cfg, ctx["overrides"])
        if train_cfg.clt:
            raise ConfigError("clt=true trains one cross-layer transcoder over its layers, not an SAE a "
                              "grouped sweep can share a stream with: drop hydra/launcher=grouped (each CLT "
                              "job then runs as its own process)")
        if train_cfg.grouped:
            raise ConfigError("layers=[...]/hooks=[...] make a job a group of its own; with "
                              "hydra/launcher=grouped sweep layer=3,6,9 (or hook=...) instead: the launcher "
                              "trains those jobs from one stream")
        if needs_fresh_process(cfg):
            raise ConfigError(f"trainer.strategy={train_cfg.trainer.strategy} starts each rank by running "
                              "this command again, which in a grouped sweep is the whole sweep: drop "
                              "hydra/launcher=grouped for a DDP sweep (each DDP job then runs as its own "
                              "process)")
    except Exception as err:  # the sweep goes on; the job is recorded failed
        record_failure(ctx, err, traceback.format_exc())
        return None
    return Member(name=ctx["run_dir"].name, run_dir=ctx["run_dir"],
                  config=OmegaConf.to_container(cfg, resolve=True), overrides=ctx["overrides"])

