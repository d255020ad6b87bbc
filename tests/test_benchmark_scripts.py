"""The quality benchmark trains every curve it offers (ours and SAELens's) and reports every pair.

A benchmark that breaks silently is found only when someone reruns it hours later; this runs each curve
for a few steps on tiny synthetic data, as the script is run from the command line.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sae_lens")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import quality_vs_saelens as q  # noqa: E402


def test_quality_benchmark_trains_every_curve_and_reports_every_pair(tmp_path: Path) -> None:
    results = tmp_path / "runs.jsonl"
    cmd = [sys.executable, str(BENCHMARKS / "quality_vs_saelens.py"), "--d-in", "16", "--features", "64",
           "--mean-active", "4", "--d-sae", "32", "--train-rows", "4000", "--eval-rows", "500",
           "--batch", "128", "--steps", "8", "--b-dec-sample", "512", "--l1", "3", "--k", "4",
           "--l0-coeff", "1", "--target-l0", "8", "--results", str(results), "--curves", *q.CURVES]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["curve"] for r in rows) == sorted(q.CURVES)
    for r in rows:
        assert math.isfinite(r["l0"]) and 0 <= r["l0"] <= 32, r
        assert math.isfinite(r["nmse"]) and r["nmse"] > 0, r
    for ours, theirs in q.PAIRS:
        assert f"{ours} vs {theirs}: ours dominated" in out.stdout
    # the TopK family's held-out L0 is k (TopK exactly; the batch variants through their threshold)
    assert next(r["l0"] for r in rows if r["curve"] == "ours topk") == 4
