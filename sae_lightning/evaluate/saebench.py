"""Our evaluation written as SAEBench's ``core`` result JSON (``CoreEvalOutput`` of sae-bench 0.6.0), so a
result can be dropped beside SAEBench's own: same field names and nesting, checked against its published
schema in ``tests/evaluate/test_evaluate_saebench.py``.

The numbers are ours (``metrics.py``, ``evaluate/downstream.py``, ``evaluate/weights.py``); where a
definition differs from SAEBench's, ``docs/metrics.md`` says how. Every number is for raw activations
(our metrics are), as SAEBench runs the SAELens export; ``mse`` is summed over the ``d`` dimensions
(SAELens's convention; ours is per element). A number that was not computed, or is NaN, is written as -1,
SAEBench's own convention.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae_lightning.config import EvalConfig, TrainConfig
from sae_lightning.evaluate.saelens import saelens_config, saelens_metadata
from sae_lightning.evaluate.weights import SAEWeights, latent_weight_stats
from sae_lightning.io import atomic_write_json

MISSING = -1.0  # SAEBench writes NaN / not computed as -1


def _num(metrics: Mapping[str, Any], key: str, divide_by: float = 1.0) -> float:
    value = metrics.get(key)
    if value is None or not math.isfinite(value):
        return MISSING
    return float(value) / divide_by


def _count(metrics: Mapping[str, Any], key: str) -> int:
    return int(metrics[key]) if key in metrics else int(MISSING)


def _mean(t: Tensor) -> float:
    mean = float(t.double().mean())
    return mean if math.isfinite(mean) else MISSING


def core_metrics(metrics: Mapping[str, Any], weights: Mapping[str, Tensor],
                 d_in: int) -> dict[str, dict[str, float]]:
    """SAEBench's ``eval_result_metrics`` from our ``metrics.json`` dict and :func:`latent_weight_stats`
    (``d_in``: the activation width, to turn our per-element ``mse`` into a per-token one)."""
    return {
        "model_behavior_preservation": {
            "kl_div_score": _num(metrics, "kl_div_score"),
            "kl_div_with_ablation": _num(metrics, "kl_div_zero"),
            "kl_div_with_sae": _num(metrics, "kl_div"),
        },
        "model_performance_preservation": {
            "ce_loss_score": _num(metrics, "ce_loss_recovered"),
            "ce_loss_with_ablation": _num(metrics, "ce_loss_zero"),
            "ce_loss_with_sae": _num(metrics, "ce_loss_sae"),
            "ce_loss_without_sae": _num(metrics, "ce_loss_clean"),
        },
        "reconstruction_quality": {
            "explained_variance": _num(metrics, "explained_variance"),
            "explained_variance_legacy": MISSING,
            "mse": _num(metrics, "mse", 1 / d_in),
            "cossim": _num(metrics, "cosine_sim"),
        },
        "shrinkage": {
            "l2_norm_in": _num(metrics, "l2_norm_in"),
            "l2_norm_out": _num(metrics, "l2_norm_out"),
            "l2_ratio": _num(metrics, "l2_ratio"),
            "relative_reconstruction_bias": _num(metrics, "relative_reconstruction_bias"),
        },
        "sparsity": {"l0": _num(metrics, "l0"), "l1": _num(metrics, "l1")},
        "token_stats": {
            "total_tokens_eval_reconstruction": _count(metrics, "n_tokens_downstream"),
            "total_tokens_eval_sparsity_variance": _count(metrics, "n_tokens"),
        },
        "misc_metrics": {
            "freq_over_1_percent": _num(metrics, "freq_over_1_percent"),
            "freq_over_10_percent": _num(metrics, "freq_over_10_percent"),
            "normalized_freq_over_1_percent": _num(metrics, "normalized_freq_over_1_percent"),
            "normalized_freq_over_10_percent": _num(metrics, "normalized_freq_over_10_percent"),
            "average_max_encoder_cosine_sim": _mean(weights["max_encoder_cosine_sim"]),
            "average_max_decoder_cosine_sim": _mean(weights["max_decoder_cosine_sim"]),
            "frac_alive": MISSING if "dead_fraction" not in metrics else 1.0 - metrics["dead_fraction"],
        },
    }


def feature_details(density: Tensor, consistent_activation: Tensor | None,
                    weights: Mapping[str, Tensor]) -> list[dict[str, float]]:
    """SAEBench's ``eval_result_details``: one record per latent (6 significant digits, to keep the file
    small without rounding rare latents' densities to 0; NaN, e.g. the heuristic of a dead latent, -1)."""
    if consistent_activation is None:
        consistent_activation = torch.full_like(density, math.nan)
    columns = {"feature_density": density, "consistent_activation_heuristic": consistent_activation,
               **weights}
    lists = {name: t.tolist() for name, t in columns.items()}
    return [{"index": i, **{name: _sig6(values[i]) for name, values in lists.items()}}
            for i in range(density.shape[0])]


