"""Compare the runs of a sweep without W&B: ``python -m sae_lightning.compare <sweep dir>``.

Reads every ``<run>/summary.json`` under the directory (written by training, or by a failed job) and, when
present, ``<run>/eval/metrics.json`` (written by evaluate.py; it wins over the training-time numbers), then
writes into the sweep directory:

- ``comparison.csv`` / ``comparison.md``: one row per run: swept values, status, L0, normalized MSE,
  explained variance, dead fraction, CE loss recovered (when evaluated), steps, seconds, error;
- ``frontier.png``: L0 against normalized MSE, with the Pareto frontier (lower is better on both);
- ``comparison.html``: the table and the plot in one self-contained page (the PNG is embedded);
- ``sweep_summary.json``: which runs are ok, which failed and why.

With ``--wandb-group`` (and at the end of a sweep whose jobs logged to W&B) the table, plot and page are also
logged to a W&B run named ``<group>-comparison`` in the sweep's group.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sae_lightning.rundir import RunDir, RunSummary

log = logging.getLogger(__name__)

METRICS: dict[str, str] = {
    "l0": "L0",
    "nmse": "normalized MSE",
    "explained_variance": "explained variance",
    "dead_fraction": "dead fraction",
    "ce_loss_recovered": "CE loss recovered",
}
"""Compared numbers (the keys of evaluate.py's ``eval/metrics.json``) and their column titles."""

TRAIN_KEYS = {"l0": "val/l0", "nmse": "val/nmse", "explained_variance": "val/explained_variance",
              "dead_fraction": "val/dead_fraction"}
"""Where each number is in a training ``summary.json`` when the run was not evaluated: the same
definitions, over the validation rows (``dead_fraction``: never fired on them, not the training window's
``train/dead_fraction_window``)."""


@dataclass
class RunResult:
    """One run of the sweep as the comparison sees it."""

    name: str
    path: Path
    status: str  # finished (written by training) | failed | preempted | incomplete
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    source: str = ""  # eval | train
    steps: int | None = None
    seconds: float | None = None
    error: str = ""

    def override_values(self) -> dict[str, str]:
        return dict(o.lstrip("+~").split("=", 1) for o in self.overrides if "=" in o)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _overrides(run_dir: Path, summary: RunSummary | None) -> list[str]:
    hydra_overrides = run_dir / ".hydra" / "overrides.yaml"
    if hydra_overrides.is_file():
        return [str(o) for o in yaml.safe_load(hydra_overrides.read_text()) or []]
    return list(summary.overrides) if summary else []


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def read_run(run_dir: Path) -> RunResult:
    """A run's status, overrides and final metrics (evaluation first, else training validation)."""
    folder = RunDir(run_dir)
    summary = folder.read_summary()
    evaluation = _read_json(folder.eval / "metrics.json")
    run = RunResult(run_dir.name, run_dir, "incomplete", _overrides(run_dir, summary))
    if summary is None:
        run.error = "no summary.json (still running, or killed)"
        return run
    run.status = summary.status
    run.error = summary.error or ""
    run.steps, run.seconds = summary.steps, summary.train_seconds
    if evaluation is not None:
        run.metrics, run.source = _finite({k: evaluation.get(k) for k in METRICS}), "eval"
    elif run.status == "finished":
        run.metrics = _finite({k: summary.metrics.get(name) for k, name in TRAIN_KEYS.items()})
        run.source = "train"
    return run


def find_runs(sweep_dir: Path) -> list[RunResult]:
    """Every run directory under ``sweep_dir``: those with a ``summary.json`` or a Hydra ``.hydra`` folder."""
    dirs = {p.parent for p in sweep_dir.rglob("summary.json")} | {p.parent for p in sweep_dir.rglob(".hydra")}
    dirs -= {p.parent for p in sweep_dir.rglob("group.json")}  # a group's own folder is not a run
    dirs.discard(sweep_dir)
    return [read_run(d) for d in sorted(dirs)]


def swept_keys(runs: list[RunResult]) -> list[str]:
    """Override keys whose values differ between runs, in the order they were given."""
    values = [r.override_values() for r in runs]
    keys = list(dict.fromkeys(k for v in values for k in v))
    return [k for k in keys if len({v.get(k) for v in values}) > 1]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both L0 and NMSE (lower is better), by increasing L0."""
    order = sorted(range(len(points)), key=lambda i: points[i])
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _fmt(value: float | int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 10):
        return str(int(value))
    return f"{value:.4g}"


@dataclass
class Comparison:
    """The runs of one sweep directory and what is written about them."""

    sweep_dir: Path
    runs: list[RunResult]
    keys: list[str]

    @property
    def columns(self) -> list[str]:
        return ["run", *self.keys, "status", *METRICS.values(), "metrics from", "steps", "train s", "error"]

    def rows(self) -> list[list[str]]:
        rows = []
        for r in self.runs:
            values = r.override_values()
            rows.append([r.name, *(values.get(k, "") for k in self.keys), r.status,
                         *(_fmt(r.metrics.get(k)) for k in METRICS), r.source, _fmt(r.steps),
                         _fmt(r.seconds), r.error])
        return rows

    def failed(self) -> list[RunResult]:
        return [r for r in self.runs if r.status != "finished"]

    def summary_lines(self) -> list[str]:
        bad = len(self.failed())
        lines = [f"Sweep {self.sweep_dir}: {len(self.runs) - bad} finished, {bad} failed/unfinished, "
                 f"comparison in {self.sweep_dir / 'comparison.html'}"]
        lines += [f"  {r.status.upper()} {r.name}: {r.error}" for r in self.failed()]
        return lines

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        rule = "|" + "---|" * len(self.columns)
        body = ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |"
                for row in self.rows()]
        return "\n".join([head, rule, *body]) + "\n"

    def frontier_points(self) -> tuple[list[RunResult], list[tuple[float, float]]]:
        runs = [r for r in self.runs if "l0" in r.metrics and "nmse" in r.metrics]
        return runs, [(r.metrics["l0"], r.metrics["nmse"]) for r in runs]


def plot_frontier(comparison: Comparison, path: Path) -> None:
    """Scatter of L0 against normalized MSE for every run with both numbers (labelled with the job number),
    the Pareto frontier joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, points = comparison.frontier_points()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    if points:
        xs, ys = zip(*points, strict=True)
        ax.scatter(xs, ys, color="tab:blue", zorder=3, label="runs")
        front = pareto_front(points)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], color="tab:red", zorder=2, label="frontier")
        for r, (x, y) in zip(runs, points, strict=True):
            ax.annotate(r.name.split("_")[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no finished run has L0 and NMSE", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("normalized MSE")
    ax.set_title(f"Sparsity / reconstruction: {comparison.sweep_dir.name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_html(comparison: Comparison, png: Path) -> str:
    """One self-contained page: the table, the embedded frontier plot, and the failures with their errors."""
    image = base64.b64encode(png.read_bytes()).decode()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in comparison.columns)
    body = "".join("<tr class='{}'>{}</tr>".format(
        "ok" if r.status == "finished" else "bad", "".join(f"<td>{html.escape(c)}</td>" for c in row))
        for r, row in zip(comparison.runs, comparison.rows(), strict=True))
    failures = "".join(f"<li><b>{html.escape(r.name)}</b>: {html.escape(r.error)}</li>"
                       for r in comparison.failed())
    title = html.escape(f"SAE sweep comparison: {comparison.sweep_dir}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} tr.bad{{background:#fdd}}
th{{background:#eee}}</style></head><body>
<h1>{title}</h1>
<p>{len(comparison.runs)} runs; swept: {html.escape(", ".join(comparison.keys) or "nothing")}.
Metrics come from <code>eval/metrics.json</code> when the run was evaluated, else from the last validation
during training. Lower L0 and lower normalized MSE are better; the red line is the Pareto frontier.</p>
<img alt="L0 against normalized MSE" src="data:image/png;base64,{image}">
<table><tr>{head}</tr>{body}</table>
{"<h2>Failed runs</h2><ul>" + failures + "</ul>" if failures else ""}
</body></html>
"""


def write_comparison(comparison: Comparison) -> dict[str, Path]:
    """Write the CSV, Markdown, PNG, HTML and ``sweep_summary.json`` into the sweep directory."""
    out = comparison.sweep_dir
    paths = {name: out / name for name in ("comparison.csv", "comparison.md", "frontier.png",
                                           "comparison.html", "sweep_summary.json")}
    with paths["comparison.csv"].open("w", newline="") as f:
        csv.writer(f).writerows([comparison.columns, *comparison.rows()])
    paths["comparison.md"].write_text(comparison.markdown())
    plot_frontier(comparison, paths["frontier.png"])
    paths["comparison.html"].write_text(render_html(comparison, paths["frontier.png"]))
    summary = {
        "sweep_dir": str(out), "swept": comparison.keys,
        "ok": [r.name for r in comparison.runs if r.status == "finished"],
        "failed": [{"run": r.name, "status": r.status, "error": r.error} for r in comparison.failed()],
        "runs": [dict(zip(comparison.columns, row, strict=True)) for row in comparison.rows()],
    }
    paths["sweep_summary.json"].write_text(json.dumps(summary, indent=2))
    return paths


def _logger_settings(runs: list[RunResult]) -> dict[str, Any]:
    """The W&B project/entity/mode the jobs used (from their saved Hydra config); defaults without one."""
    for r in runs:
        config = r.path / ".hydra" / "config.yaml"
        if config.is_file():
            return (yaml.safe_load(config.read_text()) or {}).get("logger", {})
    return {}


def log_to_wandb(comparison: Comparison, paths: dict[str, Path], group: str,
                 settings: dict[str, Any]) -> None:
    """The table, the frontier plot and the page as a W&B run ``<group>-comparison`` in the sweep's group."""
    import wandb

    from sae_lightning.config import LoggerConfig
    from sae_lightning.loggers import resolve_wandb_mode

    mode = resolve_wandb_mode(LoggerConfig(wandb=True, mode=settings.get("mode", "auto")))
    run = wandb.init(project=settings.get("project", "sae-lightning"), entity=settings.get("entity"),
                     group=group, name=f"{group}-comparison", job_type="comparison", mode=mode,
                     dir=str(comparison.sweep_dir), config={"swept": comparison.keys})
    table = wandb.Table(columns=comparison.columns, data=comparison.rows())
    run.log({"comparison/table": table, "comparison/frontier": wandb.Image(str(paths["frontier.png"])),
             "comparison/page": wandb.Html(paths["comparison.html"].read_text())})
    run.finish()


def compare_sweep(sweep_dir: Path, wandb_group: str | None = None) -> Comparison:
    """Read and write the comparison of a sweep; log it to W&B too when a group is given."""
    runs = find_runs(sweep_dir)
    comparison = Comparison(sweep_dir, runs, swept_keys(runs))
    paths = write_comparison(comparison)
    if wandb_group:
        log_to_wandb(comparison, paths, wandb_group, _logger_settings(runs))
    return comparison


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sae_lightning.compare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("sweep_dir", type=Path,
                        help="a multirun directory (or any folder of run directories)")
    parser.add_argument("--wandb-group", help="also log the comparison to W&B in this group")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    comparison = compare_sweep(args.sweep_dir, args.wandb_group)
    print(comparison.markdown())
    print("\n".join(comparison.summary_lines()))


if __name__ == "__main__":
    main()
