"""evaluate/saebench.py: our numbers written as SAEBench's core result JSON, checked against SAEBench's
published schema (tests/data/) and, for the scale-dependent numbers, against the SAE on raw activations."""

import json
import math

import jsonschema
import pytest
import torch

from sae_lightning.config import ActivationsConfig, EvalConfig, TrainConfig
from sae_lightning.evaluate.saebench import MISSING, core_result, write_core_result
from sae_lightning.evaluate.saelens import folded_weights
from sae_lightning.metrics import PromptFireCounts, ReconstructionStats
from sae_lightning.saes import build_sae
from sae_lightning.saes.relu import ReLUConfig

SCALE = 4.0
# downstream numbers as evaluate/downstream.py returns them
DOWNSTREAM = {"ce_loss_clean": 2.0, "ce_loss_sae": 2.5, "ce_loss_zero": 3.0, "ce_loss_mean_ablation": 2.8,
              "ce_loss_recovered": 0.5, "kl_div": 0.2, "kl_div_zero": 0.8, "kl_div_score": 0.75,
              "n_tokens_downstream": 48}


@pytest.fixture(scope="module")
def evaluated() -> tuple[torch.nn.Module, torch.Tensor, ReconstructionStats, torch.Tensor]:
    """A random ReLU SAE (d_in 8, d_sae 16, latent 5 made dead) on 64 raw activation rows of 8 prompts,
    evaluated as evaluate.py does: on the raw rows (the SAE applies its input scale ``s``)."""
    torch.manual_seed(0)
    sae = build_sae(ReLUConfig(d_sae=16), 8)
    sae.set_input_scale(SCALE)
    with torch.no_grad():
        sae.b_enc[5] = -1e3
    raw = torch.randn(64, 8) + 1.0
    stats, prompts = ReconstructionStats(), PromptFireCounts()
    with torch.no_grad():
        z = sae.encode(raw)
        stats.update(raw, sae.decode(z), z)
        prompts.update(z, torch.arange(64) // 8)
    return sae, raw, stats, prompts.consistent_activation(stats.fire_counts)


def _result(evaluated, extra: dict | None = None) -> tuple[dict, dict]:
    sae, _, stats, consistent = evaluated
    metrics = {**stats.compute(), **(extra or {})}
    return core_result(metrics, stats.feature_density(), sae, TrainConfig(),
                       EvalConfig(ckpt_path="x"), consistent), metrics


def test_matches_the_published_schema(evaluated, check_saebench_core) -> None:
    result, _ = _result(evaluated, DOWNSTREAM)
    check_saebench_core(result)
    check_saebench_core(json.loads(json.dumps(result, allow_nan=False)))  # plain JSON, no NaN/inf
    assert len(result["eval_result_details"]) == 16
    assert [d["index"] for d in result["eval_result_details"]] == list(range(16))


def test_downstream_and_density_numbers_land_in_their_fields(evaluated) -> None:
    result, metrics = _result(evaluated, DOWNSTREAM)
    m = result["eval_result_metrics"]
    assert m["model_performance_preservation"] == {"ce_loss_score": 0.5, "ce_loss_with_ablation": 3.0,
                                                   "ce_loss_with_sae": 2.5, "ce_loss_without_sae": 2.0}
    assert m["model_behavior_preservation"] == {"kl_div_score": 0.75, "kl_div_with_ablation": 0.8,
                                                "kl_div_with_sae": 0.2}
    assert m["sparsity"] == {"l0": metrics["l0"], "l1": metrics["l1"]}
    assert m["misc_metrics"]["frac_alive"] == pytest.approx(1 - metrics["dead_fraction"])
    assert m["token_stats"] == {"total_tokens_eval_reconstruction": 48,
                                "total_tokens_eval_sparsity_variance": 64}
    density = evaluated[2].feature_density()
    assert [d["feature_density"] for d in result["eval_result_details"]] == pytest.approx(density.tolist())
    consistent = [d["consistent_activation_heuristic"] for d in result["eval_result_details"]]
    assert consistent[5] == MISSING and density[5] == 0  # dead: 0 tokens / 0 prompts
    assert consistent[:5] == pytest.approx(evaluated[3][:5].tolist(), rel=1e-5)
    assert all(1 <= c <= 8 for i, c in enumerate(consistent) if i != 5)  # 1 to 8 rows per prompt
    assert result["eval_config"]["compute_ce_loss"] and result["eval_config"]["compute_kl"]


def test_scale_dependent_numbers_are_those_of_the_sae_on_raw_activations(evaluated) -> None:
    # run the SAELens export (the input scale folded into the weights) on the raw rows and measure directly
    sae, raw, _, _ = evaluated
    w = folded_weights(sae)
    x_hat = torch.relu((raw - w["b_dec"]) @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    direct = ReconstructionStats()
    direct.update(raw, x_hat)
    expected = direct.compute()
    result, _ = _result(evaluated, DOWNSTREAM)
    m = result["eval_result_metrics"]
    # SAELens's mse: ||x - x_hat||² summed over the 8 dimensions, mean over tokens
    sse_per_token = float(((raw - x_hat) ** 2).sum(-1).mean())
    assert m["reconstruction_quality"]["mse"] == pytest.approx(sse_per_token, rel=1e-5)
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(expected["explained_variance"])
    assert m["shrinkage"]["l2_norm_in"] == pytest.approx(expected["l2_norm_in"], rel=1e-6)
    assert m["shrinkage"]["l2_norm_out"] == pytest.approx(expected["l2_norm_out"], rel=1e-5)
    assert m["shrinkage"]["l2_ratio"] == pytest.approx(expected["l2_ratio"], rel=1e-5)
    norms = [d["encoder_norm"] for d in result["eval_result_details"]]
    assert norms == pytest.approx(w["W_enc"].norm(dim=0).tolist(), rel=1e-5)


def test_without_the_lm_the_missing_numbers_are_minus_one(evaluated, check_saebench_core) -> None:
    result, _ = _result(evaluated, {"ce_loss_recovered": math.nan})
    check_saebench_core(result)
    m = result["eval_result_metrics"]
    assert set(m["model_performance_preservation"].values()) == {MISSING}
    assert set(m["model_behavior_preservation"].values()) == {MISSING}
    assert m["token_stats"]["total_tokens_eval_reconstruction"] == -1
    assert not result["eval_config"]["compute_ce_loss"]


def test_an_imported_array_is_named_as_the_dataset(evaluated, check_saebench_core) -> None:
    # evaluate.py activations=file: rows without text, so no LM numbers and no prompts
    sae, _, stats, _ = evaluated
    eval_cfg = EvalConfig(ckpt_path="x", activations=ActivationsConfig(source="file", path="held_out.npy"))
    result = core_result(stats.compute(), stats.feature_density(), sae, TrainConfig(), eval_cfg)
    check_saebench_core(result)
    assert result["eval_config"]["dataset"] == "held_out.npy"
    assert {d["consistent_activation_heuristic"] for d in result["eval_result_details"]} == {MISSING}
    assert TrainConfig().data.name == _result(evaluated)[0]["eval_config"]["dataset"]  # else: the LM's text


def test_written_atomically_as_valid_json(evaluated, tmp_path, check_saebench_core) -> None:
    sae, _, stats, _ = evaluated
    path = write_core_result(tmp_path / "saebench_core.json", {**stats.compute(), **DOWNSTREAM},
                             stats.feature_density(), sae, TrainConfig(), EvalConfig(ckpt_path="x"))
    check_saebench_core(json.loads(path.read_text()))
    assert [p.name for p in tmp_path.iterdir()] == ["saebench_core.json"]  # no temporary file left


def test_the_schema_check_rejects_a_renamed_or_missing_field(evaluated, check_saebench_core) -> None:

    result, _ = _result(evaluated, DOWNSTREAM)
    quality = result["eval_result_metrics"]["reconstruction_quality"]
    quality["cosine_sim"] = quality.pop("cossim")  # our metrics.json name instead of SAEBench's
    with pytest.raises(jsonschema.ValidationError):
        check_saebench_core(result)
    result, _ = _result(evaluated, DOWNSTREAM)
    del result["eval_result_metrics"]["sparsity"]["l1"]
    with pytest.raises(jsonschema.ValidationError):
        check_saebench_core(result)