def _sig6(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else MISSING


def core_eval_config(train_cfg: TrainConfig, eval_cfg: EvalConfig,
                     metrics: Mapping[str, Any]) -> dict[str, Any]:
    """SAEBench's ``CoreEvalConfig`` fields, describing what our evaluation did (exact counts are in
    ``token_stats``; our sparsity/variance "batches" are held-out row batches, not prompt batches)."""
    downstream = "ce_loss_sae" in metrics
    lm_batch = train_cfg.data.lm_batch_size
    n_lm_batches = math.ceil(eval_cfg.downstream_contexts / lm_batch) if downstream else 0
    return {
        "model_name": train_cfg.model.name,
        "llm_dtype": train_cfg.model.dtype,
        "batch_size_prompts": lm_batch,
        "n_eval_reconstruction_batches": n_lm_batches,
        "n_eval_sparsity_variance_batches": math.ceil(int(metrics["n_tokens"]) / eval_cfg.batch_size),
        "dataset": _dataset(train_cfg, eval_cfg),
        "context_size": train_cfg.data.context_size,
        "compute_kl": downstream,
        "compute_ce_loss": downstream,
        "compute_l2_norms": True,
        "compute_sparsity_metrics": True,
        "compute_variance_metrics": True,
        "compute_featurewise_density_statistics": True,
        "compute_featurewise_weight_based_metrics": True,
        "exclude_special_tokens_from_reconstruction": train_cfg.data.exclude_special,
        "verbose": False,
    }


def _dataset(train_cfg: TrainConfig, eval_cfg: EvalConfig) -> str:
    """Where the evaluated rows came from: an imported activation array, or the text the LM was run on."""
    acts = eval_cfg.activations or train_cfg.activations
    return acts.path if acts.source == "file" else saelens_metadata(train_cfg)["dataset_path"]


def sae_cfg_dict(train_cfg: TrainConfig, d_in: int, d_sae: int) -> dict[str, Any]:
    """The SAELens ``cfg.json`` of the export; a minimal one for architectures SAELens cannot run."""
    metadata, architecture = saelens_metadata(train_cfg), train_cfg.sae.architecture
    try:
        k = getattr(train_cfg.sae, "k", None)
        return saelens_config(architecture, d_in, d_sae, k=k, metadata=metadata)
    except NotImplementedError:
        return {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "metadata": metadata}


def core_result(metrics: Mapping[str, Any], density: Tensor, sae: SAEWeights,
                train_cfg: TrainConfig, eval_cfg: EvalConfig,
                consistent_activation: Tensor | None = None) -> dict[str, Any]:
    """The whole SAEBench ``core`` result (``CoreEvalOutput`` as JSON) for one evaluated SAE: ``metrics`` as
    in metrics.json, per-latent ``density`` and ``consistent_activation`` from ``evaluate_rows``."""
    weights = latent_weight_stats(sae)
    d_in, d_sae = sae.W_enc.shape
    return {
        "eval_type_id": "core",
        "eval_config": core_eval_config(train_cfg, eval_cfg, metrics),
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": core_metrics(metrics, weights, d_in),
        "eval_result_details": feature_details(density, consistent_activation, weights),
        "sae_bench_commit_hash": f"not SAEBench: sae-lightning {version('sae-lightning')}",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": sae_cfg_dict(train_cfg, d_in, d_sae),
        "eval_result_unstructured": {"produced_by": "sae-lightning", "definitions": "docs/metrics.md",
                                     "input_scale": float(sae.input_scale),
                                     "not_computed": ["explained_variance_legacy"]},
    }


def write_core_result(path: Path, metrics: Mapping[str, Any], density: Tensor, sae: SAEWeights,
                      train_cfg: TrainConfig, eval_cfg: EvalConfig,
                      consistent_activation: Tensor | None = None) -> Path:
    """Write :func:`core_result` to ``path`` atomically; returns ``path``."""
    atomic_write_json(path, core_result(metrics, density, sae, train_cfg, eval_cfg, consistent_activation))
    return path
