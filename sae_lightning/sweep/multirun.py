"""Hydra multirun support: readable job directories, W&B grouping, failure capture, DDP jobs, sweep summary.

- Job directories are ``<sweep dir>/<job number>_<swept key>=<value>...`` (only the swept keys), through the
  ``${sweep_subdir:...}`` resolver used by ``hydra.sweep.subdir`` in ``conf/train.yaml``.
- :class:`SweepCallback` (a Hydra callback) records the swept keys when the sweep starts and writes the
  comparison (``sae_lightning.sweep.compare``) with the list of ok/failed jobs when it ends.
- :func:`run_sweep_job` runs one job so that a failure is written to the job's ``summary.json`` instead of
  stopping the sweep, and so that ``strategy=ddp`` (which re-launches ``sys.argv``, i.e. the whole sweep, in
  each child: see ../shared/docs/field-notes.md) runs as a fresh single-run process per job.

This module imports no torch/Lightning at import time: Hydra instantiates the callback before every run.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sae_lightning.config import ObjectiveConfig
from sae_lightning.io import atomic_write_json
from sae_lightning.train.rundir import RunDir, RunSummary

log = logging.getLogger(__name__)

SWEPT_KEYS_FILE = "swept_keys.json"
"""The sweep's swept keys, written into the sweep folder by :class:`SweepCallback` before any job starts;
every job (local, parallel or on SLURM) reads them from there for its folder name and W&B tags."""

FAILED_RETURN = float("nan")
"""What a failed job returns to the basic sweeper: a number, so the sweep goes on (:func:`failed_return`)."""


class JobFailed(RuntimeError):
    """A failed job (already recorded in its ``summary.json``), raised to a sweeper that makes a failed
    trial of a raised job and aborts on a NaN objective (Optuna)."""


def fails_on_nan(hydra: Any) -> bool:
    """Whether the sweeper of the ``hydra`` config node aborts on a NaN objective (Optuna's ``study.tell``
    raises) and records a failed trial for a job that raised instead."""
    return "optuna" in str(OmegaConf.select(hydra, "sweeper._target_", default="")).lower()


def failed_return(hydra: Any, message: str) -> float:
    """What a failed job gives its sweeper: ``FAILED_RETURN``; under Optuna it raises ``JobFailed``, which
    Hydra records as a failed job and Optuna as a failed trial, and the study goes on."""
    if fails_on_nan(hydra):
        raise JobFailed(message)
    return FAILED_RETURN

# strategies whose Lightning launcher re-executes sys.argv in child processes
_SCRIPT_LAUNCHED = re.compile(r"^ddp(?!_spawn|_fork|_notebook)")


def swept_keys(overrides: Iterable[str]) -> list[str]:
    """Keys that take several values (``a=1,2``, ``range()``, ``choice()``, ``interval()``...); a later plain
    override of the same key fixes it again (preset params come first, the command line after)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    swept: dict[str, bool] = {}
    for o in parsed:
        swept[o.get_key_element().lstrip("+~")] = o.is_sweep_override()
    return [k for k, is_sweep in swept.items() if is_sweep]


