"""Experiment loggers: a local CSV log for every run, plus Weights & Biases when enabled.

W&B mode ``auto`` means online when the user has credentials and the W&B server answers, offline otherwise
(the run is written under the run directory and ``wandb sync`` uploads it later). The mode is passed to
``wandb.init`` for this run alone; the environment is not changed (../shared/docs/field-notes.md: the
logger's own ``offline=True`` flag leaks into later runs of the same process). A run keeps one W&B id
(``<run>/wandb_run_id``), so a resumed run continues its W&B run.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
import uuid
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger

from sae_lightning.config import LoggerConfig
from sae_lightning.io import atomic_write_text
from sae_lightning.train.rundir import RunDir

log = logging.getLogger(__name__)


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _server_reachable(timeout: float = 2.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(cfg: LoggerConfig) -> str:
    """The W&B mode of this run: an explicit ``WANDB_MODE`` wins, then ``logger.mode``, then detection."""
    if not cfg.wandb:
        return "disabled"
    env = os.environ.get("WANDB_MODE")
    if env:
        return "offline" if env == "dryrun" else env
    if cfg.mode != "auto":
        return cfg.mode
    if _has_credentials() and _server_reachable():
        return "online"
    return "offline"


def wandb_run_id(run: RunDir) -> str:
    """This run folder's W&B id, created on its first use (a resume continues the same W&B run)."""
    if run.wandb_run_id.is_file():
        return run.wandb_run_id.read_text().strip()
    run_id = uuid.uuid4().hex[:8]  # W&B's own ids are 8 lowercase alphanumerics too
    atomic_write_text(run.wandb_run_id, run_id)
    return run_id


def build_loggers(cfg: LoggerConfig, run: RunDir, run_name: str, config: dict,
                  own_wandb_run: bool = False) -> list[Logger]:
    """CSV always; W&B unless disabled. ``config`` (plain values) becomes the W&B run config.

    ``own_wandb_run``: start the W&B run now as a run of its own beside others in this process (a group
    member's; Lightning's logger would otherwise reuse the process's current run)."""
    run_dir = run.path
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    mode = resolve_wandb_mode(cfg)
    if mode == "disabled":
        return loggers
    from lightning.pytorch.loggers import WandbLogger

    wandb_logger = WandbLogger(
        project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None,
        name=run_name, save_dir=str(run_dir), config=config, mode=mode, id=wandb_run_id(run),
        resume="allow",
    )
    # Lightning always hands wandb.init an `anonymous` setting (None when unused); recent wandb (0.31 here)
    # warns on every run that it has no effect. Left out, wandb behaves the same and says nothing.
    wandb_logger._wandb_init.pop("anonymous", None)
    if mode == "offline":
        log.info("W&B is offline (no credentials or no network): the run is saved under %s/wandb; "
                 "upload it later with `wandb sync %s/wandb/offline-run-*`", run_dir, run_dir)
    if own_wandb_run:
        import wandb

        wandb_logger._experiment = wandb.init(**wandb_logger._wandb_init, reinit="create_new")
        wandb_logger._experiment.define_metric("trainer/global_step")
        wandb_logger._experiment.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    loggers.append(wandb_logger)
    return loggers


class MemberLoggers(Logger):
    """The one logger of a group's trainer: routes ``<name>/<key>`` metrics to that member's own loggers
    (as ``<key>``) and metrics without a member prefix (tokens/s, epoch) to every member's."""

    def __init__(self, routes: dict[str, list[Logger]]) -> None:
        super().__init__()
        self.routes = routes

    @property
    def name(self) -> str:
        return "members"

    @property
    def version(self) -> str:
        return ""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        shared = {k: v for k, v in metrics.items() if not any(k.startswith(p) for p in self.routes)}
        for prefix, loggers in self.routes.items():
            own = {**{k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}, **shared}
            for lg in loggers:
                lg.log_metrics(own, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Each member's loggers were given its own config when they were built."""

    def save(self) -> None:
        for lg in self._all():
            lg.save()

    def finalize(self, status: str) -> None:
        for lg in self._all():
            lg.finalize(status)

    def _all(self) -> list[Logger]:
        return [lg for loggers in self.routes.values() for lg in loggers]


def loggers_for(trainer: Any, prefix: str) -> list[Logger]:
    """The loggers of the SAE whose metric keys start with ``prefix`` (``""``: the trainer's own)."""
    if not prefix:
        return list(trainer.loggers)
    return [lg for router in trainer.loggers if isinstance(router, MemberLoggers)
            for lg in router.routes.get(prefix, [])]


def finish_member_runs(loggers: list[Logger], exit_code: int) -> None:
    """End the W&B runs a group's members started (``own_wandb_run``)."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger" and lg._experiment is not None:
            lg._experiment.finish(exit_code=exit_code)


def finish_wandb(exit_code: int | None = None) -> None:
    """End the W&B run so the next job of a multirun gets a fresh run id. Called while an exception is
    propagating (from a ``finally``), the run is marked failed."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        if exit_code is None:
            exit_code = 1 if sys.exc_info()[0] is not None else 0
        wandb.finish(exit_code=exit_code)
