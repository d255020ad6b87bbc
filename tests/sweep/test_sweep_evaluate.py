"""``evaluate.enabled=true``: every job of a sweep (basic and grouped launcher) evaluated when its training
ends, the score on the comparison page and in each job's W&B run; the held-out contexts' two halves
(``evaluate.py contexts=validation|test``)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from sae_lightning.cache.datamodule import EvalRows
from sae_lightning.checks import ConfigError
from sae_lightning.config import EvaluateAfterConfig, LoggerConfig, TrainConfig
from sae_lightning.evaluate.after import evaluate_finished
from sae_lightning.evaluate.halves import in_validation_half, keep_half
from sae_lightning.train.rundir import RunDir, RunSummary
from tests.sweep.test_sweep import SMALL, train_py
from tests.sweep.test_wandb_offline import run_contents


@pytest.mark.parametrize("overrides", [["max_tokns=10"], ["max_tokens=0"], ["contexts=train"]])
def test_a_bad_evaluation_override_is_refused_before_training(overrides):
    with pytest.raises(ConfigError, match=r"evaluate\.overrides="):
        EvaluateAfterConfig(enabled=True, overrides=overrides)


def test_the_evaluation_config_is_evaluate_py_s_with_the_overrides():
    cfg = EvaluateAfterConfig(enabled=True, overrides=["max_tokens=5000", "contexts=test"]).eval_config("/r")
    assert (cfg.ckpt_path, cfg.max_tokens, cfg.contexts) == ("/r", 5000, "test")
    assert cfg.monosemanticity_units == 64  # evaluate.py's default where no override says otherwise


def _rows(docs: list[int]) -> EvalRows:
    doc = torch.tensor(docs)
    return EvalRows(acts=doc[:, None].float().repeat(1, 3), tokens=doc * 10, doc=doc,
                    pos=torch.arange(len(docs)))


def test_the_halves_split_contexts_whatever_the_batching():
    docs = [d for d in range(400) for _ in range(3)]  # three rows per context
    one = next(keep_half([_rows(docs)], "validation", seed=0))
    batches = [_rows(docs[i:i + 7]) for i in range(0, len(docs), 7)]
    valid = list(keep_half(batches, "validation", seed=0))
    test = list(keep_half(batches, "test", seed=0))
    valid_docs = torch.cat([b.doc for b in valid]).tolist()
    test_docs = torch.cat([b.doc for b in test]).tolist()
    assert valid_docs == one.doc.tolist()  # the same rows however the batches are cut
    assert not set(valid_docs) & set(test_docs) and sorted(valid_docs + test_docs) == docs
    assert 160 < len(set(valid_docs)) < 240  # about half of 400 contexts
    for b in valid + test:  # every field cut alike
        assert torch.equal(b.acts[:, 0].long(), b.doc) and torch.equal(b.tokens, b.doc * 10)
    assert all(in_validation_half(d, 0) for d in valid_docs)
    assert [in_validation_half(d, 1) for d in range(400)] != [in_validation_half(d, 0) for d in range(400)]
    assert list(keep_half(batches, "all", seed=0)) == batches


def test_rows_without_contexts_cannot_be_split():
    with pytest.raises(ConfigError, match="contexts=all"):
        list(keep_half([_rows([-1, -1])], "test", seed=0))


def test_a_failed_evaluation_leaves_the_run_finished_with_the_error(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    summary = RunSummary(status="finished", run_dir=str(run.path), steps=8)
    run.write_summary(summary)
    cfg = TrainConfig(evaluate=EvaluateAfterConfig(enabled=True), logger=LoggerConfig(wandb=False))
    assert evaluate_finished(summary, cfg) is None  # no sae/ folder to evaluate
    after = run.read_summary()
    assert after.status == "finished" and after.steps == 8
    assert after.error.startswith("evaluation failed: CheckpointError") and "Traceback" in after.traceback
    cfg.evaluate.enabled = False
    assert evaluate_finished(summary, cfg) is None and not run.eval.exists()


SCORE = "latent_coherence_median"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "grouped"])
def test_every_job_of_a_sweep_is_scored_on_the_page_and_in_w_and_b(tmp_path, tiny_gpt2_dir, tinystories_path,
                                                                   launcher):
    lm = [f"model.name={tiny_gpt2_dir}", "data=tinystories_local", f"data.path={tinystories_path}",
          "data.context_size=32", "data.n_tokens=4096", "data.lm_batch_size=16", "layer=1",
          f"activations.cache_dir={tmp_path / 'cache'}", "activations.shard_rows=256",
          "activations.eval_fraction=0.25",
          *(o for o in SMALL if o != "logger=csv"), "logger=wandb"]
    evaluation = ["evaluate.enabled=true",
                  "evaluate.overrides=['top_contexts=4','monosemanticity_units=16','downstream_contexts=4']"]
    sweep = tmp_path / "sweep"
    extra = ["hydra/launcher=grouped"] if launcher == "grouped" else []
    train_py("-m", *lm, *evaluation, "l1=1,2", *extra, f"hydra.sweep.dir={sweep}", cwd=tmp_path,
             env={"WANDB_MODE": "offline"})
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(("wandb", ".")))
    assert jobs == ["000_l1=1", "001_l1=2"]
    for job in jobs:
        metrics = json.loads((sweep / job / "eval" / "metrics.json").read_text())
        assert metrics["latent_scored"] > 0 and math.isfinite(metrics["ce_loss_recovered"])
        logged = {}
        for path in (sweep / job).glob("wandb/offline-run-*/run-*.wandb"):
            logged |= run_contents(path)["history"]
        assert float(logged[f"eval/{SCORE}"][-1]) == pytest.approx(metrics[SCORE])  # the job's own W&B run
        assert float(logged["eval/l0"][-1]) == pytest.approx(metrics["l0"])
        ids = {run_contents(p)["id"] for p in (sweep / job).glob("wandb/offline-run-*/run-*.wandb")}
        assert len(ids) == 1  # the evaluation resumed the training's run

    rows = list(csv.DictReader((sweep / "comparison.csv").open()))
    assert [r["run"] for r in rows] == jobs
    for row, job in zip(rows, jobs, strict=True):
        metrics = json.loads((sweep / job / "eval" / "metrics.json").read_text())
        assert row["metrics from"] == "eval" and row["CE loss recovered"] != ""
        assert float(row["latent coherence"]) == pytest.approx(metrics[SCORE], abs=1e-3)
        assert float(row["latent token-matched lift"]) == pytest.approx(
            metrics["latent_token_matched_lift_median"], abs=1e-3)
    assert (sweep / "interpretability.png").read_bytes().startswith(b"\x89PNG")
    assert "interpretability against L0" in (sweep / "comparison.html").read_text()