def sweep_overrides(config: DictConfig) -> list[str]:
    """The sweep's definition: preset ``hydra.sweeper.params`` (if any) then the command-line overrides."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    return [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", text).strip("-")


def _short_value(value: str) -> str:
    """Long floats (Optuna's ``0.0022881136684755237``) shortened to 4 significant digits for folder names."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if len(value) > 8 and "." in value else value


def job_values(task_overrides: Iterable[str], keys: Iterable[str]) -> dict[str, str]:
    """The job's value (as overridden) of each swept key, in the order of ``keys``."""
    given = {o.get_key_element().lstrip("+~"): o.get_value_element_as_str()
             for o in OverridesParser.create().parse_overrides(list(task_overrides))}
    return {k: given[k] for k in keys if k in given}


def short_names(keys: list[str]) -> dict[str, str]:
    """``sae.dict_mult`` -> ``dict_mult``, unless two keys share the last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}


def read_swept_keys(sweep_dir: str | Path) -> list[str]:
    """The keys :class:`SweepCallback` recorded for the sweep in ``sweep_dir`` (none outside a sweep)."""
    try:
        return list(json.loads((Path(sweep_dir) / SWEPT_KEYS_FILE).read_text()))
    except (OSError, ValueError):
        return []


def sweep_subdir(num: int, task_overrides: Iterable[str], sweep_dir: str) -> str:
    """``003_dict_mult=8_l1=3`` for job 3: the job number and only the swept values."""
    values = job_values(task_overrides, read_swept_keys(sweep_dir))
    names = short_names(list(values))
    parts = [f"{int(num):03d}", *(_safe(f"{names[k]}={_short_value(v)}") for k, v in values.items())]
    return "_".join(parts)


def register_resolvers() -> None:
    """``${sweep_subdir:${hydra.job.num},${hydra.overrides.task},${hydra.sweep.dir}}`` for
    ``hydra.sweep.subdir``."""
    if not OmegaConf.has_resolver("sweep_subdir"):
        OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir)


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group(sweep_dir: str | Path, preset: str | None) -> str:
    """W&B group of every job of one sweep: the preset name (or ``sweep``) and the sweep directory's stamp."""
    parts = dict.fromkeys([preset or "sweep", *Path(sweep_dir).parts[-2:]])  # the preset may name the folder
    return _safe("-".join(parts))


def job_context() -> dict[str, Any]:
    """Where this job sits in its sweep: directory, number, overrides, W&B group and tags (swept values)."""
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    values = job_values(overrides, read_swept_keys(hc.sweep.dir))
    return {
        "run_dir": Path(hc.runtime.output_dir),
        "job_num": hc.job.num,
        "overrides": overrides,
        "group": sweep_group(hc.sweep.dir, hc.runtime.choices.get("sweep")),
        "tags": [f"{k}={v}"[:64] for k, v in values.items()],
    }


def _with_wandb_grouping(cfg: DictConfig, ctx: dict[str, Any]) -> None:
    """Group the job's W&B run by sweep and tag it with its swept values (unless the user chose a group)."""
    if cfg.logger.group is None:
        cfg.logger.group = ctx["group"]
    cfg.logger.tags = [*cfg.logger.tags, *ctx["tags"]]


def write_failure(run_dir: Path, error: str, trace: str, overrides: list[str]) -> None:
    """The failed job's ``summary.json``: what :mod:`sae_lightning.sweep.compare` lists as failed, and why. A
    summary saying the run was pre-empted (its own process was stopped by a signal) is kept."""
    run = RunDir(run_dir)
    previous = run.read_summary()
    if previous is not None and previous.status == "preempted":
        return
    run.write_summary(RunSummary(status="failed", run_dir=str(run_dir), error=error, traceback=trace,
                                 overrides=overrides))


def record_failure(ctx: dict[str, Any], err: BaseException, trace: str) -> None:
    """Log a failed job (``ctx`` from :func:`job_context`) and write its failure ``summary.json``."""
    message = f"{type(err).__name__}: {err}"
    log.error("Job %s (%s) FAILED: %s", ctx["job_num"], " ".join(ctx["overrides"]), message)
    write_failure(ctx["run_dir"], message, trace, ctx["overrides"])


def needs_fresh_process(cfg: DictConfig) -> bool:
    """True for ``strategy=ddp`` started by us: Lightning would re-launch the whole sweep in each child.
    Not when SLURM/torchrun already started one process per device (e.g. the submitit launcher)."""
    if not _SCRIPT_LAUNCHED.match(str(cfg.trainer.strategy)):
        return False
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    return not (SLURMEnvironment.detect() or TorchElasticEnvironment.detect())


def _single_run_command(script: str, ctx: dict[str, Any], cfg: DictConfig) -> list[str]:
    """``python train.py <this job's overrides> hydra.mode=RUN hydra.run.dir=<job dir>`` + W&B grouping
    (the job's ``.hydra/`` written by the sweep is kept: the comparison reads the job's overrides there)."""
    mine = {"logger.group", "logger.tags", "hydra.mode", "hydra.run.dir"}
    keep = [o for o in ctx["overrides"] if o.split("=", 1)[0].lstrip("+~") not in mine]
    tags = ",".join(_quoted(t) for t in cfg.logger.tags)
    extra = ["hydra.mode=RUN", f"hydra.run.dir={_quoted(str(ctx['run_dir']))}", "hydra.output_subdir=null",
             f"logger.tags=[{tags}]"]
    if cfg.logger.group is not None:
        extra.append(f"logger.group={_quoted(cfg.logger.group)}")
    return [sys.executable, script, *keep, *extra]


def _quoted(value: str) -> str:
    """A string as a Hydra override value (job folders contain ``=``, which must be quoted)."""
    return "'" + value.replace("'", "\\'") + "'"


def _error_line(lines: list[str]) -> str:
    """The exception line of a traceback (``ValueError: ...``), else the last line."""
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
    return (errors or lines or ["no error output"])[-1]


def run_in_fresh_process(command: list[str], ctx: dict[str, Any], objective: ObjectiveConfig) -> float:
    """Run one job as its own process (stdout passed through, stderr echoed and its tail kept for the
    failure summary); returns the job's objective from its ``summary.json``."""
    log.info("Job %s runs in a fresh process (DDP): %s", ctx["job_num"], " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=60)
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace", env=env) as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
    if proc.returncode != 0:
        lines = [line.strip() for line in tail if line.strip()]
        raise ChildFailed(f"exit code {proc.returncode}: {_error_line(lines)}", "".join(tail))
    summary = RunDir(ctx["run_dir"]).read_summary()
    return objective.value(summary.metrics) if summary else FAILED_RETURN


class ChildFailed(RuntimeError):
    """A job's own process failed; ``trace`` holds the end of its error output."""

    def __init__(self, message: str, trace: str) -> None:
        super().__init__(message)
        self.trace = trace


def run_sweep_job(cfg: DictConfig, train: Callable[[DictConfig], float], script: str) -> float:
    """One job of a multirun: grouped/tagged for W&B, in a fresh process when DDP needs it, and never raising
    (a failure is logged and written to the job's ``summary.json``, and the sweep goes on)."""
    ctx = job_context()
    _with_wandb_grouping(cfg, ctx)
    try:
        if needs_fresh_process(cfg):
            objective = ObjectiveConfig(**OmegaConf.to_container(cfg.objective, resolve=True))
            return run_in_fresh_process(_single_run_command(script, ctx, cfg), ctx, objective)
        return train(cfg)
    except Exception as err:  # the sweep must go on; the error is recorded, not swallowed
        record_failure(ctx, err, err.trace if isinstance(err, ChildFailed) else traceback.format_exc())
        from sae_lightning.train.loggers import finish_wandb

        finish_wandb(exit_code=1)
        return failed_return(HydraConfig.get(), f"{type(err).__name__}: {err}")


class SweepCallback(Callback):
    """Publishes the swept keys to the jobs at the start; writes the sweep's comparison at the end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        keys = swept_keys(sweep_overrides(config))
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sweep_dir / SWEPT_KEYS_FILE, keys)
        log.info("Sweep over %s -> %s", ", ".join(keys) or "(nothing)", config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from sae_lightning.sweep.compare import compare_sweep

        sweep_dir = Path(config.hydra.sweep.dir)
        group = None
        if _uses_wandb(config):
            group = config.logger.group or sweep_group(sweep_dir, _preset(config))
        try:
            result = compare_sweep(sweep_dir, wandb_group=group)
        except Exception:  # a broken comparison must not hide the finished jobs
            log.exception("Could not write the comparison of %s", sweep_dir)
            return
        for line in result.summary_lines():
            log.info(line)


def _preset(config: DictConfig) -> str | None:
    return OmegaConf.select(config, "hydra.runtime.choices.sweep")


def _uses_wandb(config: DictConfig) -> bool:
    """Whether the sweep's jobs log to W&B (then the comparison goes to W&B too)."""
    from sae_lightning.config import LoggerConfig
    from sae_lightning.train.loggers import resolve_wandb_mode

    settings = OmegaConf.to_container(config.logger, resolve=True)
    return resolve_wandb_mode(LoggerConfig(**settings)) != "disabled"
