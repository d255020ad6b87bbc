"""The sweep comparison (``python -m sae_lightning.sweep.compare``) on hand-made run directories."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import yaml

from sae_lightning.sweep.compare import compare_sweep, main, pareto_front, read_run, swept_keys


def _run(sweep: Path, name: str, overrides: list[str], summary: dict | None,
         evaluation: dict | None = None) -> Path:
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if evaluation is not None:
        (run / "eval").mkdir()
        (run / "eval" / "metrics.json").write_text(json.dumps(evaluation))
    return run


def _finished(l0: float, nmse: float) -> dict:
    metrics = {"val/l0": l0, "val/nmse": nmse, "val/explained_variance": 1 - nmse, "val/dead_fraction": 0.25,
               "train/dead_fraction_window": 0.5}
    return {"status": "finished", "steps": 10, "train_seconds": 1.5, "metrics": metrics}


def _sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "multirun"
    _run(sweep, "000_l1=1", ["logger=csv", "l1=1"], _finished(40.0, 0.10))
    _run(sweep, "001_l1=2", ["logger=csv", "l1=2"], _finished(20.0, 0.20),
         evaluation={"l0": 21.5, "nmse": 0.19, "explained_variance": 0.81, "dead_fraction": 0.1,
                     "ce_loss_recovered": 0.93})
    _run(sweep, "002_l1=5", ["logger=csv", "l1=5"], _finished(25.0, 0.30))  # dominated by 001
    _run(sweep, "003_l1=-1", ["logger=csv", "l1=-1"],
         {"status": "failed", "error": "ConfigError: l1 must be >= 0", "traceback": "..."})
    _run(sweep, "004_l1=9", ["logger=csv", "l1=9"], None)  # killed before writing a summary
    return sweep


def test_metrics_come_from_evaluation_when_present_else_training(tmp_path):
    sweep = _sweep(tmp_path)
    trained, evaluated = read_run(sweep / "000_l1=1"), read_run(sweep / "001_l1=2")
    assert trained.source == "train"
    assert trained.metrics == {"l0": 40.0, "nmse": 0.10, "explained_variance": 0.9, "dead_fraction": 0.25}
    assert evaluated.source == "eval"
    assert evaluated.metrics["ce_loss_recovered"] == 0.93 and evaluated.metrics["l0"] == 21.5
    assert read_run(sweep / "004_l1=9").status == "incomplete"


def test_only_the_keys_that_vary_are_swept(tmp_path):
    runs = [read_run(p) for p in sorted(_sweep(tmp_path).iterdir())]
    assert swept_keys(runs) == ["l1"]


def test_pareto_front_keeps_points_nothing_beats_on_both_axes():
    points = [(40.0, 0.10), (20.0, 0.20), (25.0, 0.30), (10.0, 0.5), (30.0, 0.15)]
    assert pareto_front(points) == [3, 1, 4, 0]


def test_comparison_files_list_every_run_and_the_failures(tmp_path):
    sweep = _sweep(tmp_path)
    comparison = compare_sweep(sweep)
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [r["run"] for r in rows] == ["000_l1=1", "001_l1=2", "002_l1=5", "003_l1=-1", "004_l1=9"]
    assert rows[1]["CE loss recovered"] == "0.93" and rows[1]["metrics from"] == "eval"
    assert rows[0]["L0"] == "40" and rows[0]["normalized MSE"] == "0.1"
    assert rows[3]["status"] == "failed" and "l1 must be >= 0" in rows[3]["error"]

    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["swept"] == ["l1"]
    assert summary["ok"] == ["000_l1=1", "001_l1=2", "002_l1=5"]
    assert [(f["run"], f["status"]) for f in summary["failed"]] == [("003_l1=-1", "failed"),
                                                                   ("004_l1=9", "incomplete")]
    assert any("003_l1=-1" in line and "l1 must be >= 0" in line for line in comparison.summary_lines())

    png = (sweep / "frontier.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    page = (sweep / "comparison.html").read_text()
    embedded = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)
    assert base64.b64decode(embedded) == png  # self-contained: the plot is inside the page
    assert "src=\"http" not in page and "<link" not in page
    assert "ConfigError: l1 must be &gt;= 0" in page and "0.93" in page


def test_command_line_prints_the_table(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    main([str(sweep)])
    out = capsys.readouterr().out
    assert "| run | l1 | status | L0 |" in out
    assert "3 finished, 2 failed/unfinished" in out
    assert (sweep / "comparison.html").is_file()


def _scored(l0: float, ev: float, latent: float, ci: tuple[float, float] | None = None) -> dict:
    """An ``eval/metrics.json`` with the monosemanticity medians, with an interval on the latents' when
    ``ci`` is given (today's evaluation writes none)."""
    out = {"l0": l0, "nmse": 1 - ev, "explained_variance": ev, "dead_fraction": 0.0, "ce_loss_recovered": 0.9,
           "latent_coherence_median": latent, "neuron_coherence_median": 0.016,
           "latent_token_matched_lift_median": latent / 2, "latent_qualified": 40}
    if ci is not None:
        out |= {"latent_coherence_median_ci_low": ci[0], "latent_coherence_median_ci_high": ci[1]}
    return out


def test_the_score_and_its_interval_are_columns_and_a_plot(tmp_path):
    sweep = tmp_path / "multirun"
    _run(sweep, "000_l1=1", ["l1=1"], _finished(40.0, 0.1),
         evaluation=_scored(38.0, 0.9, 0.05, (0.04, 0.061)))
    _run(sweep, "001_l1=2", ["l1=2"], _finished(20.0, 0.2), evaluation=_scored(19.0, 0.8, 0.07))
    _run(sweep, "002_l1=5", ["l1=5"], _finished(10.0, 0.3))  # trained, not evaluated
    compare_sweep(sweep)
    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    columns = list(rows[0])
    assert columns.index("CE loss recovered") < columns.index("latent coherence")
    assert columns[columns.index("latent coherence"):columns.index("metrics from")] == [
        "latent coherence", "latent coherence interval", "neuron coherence", "latent token-matched lift"]
    assert [r["latent coherence"] for r in rows] == ["0.05", "0.07", ""]
    assert [r["latent coherence interval"] for r in rows] == ["[0.04, 0.061]", "", ""]
    assert [r["latent token-matched lift"] for r in rows] == ["0.025", "0.035", ""]
    assert rows[0]["L0"] == "38" and rows[2]["L0"] == "10"  # evaluation first, else training
    page = (sweep / "comparison.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and base64.b64decode(images[1]) == (sweep / "interpretability.png").read_bytes()
    assert "<td>[0.04, 0.061]</td>" in page


def test_a_sweep_without_the_score_has_no_score_columns_or_plot(tmp_path):
    sweep = _sweep(tmp_path)
    compare_sweep(sweep)
    columns = next(csv.reader((sweep / "comparison.csv").open()))
    assert not any("coherence" in c for c in columns)
    assert not (sweep / "interpretability.png").exists()
