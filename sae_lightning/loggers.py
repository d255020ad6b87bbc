"""Experiment loggers: a local CSV log for every run, plus Weights & Biases when enabled.

W&B mode ``auto`` means online when the user has credentials and the W&B server answers, offline otherwise
(the run is written under the run directory and ``wandb sync`` uploads it later). The mode is decided once,
at start-up, through the ``WANDB_MODE`` environment variable (see ../shared/docs/field-notes.md: the
logger's own ``offline=True`` flag leaks into later runs of the same process).
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger

from sae_lightning.config import LoggerConfig

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


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict) -> list[Logger]:
    """CSV always; W&B unless disabled. ``config`` (plain values) becomes the W&B run config."""
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    mode = resolve_wandb_mode(cfg)
    if mode == "disabled":
        return loggers
    os.environ["WANDB_MODE"] = mode
    from lightning.pytorch.loggers import WandbLogger

    wandb_logger = WandbLogger(
        project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags) or None,
        name=run_name, save_dir=str(run_dir), config=config,
    )
    # Lightning always hands wandb.init an `anonymous` setting (None when unused); recent wandb (0.31 here)
    # warns on every run that it has no effect. Left out, wandb behaves the same and says nothing.
    wandb_logger._wandb_init.pop("anonymous", None)
    if mode == "offline":
        log.info("W&B is offline (no credentials or no network): the run is saved under %s/wandb; "
                 "upload it later with `wandb sync %s/wandb/offline-run-*`", run_dir, run_dir)
    loggers.append(wandb_logger)
    return loggers


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
