"""train.py then evaluate.py as a user runs them (subprocesses), on a tiny random GPT-2 saved locally:
text -> LM -> cache -> training -> checkpoint -> metrics.json + SAEBench core JSON + report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_train_then_evaluate(tmp_path: Path, tiny_gpt2_dir: Path, tinystories_path: Path,
                             check_saebench_core) -> None:
    env = {**os.environ, "SAE_LIGHTNING_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    _run([str(REPO / "train.py"), f"model.name={tiny_gpt2_dir}", "data=tinystories_local",
          f"data.path={tinystories_path}", "data.context_size=64", "data.n_tokens=20000",
          "activations.shard_rows=2048", "layer=1",
          "sae.dict_mult=4", "l1=1", "lr=3e-3", "batch_size=256", "train_tokens=25600",
          "trainer=cpu", "trainer.val_every_n_steps=25", "trainer.checkpoint_every_n_steps=50",
          "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"], tmp_path, env)

    ckpt = run_dir / "checkpoints" / "final.ckpt"
    assert ckpt.exists()
    with (run_dir / "csv" / "metrics.csv").open() as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) >= 5 and losses[-1] < 0.7 * losses[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 100 and summary["d_in"] == 128

    proc = _run([str(REPO / "evaluate.py"), f"ckpt_path={ckpt}", "monosemanticity=false",
                 "downstream_contexts=8"], tmp_path, env)
    metrics_path = Path(proc.stdout.strip().splitlines()[-1])
    assert metrics_path == run_dir / "eval" / "metrics.json"
    m = json.loads(metrics_path.read_text())
    assert 0.3 < m["explained_variance"] <= 1.0 and m["nmse"] == pytest.approx(1 - m["explained_variance"])
    assert 0 < m["l0"] < 512 and 0.0 <= m["dead_fraction"] < 1.0 and m["n_tokens"] > 0
    assert m["ce_loss_zero"] != m["ce_loss_clean"] and m["ce_loss_recovered"] > 0
    assert m["absorption_rows"] > 0 and "absorption_rate" in m  # read in the same held-out pass
    core = json.loads((run_dir / "eval" / "saebench_core.json").read_text())
    check_saebench_core(core)
    scores = core["eval_result_metrics"]["model_performance_preservation"]
    assert scores["ce_loss_score"] == m["ce_loss_recovered"]
    assert scores["ce_loss_without_sae"] == m["ce_loss_clean"]
    assert core["eval_result_metrics"]["sparsity"]["l0"] == m["l0"]
    assert len(core["eval_result_details"]) == 512  # d_sae = 4 * 128
    # the cache's held-out rows come in prompt order: tokens per prompt is >= 1 for every latent that fired
    consistent = [d["consistent_activation_heuristic"] for d in core["eval_result_details"]]
    assert all(c >= 1 or c == -1 for c in consistent) and max(consistent) >= 1
    report = (run_dir / "eval" / "report.html").read_text()
    assert "latent" in report and "neuron" in report and "<mark" in report


@pytest.mark.slow
def test_train_then_evaluate_a_skip_transcoder(tmp_path: Path, tiny_gpt2_dir: Path,
                                               tinystories_path: Path) -> None:
    """mlp_post -> mlp_out of layer 1 with a skip connection: both hooks cached in one LM pass, trained on
    aligned pairs, evaluated against the target with the transcoder spliced in for the MLP's output."""
    env = {**os.environ, "SAE_LIGHTNING_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    _run([str(REPO / "train.py"), f"model.name={tiny_gpt2_dir}", "data=tinystories_local",
          f"data.path={tinystories_path}", "data.context_size=64", "data.n_tokens=20000",
          "activations.shard_rows=2048", "layer=1", "hook=mlp_post", "target.name=mlp_out", "sae.skip=true",
          "sae.dict_mult=1", "l1=1", "lr=3e-3", "batch_size=256", "train_tokens=25600",
          "trainer=cpu", "trainer.val_every_n_steps=50", "trainer.checkpoint_every_n_steps=100",
          "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"], tmp_path, env)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 100 and summary["d_in"] == 128
    meta = json.loads((run_dir / "sae" / "cfg.json").read_text())
    assert (meta["d_in"], meta["d_out"], meta["config"]["skip"]) == (128, 32, True)
    caches = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert len(caches) == 2 and any("L1.mlp_out" in c for c in caches)

    proc = _run([str(REPO / "evaluate.py"), f"ckpt_path={run_dir}", "monosemanticity=false",
                 "downstream_contexts=8"], tmp_path, env)
    m = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    assert 0.3 < m["explained_variance"] <= 1.0 and m["n_tokens"] > 0
    assert m["ce_loss_zero"] != m["ce_loss_clean"] and 0 < m["ce_loss_recovered"] <= 1.05
    assert "Transcoder report" in (run_dir / "eval" / "report.html").read_text()
