"""``evaluate.enabled=true``: ``evaluate.py``'s pipeline on a run's trained SAE as soon as training ends.

Called by ``train.py`` for a single run and each job of a sweep, by ``train_group`` for each member of a
``layers=[...]`` run, and by the grouped launcher for each job of a group. The run's ``eval/`` folder is
what ``python evaluate.py ckpt_path=<run> <evaluate.overrides>`` writes, so the sweep's comparison page
reads it as it reads a run evaluated by hand. The numbers also go to the run's W&B run (the same run id,
resumed) as ``eval/<key>`` in its summary. A failed evaluation does not undo the training: it is logged,
and the run's ``summary.json`` keeps status ``finished`` with the error beside it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any

from sae_lightning.config import LoggerConfig, TrainConfig
from sae_lightning.io import atomic_write_json
from sae_lightning.train.rundir import RunDir, RunSummary

log = logging.getLogger(__name__)


def evaluate_finished(summary: RunSummary, cfg: TrainConfig) -> dict[str, Any] | None:
    """Evaluate a finished run when ``cfg.evaluate.enabled`` (on the global rank 0 only); returns its
    ``metrics.json``, to which it adds ``eval_seconds`` (the evaluation's wall time), or None when nothing was
    evaluated or the evaluation failed."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if not cfg.evaluate.enabled or summary.status != "finished" or getattr(rank_zero_only, "rank", 0) != 0:
        return None
    run = RunDir(summary.run_dir)
    start = time.perf_counter()
    try:
        from sae_lightning.evaluate.run import run_evaluation

        path = run_evaluation(cfg.evaluate.eval_config(run.path))
        metrics = json.loads(Path(path).read_text())
    except Exception as err:  # the SAE is trained and saved: record why its evaluation failed, go on
        log.error("Evaluation of %s FAILED: %s: %s", run.path, type(err).__name__, err)
        summary.error = f"evaluation failed: {type(err).__name__}: {err}"
        summary.traceback = traceback.format_exc()
        run.write_summary(summary)
        return None
    metrics["eval_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(Path(path), metrics)
    log.info("Evaluated %s in %.0f s: %s", run.path.name, metrics["eval_seconds"], path)
    log_to_wandb_run(run, cfg.logger, metrics)
    return metrics


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a ``metrics.json`` (paths and labels left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_to_wandb_run(run: RunDir, logger: LoggerConfig, metrics: dict[str, Any]) -> None:
    """Add the evaluation's numbers to the run's W&B run (resumed by its id) as ``eval/<key>`` in its
    summary, so W&B's run table and the sweep's group show them beside the training metrics."""
    from sae_lightning.train.loggers import resolve_wandb_mode, wandb_run_id

    mode = resolve_wandb_mode(logger)
    if mode == "disabled":
        return
    import wandb

    wb = wandb.init(project=logger.project, entity=logger.entity, group=logger.group,
                    tags=list(logger.tags) or None, id=wandb_run_id(run), resume="allow", dir=str(run.path),
                    mode=mode, reinit="create_new")
    values = {f"eval/{k}": v for k, v in numbers(metrics).items()}
    wb.log(values)
    wb.summary.update(values)
    wb.finish()
