"""Neuronpedia feature dashboards, as SAEDashboard's ``neuronpedia-runner`` writes them for upload.

The folder (``<run>/eval/neuronpedia/``) holds what ``sae_dashboard.neuronpedia.NeuronpediaRunner`` (0.8.0)
writes: ``run_settings.json`` (the fields of its ``NeuronpediaRunnerConfig`` that apply) and
``batch-<n>.json``, each a ``NeuronpediaDashboardBatch`` (``model_id``, ``layer``, ``sae_set``,
``sae_id_suffix``, ``features``) of ``FEATURES_PER_BATCH`` features. Every latent is written (a dead one with
``frac_nonzero`` 0 and no activations). Per feature, from the evaluation's one pass over held-out rows:

- ``activations``: its top contexts (at most one per context row, strongest first), each the whole context
  row as token strings with the latent's activation at every token (the rows run through the LM again,
  the activating position as ``qualifying_token_index``), ``bin_min=-1``, ``bin_max`` the feature's top
  activation and ``bin_contains=-1``, as SAEDashboard marks its top-activations group;
- ``frac_nonzero``: the share of held-out tokens it fired on;
- ``pos_str``/``pos_values``, ``neg_str``/``neg_values``: the tokens its decoder row promotes and suppresses
  most through the unembedding, and ``logits_hist_data_*`` the histogram of that effect over the vocabulary
  (empty where the decoded hook has no direct path to the logits: ``mlp_in``, ``hook=module``);
- ``neuron_alignment_*``: the largest decoder-row entries by magnitude (index, value, share of the row's L1);
- ``freq_hist_data_*``: the histogram of its positive activations for the latents the report tracks
  (empty for the others); ``correlated_*``, ``decoder_weights_dist`` and ``vector`` are left empty.

Values are rounded to 3 decimals, as SAEDashboard's converter does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_lightning.evaluate.contexts import (
    UnitSummary,
    activation_histogram,
    direct_logit_effect,
    token_decoder,
)
from sae_lightning.io import atomic_write_json

FEATURES_PER_BATCH = 128  # SAEDashboard's n_features_at_a_time default
N_LOGITS = 10  # tokens listed per side (SAEDashboard's logits table)
N_ALIGNMENT = 3  # decoder entries listed (SAEDashboard's FeatureTablesConfig(n_rows=3))
LOGIT_BINS = 40


def _round(values: Sequence[float] | np.ndarray | Tensor) -> list[float]:
    """Floats rounded to 3 decimals, ``-0.0`` (a JumpReLU's zeroed negative pre-activation) written as 0."""
    return [round(float(v), 3) + 0.0 for v in (values.tolist() if hasattr(values, "tolist") else values)]


def window_values(latent_acts: Callable[[Tensor], Tensor], context_row: Callable[[int], Sequence[int]],
                  top_doc: Tensor, batch_size: int) -> dict[tuple[int, int], list[float]]:
    """Each (unit, doc) pair of ``top_doc [U, n_top]`` (-1: empty) -> the unit's activation at every token
    of context row ``doc``; ``latent_acts(tokens [B, T]) -> [B, T, U]`` runs the LM and the SAE once per
    batch of distinct rows."""
    wanted: dict[int, list[int]] = defaultdict(list)
    for unit, k in (top_doc >= 0).nonzero().tolist():
        wanted[int(top_doc[unit, k])].append(unit)
    docs = sorted(wanted)
    out: dict[tuple[int, int], list[float]] = {}
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        z = latent_acts(torch.stack([torch.as_tensor(context_row(d), dtype=torch.long) for d in chunk]))
        for i, doc in enumerate(chunk):
            units = wanted[doc]
            for unit, values in zip(units, z[i][:, units].T.float().cpu(), strict=True):
                out[unit, doc] = _round(values)
    return out


def logit_tables(directions: Tensor, W_U: Tensor, W_out: Tensor | None,
                 decode: Callable[[Sequence[int]], list[str]], chunk: int = 256) -> list[dict[str, Any]]:
    """Per direction (decoder row), the ``N_LOGITS`` most promoted and suppressed tokens (each decoded on its
    own) and the histogram of its direct logit effect over the vocabulary (``direct_logit_effect``), in
    chunks of ``chunk`` rows."""
    texts: dict[int, str] = {}

    def strings(ids: list[int]) -> list[str]:
        for i in ids:
            if i not in texts:
                texts[i] = decode([i])[0]
        return [texts[i] for i in ids]

    tables = []
    for block in directions.split(chunk):
        effect = direct_logit_effect(block, W_U, W_out)
        top, bottom = effect.topk(N_LOGITS, dim=1), effect.topk(N_LOGITS, dim=1, largest=False)
        for i in range(effect.shape[0]):
            heights, edges = np.histogram(effect[i].numpy(), bins=LOGIT_BINS)
            tables.append({
                "pos_str": strings(top.indices[i].tolist()), "pos_values": _round(top.values[i]),
                "neg_str": strings(bottom.indices[i].tolist()), "neg_values": _round(bottom.values[i]),
                "logits_hist_data_bar_heights": _round(heights),
                "logits_hist_data_bar_values": _round((edges[:-1] + edges[1:]) / 2)})
    return tables


def feature_record(index: int, summary: UnitSummary, windows: dict[tuple[int, int], list[float]],
                   row_tokens: Callable[[int], list[str]], decoder_row: Tensor, logits: dict[str, Any] | None,
                   n_prompts: int, n_tokens: int, dataset: str) -> dict[str, Any]:
    """One feature as ``NeuronpediaDashboardFeature.to_dict()`` writes it (module docstring)."""
    top = summary.top
    kept = [(float(v), int(d), int(p)) for v, d, p in zip(top.values[index], top.doc[index], top.pos[index],
                                                         strict=True) if v > 0]
    bin_max = round(kept[0][0], 3) if kept else 0.0
    activations = [{"bin_min": -1, "bin_max": bin_max, "bin_contains": -1, "tokens": row_tokens(doc),
                    "values": windows[index, doc], "qualifying_token_index": pos} for _, doc, pos in kept]
    counts, edges = activation_histogram(summary.tracked.get(index, np.zeros(0, np.float32)))
    align = decoder_row.abs().topk(min(N_ALIGNMENT, decoder_row.shape[0]))
    l1 = float(decoder_row.abs().sum()) or 1.0
    logits = logits or {"pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
                        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": []}
    return {
        "feature_index": index,
        "neuron_alignment_indices": align.indices.tolist(),
        "neuron_alignment_values": _round(decoder_row[align.indices]),
        "neuron_alignment_l1": _round(decoder_row[align.indices] / l1),
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "neg_str": logits["neg_str"], "neg_values": logits["neg_values"],
        "pos_str": logits["pos_str"], "pos_values": logits["pos_values"],
        "frac_nonzero": float(summary.fire_counts[index]) / max(summary.n_tokens, 1),
        "freq_hist_data_bar_values": _round((edges[:-1] + edges[1:]) / 2) if counts.size else [],
        "freq_hist_data_bar_heights": _round(counts) if counts.size else [],
        "logits_hist_data_bar_heights": logits["logits_hist_data_bar_heights"],
        "logits_hist_data_bar_values": logits["logits_hist_data_bar_values"],
        "n_prompts_total": n_prompts,
        "n_tokens_in_prompt": n_tokens,
        "dataset": dataset,
        "decoder_weights_dist": [],
        "activations": activations,
        "vector": [],
    }


def write_neuronpedia(out: Path, *, features: Sequence[dict[str, Any]], model_id: str, layer: int,
                      sae_set: str, settings: dict[str, Any]) -> Path:
    """``run_settings.json`` and ``batch-<n>.json`` of ``FEATURES_PER_BATCH`` features into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for n in range(math.ceil(len(features) / FEATURES_PER_BATCH)):
        batch = features[n * FEATURES_PER_BATCH:(n + 1) * FEATURES_PER_BATCH]
        atomic_write_json(out / f"batch-{n}.json", {"model_id": model_id, "layer": layer, "sae_set": sae_set,
                                                    "sae_id_suffix": None, "features": list(batch)})
    atomic_write_json(out / "run_settings.json", {**settings, "outputs_dir": str(out), "model_id": model_id,
                                                  "layer": layer, "sae_set": sae_set,
                                                  "n_features_at_a_time": FEATURES_PER_BATCH})
    return out


def row_token_strings(tokenizer: Any) -> Callable[[Sequence[int]], list[str]]:
    """Token ids -> the text each contributes (``token_decoder``), a special token (BOS, EOS) as its own
    symbol, so that every token of a row has a visible string."""
    decode = token_decoder(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []))

    def strings(ids: Sequence[int]) -> list[str]:
        pieces = decode(ids)
        return [tokenizer.convert_ids_to_tokens(int(i)) if not p and int(i) in special else p
                for p, i in zip(pieces, ids, strict=True)]

    return strings


@torch.inference_mode()
def export_neuronpedia(out: Path, sae: Any, train_cfg: Any, summary: UnitSummary, lm: Any,
                       context_row: Callable[[int], Sequence[int]], *, n_prompts: int, dataset: str,
                       sae_path: str, prepend_bos: bool | None, batch_size: int) -> Path:
    """The Neuronpedia folder of ``sae`` (trained with ``train_cfg``, saved at ``sae_path``) from the
    evaluation's latent ``summary`` over ``n_prompts`` held-out context rows; ``lm`` (a ``HookedLM``)
    recomputes the latents over the top contexts' rows and gives the tokenizer and unembedding."""
    from sae_lightning.lm import HookPoint

    hook = HookPoint(train_cfg.layer, train_cfg.hook.name)
    target = hook if train_cfg.target_hook is None else HookPoint(*train_cfg.target_hook)
    device = next(sae.parameters()).device

    def latent_acts(tokens: Tensor) -> Tensor:
        x = lm.activations(tokens.to(lm.device), [hook])[hook]
        return sae.encode(x.reshape(-1, x.shape[-1]).to(device, next(sae.parameters()).dtype)).reshape(
            *x.shape[:2], -1)

    windows = window_values(latent_acts, context_row, summary.top.doc, batch_size)
    strings = row_token_strings(lm.tokenizer)
    rows: dict[int, list[str]] = {}

    def row_tokens(doc: int) -> list[str]:
        if doc not in rows:
            rows[doc] = strings(list(context_row(doc)))
        return rows[doc]

    directions = sae.weights().W_dec.detach().float().cpu() / float(sae.output_scale)
    logits: list[dict[str, Any]] | None = None
    if lm.has_direct_logit_effect(target):
        logits = logit_tables(directions, lm.unembed_directions(), lm.output_projection(target),
                              token_decoder(lm.tokenizer))
    features = [feature_record(i, summary, windows, row_tokens, directions[i], logits[i] if logits else None,
                               n_prompts, train_cfg.data.context_size, dataset)
                for i in range(directions.shape[0])]
    where = train_cfg.hook.name if target == hook else f"{train_cfg.hook.name}-to-{target.name}"
    sae_set = f"sae-lightning-{train_cfg.sae.architecture}-{where}"
    settings = {"sae_path": sae_path, "huggingface_dataset_path": dataset,
                "n_prompts_total": n_prompts, "n_tokens_in_prompt": train_cfg.data.context_size,
                "prepend_bos": prepend_bos}
    return write_neuronpedia(out, features=features, model_id=train_cfg.model.name, layer=train_cfg.layer,
                             sae_set=sae_set, settings=settings)
