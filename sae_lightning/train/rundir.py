"""The run folder: the one place that knows what a training run writes where, and its typed summary.

```
<run>/
  summary.json        RunSummary: status (finished | preempted | failed), where things are, final metrics
  sae/                the trained SAE (cfg.json + sae.safetensors; SAE.load), written at the end of a run
  clt/                instead of sae/ for clt=true: the cross-layer transcoder (circuits.clt.load_clt)
  checkpoints/        Lightning checkpoints (resuming): step*.ckpt, last.ckpt, final.ckpt
  csv/metrics.csv     training curves (earlier ones of a resumed run kept as metrics-<n>.csv)
  resume_key.json     the config fingerprint ``ckpt_path=last`` looks for
  wandb/              W&B files (offline runs); wandb_run_id holds the id a resume continues
  eval/               evaluate.py's outputs (metrics.json, saebench_core.json, report.html, saelens/)
  .hydra/, train.log  Hydra's record of the command
```
Written by training (``run.py``) and by a failed sweep job (``sweep/multirun.py``); read by
``sweep/compare.py``, ``evaluate.py`` and the sweep objective.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_lightning.io import atomic_write_json


@dataclass
class RunSummary:
    """``summary.json``. ``metrics`` holds the last logged ``train/*`` and ``val/*`` scalars."""

    status: str  # finished | preempted | failed
    run_dir: str = ""
    checkpoint: str | None = None
    sae_dir: str | None = None
    steps: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    architecture: str | None = None
    d_in: int | None = None
    d_sae: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None
    error: str | None = None
    traceback: str | None = None
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


class RunDir:
    """Paths inside one run folder (module docstring) and its summary."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run folder holding ``path``: a run folder itself, its ``sae/`` or a checkpoint in it."""
        p = Path(path).resolve()
        if p.is_file() and p.parent.name == "checkpoints":
            return cls(p.parent.parent)
        if p.name == "sae" and (p.parent / "summary.json").exists():
            return cls(p.parent)
        return cls(p)

    checkpoints = property(lambda self: self.path / "checkpoints")
    sae = property(lambda self: self.path / "sae")
    clt = property(lambda self: self.path / "clt")  # a clt=true run's cross-layer transcoder
    summary_path = property(lambda self: self.path / "summary.json")
    csv_log = property(lambda self: self.path / "csv" / "metrics.csv")
    resume_key = property(lambda self: self.path / "resume_key.json")
    wandb_run_id = property(lambda self: self.path / "wandb_run_id")
    eval = property(lambda self: self.path / "eval")

    def write_summary(self, summary: RunSummary) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.summary_path, dataclasses.asdict(summary))

    def read_summary(self) -> RunSummary | None:
        """The summary, or None when there is none (still running, killed) or it is unreadable."""
        try:
            values = json.loads(self.summary_path.read_text())
        except (OSError, ValueError):
            return None
        known = {f.name for f in dataclasses.fields(RunSummary)}
        return RunSummary(**{k: v for k, v in values.items() if k in known})

    def keep_previous_csv_log(self) -> None:
        """A resumed run would restart ``csv/metrics.csv`` (Lightning's CSV logger rewrites it): move the
        earlier log aside to ``metrics-<n>.csv`` so no earlier output is lost."""
        if self.csv_log.exists():
            n = 1 + sum(1 for _ in self.csv_log.parent.glob("metrics-*.csv"))
            self.csv_log.rename(self.csv_log.with_name(f"metrics-{n}.csv"))
