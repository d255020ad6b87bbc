"""The evaluation steps glued together, so ``evaluate.py`` only loads things and calls two functions:

1. :func:`evaluate_rows` — ONE streamed pass over the held-out rows (normalized activations with their
   token/doc/pos): reconstruction metrics (:class:`ReconstructionStats`), top contexts, densities and
   tracked-unit histograms for SAE latents and (when the hook is ``mlp_post``) for the raw neurons.
2. :func:`build_report_data` — picks the units to show, scores monosemanticity for a sample of units of
   both kinds, computes direct logit effects, and returns the :class:`ReportData` for ``write_report``.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from sae_lightning.evaluate.contexts import (
    ContextRow,
    UnitCollector,
    UnitSummary,
    direct_logit_effect,
    token_decoder,
)
from sae_lightning.evaluate.monosemanticity import (
    CoherenceScorer,
    Embedder,
    random_contexts,
    score_units,
)
from sae_lightning.evaluate.report import ReportData, unit_cards
from sae_lightning.metrics import DENSE_THRESHOLD, ReconstructionStats

log = logging.getLogger(__name__)


class Rows(Protocol):
    """One batch of held-out rows (``datamodule.EvalRows``)."""

    acts: Tensor  # [n, d] normalized (x * norm_scale)
    tokens: Tensor
    doc: Tensor
    pos: Tensor


@dataclass
class RowsResult:
    """What one pass over the held-out rows found."""

    metrics: dict[str, float]  # ReconstructionStats.compute(): the metrics.json reconstruction keys
    feature_density: Tensor  # [d_sae]
    latents: UnitSummary
    neurons: UnitSummary | None  # None unless the hooked activations are the MLP neurons
    docs: list[int] = field(default_factory=list)  # context rows seen (for random baseline contexts)


def track_candidates(n_units: int, n: int, seed: int) -> list[int]:
    """``n`` distinct random unit indices (all of them if ``n >= n_units``), to track for histograms.
    Track a few times more units than you will show: only tracked units that fired can be shown."""
    return sorted(random.Random(seed).sample(range(n_units), min(n, n_units)))


@torch.inference_mode()
def evaluate_rows(rows: Iterable[Rows], sae: nn.Module, norm_scale: float, *, n_top: int = 8,
                  track_latents: Sequence[int] = (), track_neurons: Sequence[int] = (),
                  neurons: bool = True, dense_threshold: float = DENSE_THRESHOLD) -> RowsResult:
    """Stream ``rows`` once through ``sae``. Neuron activations are the rows divided by ``norm_scale``
    (raw units); pass ``neurons=False`` when the hook is not ``mlp_post``."""
    stats = ReconstructionStats(dense_threshold)
    latent_collector = neuron_collector = None
    docs: set[int] = set()
    dtype = next(sae.parameters()).dtype
    device = next(sae.parameters()).device
    for batch in rows:
        x = batch.acts.to(device=device, dtype=dtype)
        z = sae.encode(x)
        stats.update(x, sae.decode(z), z)
        if latent_collector is None:
            latent_collector = UnitCollector(z.shape[1], n_top, track_latents)
            neuron_collector = UnitCollector(x.shape[1], n_top, track_neurons) if neurons else None
        latent_collector.update(z, batch.tokens, batch.doc, batch.pos)
        if neuron_collector is not None:
            neuron_collector.update(batch.acts / norm_scale, batch.tokens, batch.doc, batch.pos)
        docs.update(batch.doc.unique().tolist())
    if latent_collector is None:
        raise ValueError("evaluate_rows got no rows")
    return RowsResult(metrics=stats.compute(), feature_density=stats.feature_density(),
                      latents=latent_collector.result(),
                      neurons=neuron_collector.result() if neuron_collector is not None else None,
                      docs=sorted(d for d in docs if d >= 0))


def fired(summary: UnitSummary, units: Iterable[int], min_count: int = 1) -> list[int]:
    """The ``units`` that fired on at least ``min_count`` held-out rows, in order."""
    return [u for u in units if int(summary.fire_counts[u]) >= min_count]


@dataclass
class LMParts:
    """What the direct logit effects need from the LM: ``HookedLM.output_projection(hook)`` (None unless
    the hook is mlp_post), ``HookedLM.unembed_directions()`` (None where the hook has no direct logit
    effect: mlp_in, ``hook=module``) and the tokenizer."""

    W_out: Tensor | None
    W_U: Tensor | None
    tokenizer: Any


def build_report_data(title: str, metrics: Mapping[str, float], result: RowsResult, sae: nn.Module,
                      norm_scale: float, lm: LMParts, context_row: ContextRow, *, n_latents: int = 12,
                      n_neurons: int = 12, n_scored: int = 200, embedder: Embedder | None = None,
                      seed: int = 0, history: Mapping[str, Sequence[float]] | None = None,
                      details: Mapping[str, Any] | None = None) -> tuple[ReportData, dict[str, float]]:
    """The report's data, and the monosemanticity medians (worth adding to metrics.json).

    Shown units: the first ``n_latents``/``n_neurons`` tracked units that fired. Monosemanticity: up to
    ``n_scored`` random units of each kind among those that fired at least twice, the same number for
    both kinds; coherence only with an ``embedder`` (``monosemanticity.load_embedder()``).
    """
    decode = token_decoder(lm.tokenizer)
    scorer = None
    if embedder is not None:
        scorer = CoherenceScorer(embedder, random_contexts(context_row, result.docs, n_groups=16,
                                                           group_size=result.latents.top.values.shape[1],
                                                           decode=decode, seed=seed))
    kinds = {"latent": (result.latents, n_latents, _latent_directions(sae, norm_scale))}
    if result.neurons is not None:
        kinds["neuron"] = (result.neurons, n_neurons, _neuron_directions(result.neurons))
    scorable = {kind: fired(summary, range(summary.fire_counts.shape[0]), 2)
                for kind, (summary, _, _) in kinds.items()}
    n_common = min(n_scored, *(len(u) for u in scorable.values()))
    cards, all_scores, medians = {}, [], {}
    for kind, (summary, n_show, directions) in kinds.items():
        sample = sorted(random.Random(seed).sample(scorable[kind], n_common))
        scores = score_units(kind, summary.top, sample, context_row, decode, scorer)
        all_scores.append(scores)
        medians |= scores.medians()
        shown = fired(summary, sorted(summary.tracked))[:n_show]
        effects = (direct_logit_effect(directions(shown), lm.W_U, lm.W_out)
                   if shown and lm.W_U is not None else None)
        shown_scores = score_units(kind, summary.top, shown, context_row, decode, scorer)
        cards[kind] = unit_cards(kind, shown, summary, context_row, decode, effects, shown_scores)
    data = ReportData(title=title, metrics={**metrics, **medians}, latents=cards["latent"],
                      neurons=cards.get("neuron", []), scores=all_scores,
                      feature_density=result.feature_density.numpy(), history=history, details=details or {})
    return data, medians


def _latent_directions(sae: nn.Module, norm_scale: float) -> Callable[[list[int]], Tensor]:
    """Decoder rows in raw activation space (``W_dec / s``: the SAE decodes normalized activations)."""
    return lambda units: sae.W_dec.detach().float().cpu()[units] / norm_scale


def _neuron_directions(summary: UnitSummary) -> Callable[[list[int]], Tensor]:
    """One-hot rows ``e_i`` (a neuron's direction in its own basis)."""
    n = summary.fire_counts.shape[0]
    return lambda units: torch.nn.functional.one_hot(torch.tensor(units), n).float()
