"""Compare the runs of a sweep without W&B: ``python -m sae_lightning.sweep.compare <sweep dir>``.

Reads every ``<run>/summary.json`` under the directory (written by training, or by a failed job) and, when
present, ``<run>/eval/metrics.json`` (written by evaluate.py; it wins over the training-time numbers), then
writes into the sweep directory:

- ``comparison.csv`` / ``comparison.md``: one row per run: swept values, status, L0, normalized MSE,
  explained variance, dead fraction, CE loss recovered (when evaluated), the interpretability numbers and
  their intervals (when some run has them), steps, seconds, error;
- ``frontier.png``: L0 against normalized MSE, with the Pareto frontier (lower is better on both);
- ``interpretability.png`` (when some run was evaluated with the monosemanticity score, e.g. by
  ``evaluate.enabled=true``): the score's medians, with their intervals, against L0 and against
  explained variance;
- ``comparison.html``: the table and the plots in one self-contained page (the PNGs are embedded);
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

from sae_lightning.train.rundir import RunDir, RunSummary

log = logging.getLogger(__name__)

METRICS: dict[str, str] = {
    "l0": "L0",
    "nmse": "normalized MSE",
    "explained_variance": "explained variance",
    "dead_fraction": "dead fraction",
    "ce_loss_recovered": "CE loss recovered",
}
"""Compared numbers (the keys of evaluate.py's ``eval/metrics.json``) and their column titles."""

SCORES: dict[str, str] = {
    "latent_coherence_median": "latent coherence",
    "neuron_coherence_median": "neuron coherence",
    "latent_minus_neuron_coherence_median": "latent - neuron coherence",
    "latent_token_matched_lift_median": "latent token-matched lift",
    "absorption_rate": "absorption rate",
    "absorption_fraction": "absorption fraction",
}
"""Interpretability numbers of ``eval/metrics.json`` (the monosemanticity medians, absorption) and their
column titles: a column appears when some run has the number, its interval (``<key>_ci_low``,
``<key>_ci_high``) beside it when some run has one."""

CI_SUFFIXES = ("_ci_low", "_ci_high")

PLOTTED_SCORES = (("latent_minus_neuron_coherence_median", "latent_coherence_median"),
                  ("latent_token_matched_lift_median",))
"""What ``interpretability.png`` plots against L0 and explained variance: the first number of each tuple
that some run has."""

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
        wanted = [*METRICS, *(k + suffix for k in SCORES for suffix in ("", *CI_SUFFIXES))]
        run.metrics, run.source = _finite({k: evaluation.get(k) for k in wanted}), "eval"
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


def _interval(run: RunResult, key: str) -> str:
    """``[low, high]`` of ``key``'s interval in ``run``, empty when it has none."""
    low, high = (run.metrics.get(key + suffix) for suffix in CI_SUFFIXES)
    return "" if low is None or high is None else f"[{_fmt(low)}, {_fmt(high)}]"


@dataclass
class Comparison:
    """The runs of one sweep directory and what is written about them."""

    sweep_dir: Path
    runs: list[RunResult]
    keys: list[str]

    def scores(self) -> list[str]:
        """The interpretability keys (``SCORES``) that some run has, in ``SCORES`` order."""
        return [k for k in SCORES if any(k in r.metrics for r in self.runs)]

    def _intervals(self) -> list[str]:
        return [k for k in self.scores() if any(k + CI_SUFFIXES[0] in r.metrics for r in self.runs)]

    @property
    def columns(self) -> list[str]:
        scores = [c for k in self.scores()
                  for c in (SCORES[k], *([f"{SCORES[k]} interval"] if k in self._intervals() else []))]
        return ["run", *self.keys, "status", *METRICS.values(), *scores, "metrics from", "steps", "train s",
                "error"]

    def rows(self) -> list[list[str]]:
        rows = []
        intervals = self._intervals()
        for r in self.runs:
            values = r.override_values()
            scores = [c for k in self.scores()
                      for c in (_fmt(r.metrics.get(k)), *([_interval(r, k)] if k in intervals else []))]
            rows.append([r.name, *(values.get(k, "") for k in self.keys), r.status,
                         *(_fmt(r.metrics.get(k)) for k in METRICS), *scores, r.source, _fmt(r.steps),
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


def plot_interpretability(comparison: Comparison, path: Path) -> None:
    """The score's medians (``PLOTTED_SCORES``) of every evaluated run against L0 (left) and explained
    variance (right), with their intervals as error bars, labelled with the job number; the neurons' median
    coherence (the same hook's neurons for every run) as a dashed line when the latents' own is plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = comparison.scores()
    keys = [next(k for k in group if k in present) for group in PLOTTED_SCORES
            if any(k in present for k in group)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110, sharey=True)
    for ax, x_key, x_label in ((axes[0], "l0", "L0 (active latents per token)"),
                               (axes[1], "explained_variance", "explained variance")):
        for key, color in zip(keys, ("tab:blue", "tab:green"), strict=False):
            runs = [r for r in comparison.runs if key in r.metrics and x_key in r.metrics]
            if not runs:
                continue
            xs = [r.metrics[x_key] for r in runs]
            ys = [r.metrics[key] for r in runs]
            below = [y - r.metrics.get(key + CI_SUFFIXES[0], y) for r, y in zip(runs, ys, strict=True)]
            above = [r.metrics.get(key + CI_SUFFIXES[1], y) - y for r, y in zip(runs, ys, strict=True)]
            ax.errorbar(xs, ys, yerr=[below, above], fmt="o", color=color, capsize=3, label=SCORES[key])
            for r, x, y in zip(runs, xs, ys, strict=True):
                ax.annotate(r.name.split("_")[0], (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        neurons = [r.metrics["neuron_coherence_median"] for r in comparison.runs
                   if "neuron_coherence_median" in r.metrics]
        if "latent_coherence_median" in keys and neurons:
            ax.axhline(sorted(neurons)[len(neurons) // 2], color="grey", linestyle="--",
                       label=SCORES["neuron_coherence_median"])
        ls = [r.metrics[x_key] for r in comparison.runs if x_key in r.metrics]
        if x_key == "l0" and ls and min(ls) > 0 and max(ls) / min(ls) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("median over scored units (higher = more interpretable)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Interpretability: {comparison.sweep_dir.name}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _embedded(png: Path, alt: str) -> str:
    """An ``<img>`` holding the PNG itself (the page needs no other file)."""
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(comparison: Comparison, png: Path, interpretability: Path | None = None) -> str:
    """One self-contained page: the table, the embedded plots, and the failures with their errors."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in comparison.columns)
    body = "".join("<tr class='{}'>{}</tr>".format(
        "ok" if r.status == "finished" else "bad", "".join(f"<td>{html.escape(c)}</td>" for c in row))
        for r, row in zip(comparison.runs, comparison.rows(), strict=True))
    failures = "".join(f"<li><b>{html.escape(r.name)}</b>: {html.escape(r.error)}</li>"
                       for r in comparison.failed())
    title = html.escape(f"SAE sweep comparison: {comparison.sweep_dir}")
    interp = ""
    if interpretability is not None:
        interp = ("<p>Interpretability (the monosemanticity score of <code>evaluate.py</code>, on held-out "
                  "contexts): higher is more interpretable; bars are the intervals the evaluation reports."
                  "</p>" + _embedded(interpretability, "interpretability against L0 and explained variance"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} tr.bad{{background:#fdd}}
th{{background:#eee}}</style></head><body>
<h1>{title}</h1>
<p>{len(comparison.runs)} runs; swept: {html.escape(", ".join(comparison.keys) or "nothing")}.
Metrics come from <code>eval/metrics.json</code> when the run was evaluated, else from the last validation
during training. Lower L0 and lower normalized MSE are better; the red line is the Pareto frontier.</p>
{_embedded(png, "L0 against normalized MSE")}
{interp}
<table><tr>{head}</tr>{body}</table>
{"<h2>Failed runs</h2><ul>" + failures + "</ul>" if failures else ""}
</body></html>
"""


def write_comparison(comparison: Comparison) -> dict[str, Path]:
    """Write the CSV, Markdown, PNGs, HTML and ``sweep_summary.json`` into the sweep directory."""
    out = comparison.sweep_dir
    paths = {name: out / name for name in ("comparison.csv", "comparison.md", "frontier.png",
                                           "comparison.html", "sweep_summary.json")}
    with paths["comparison.csv"].open("w", newline="") as f:
        csv.writer(f).writerows([comparison.columns, *comparison.rows()])
    paths["comparison.md"].write_text(comparison.markdown())
    plot_frontier(comparison, paths["frontier.png"])
    if comparison.scores():
        paths["interpretability.png"] = out / "interpretability.png"
        plot_interpretability(comparison, paths["interpretability.png"])
    paths["comparison.html"].write_text(render_html(comparison, paths["frontier.png"],
                                                    paths.get("interpretability.png")))
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
    from sae_lightning.train.loggers import resolve_wandb_mode

    mode = resolve_wandb_mode(LoggerConfig(wandb=True, mode=settings.get("mode", "auto")))
    run = wandb.init(project=settings.get("project", "sae-lightning"), entity=settings.get("entity"),
                     group=group, name=f"{group}-comparison", job_type="comparison", mode=mode,
                     dir=str(comparison.sweep_dir), config={"swept": comparison.keys})
    table = wandb.Table(columns=comparison.columns, data=comparison.rows())
    logged = {"comparison/table": table, "comparison/frontier": wandb.Image(str(paths["frontier.png"])),
              "comparison/page": wandb.Html(paths["comparison.html"].read_text())}
    if "interpretability.png" in paths:
        logged["comparison/interpretability"] = wandb.Image(str(paths["interpretability.png"]))
    run.log(logged)
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
    parser = argparse.ArgumentParser(prog="python -m sae_lightning.sweep.compare",
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
