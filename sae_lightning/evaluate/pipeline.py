"""The evaluation steps glued together, so ``evaluate.py`` only loads things and calls two functions:

1. :func:`evaluate_rows` — ONE streamed pass over the held-out rows (raw activations with their
   token/doc/pos): reconstruction metrics (:class:`ReconstructionStats`), top contexts, densities and
   tracked-unit histograms for SAE latents and (when the hook is ``mlp_post``) for the raw neurons.
2. :func:`build_report_data` — picks the units to show, scores monosemanticity for a sample of units of
   both kinds, picks the opening picture by that score, labels the shown units from their contexts
   against the held-out text (:class:`Corpus`), computes direct logit effects, and returns the
   :class:`ReportData` for ``write_report``.
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
    TokenDecoder,
    UnitCollector,
    UnitSummary,
    direct_logit_effect,
    token_decoder,
)
from sae_lightning.evaluate.corpus import Corpus
from sae_lightning.evaluate.monosemanticity import (
    CoherenceScorer,
    Embedder,
    MonosemanticityScores,
    Uncertainty,
    pick_by_score,
    qualified,
    random_contexts,
    score_metrics,
    score_units,
)
from sae_lightning.evaluate.report import ReportData, UnitCard, unit_cards
from sae_lightning.metrics import DENSE_THRESHOLD, PromptFireCounts, ReconstructionStats

log = logging.getLogger(__name__)


class Rows(Protocol):
    """One batch of held-out rows (``datamodule.EvalRows``)."""

    acts: Tensor  # [n, d] raw activations
    target: Tensor | None  # [n, d_out] a transcoder's raw target rows, None for an SAE
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
    # [d_sae] tokens fired on per prompt fired in (SAEBench); None when rows carry no ordered prompts
    consistent_activation: Tensor | None = None


def track_candidates(n_units: int, n: int, seed: int) -> list[int]:
    """``n`` distinct random unit indices (all of them if ``n >= n_units``), to track for histograms.
    Track a few times more units than you will show: only tracked units that fired can be shown."""
    return sorted(random.Random(seed).sample(range(n_units), min(n, n_units)))


@torch.inference_mode()
def evaluate_rows(rows: Iterable[Rows], sae: nn.Module, *, n_top: int = 8,
                  track_latents: Sequence[int] = (), track_neurons: Sequence[int] = (),
                  neurons: bool = True, dense_threshold: float = DENSE_THRESHOLD,
                  observe: Callable[[Rows], None] | None = None) -> RowsResult:
    """Stream ``rows`` once through ``sae`` (which takes raw activations); reconstruction is measured against
    the rows' ``target`` when they have one (transcoders). Neuron activations are the input rows
    themselves; pass ``neurons=False`` when the hook is not ``mlp_post``. ``observe`` sees every batch (what
    else needs the held-out rows reads them in this one pass: absorption)."""
    stats = ReconstructionStats(dense_threshold)
    prompts = PromptFireCounts()
    latent_collector = neuron_collector = None
    docs: set[int] = set()
    dtype = next(sae.parameters()).dtype
    device = next(sae.parameters()).device
    for batch in rows:
        x = batch.acts.to(device=device, dtype=dtype)
        truth = x if batch.target is None else batch.target.to(device=device, dtype=dtype)
        z = sae.encode(x)
        stats.update(truth, sae.decode(z, x), z)
        prompts.update(z, batch.doc)
        if latent_collector is None:
            latent_collector = UnitCollector(z.shape[1], n_top, track_latents)
            neuron_collector = UnitCollector(x.shape[1], n_top, track_neurons) if neurons else None
        latent_collector.update(z, batch.tokens, batch.doc, batch.pos)
        if neuron_collector is not None:
            neuron_collector.update(batch.acts, batch.tokens, batch.doc, batch.pos)
        docs.update(batch.doc.unique().tolist())
        if observe is not None:
            observe(batch)
    if latent_collector is None:
        raise ValueError("evaluate_rows got no rows")
    return RowsResult(metrics=stats.compute(), feature_density=stats.feature_density(),
                      latents=latent_collector.result(),
                      neurons=neuron_collector.result() if neuron_collector is not None else None,
                      docs=sorted(d for d in docs if d >= 0),
                      consistent_activation=prompts.consistent_activation(stats.fire_counts))


def fired(summary: UnitSummary, units: Iterable[int], min_count: int = 1) -> list[int]:
    """The ``units`` that fired on at least ``min_count`` held-out rows, in order."""
    return [u for u in units if int(summary.fire_counts[u]) >= min_count]


@dataclass
class LMParts:
    """What the direct logit effects need from the LM: ``HookedLM.output_projection(hook)`` (None unless
    the hook is mlp_post) of the hook the latents decode into, ``HookedLM.unembed_directions()`` (None
    where that hook has no direct logit effect: mlp_in, ``hook=module``) and the tokenizer.
    ``neuron_W_out``: a transcoder's input hook's projection (its neurons'), when it differs."""

    W_out: Tensor | None
    W_U: Tensor | None
    tokenizer: Any
    neuron_W_out: Tensor | None = None


def build_report_data(title: str, metrics: Mapping[str, float], result: RowsResult, sae: nn.Module,
                      lm: LMParts, context_row: ContextRow, *, n_latents: int = 12,
                      n_neurons: int = 12, n_scored: int = 200, n_picture: int = 3,
                      embedder: Embedder | None = None, seed: int = 0,
                      uncertainty: Uncertainty | None = None,
                      history: Mapping[str, Sequence[float]] | None = None,
                      details: Mapping[str, Any] | None = None) -> tuple[ReportData, dict[str, float]]:
    """The report's data, and the monosemanticity numbers (worth adding to metrics.json).

    Shown units: the first ``n_latents``/``n_neurons`` tracked units that fired. Monosemanticity: up to
    ``n_scored`` random units of each kind among those that qualified (fired in as many context rows as
    contexts are kept), the same number for both kinds; coherence and its token-matched control only with
    an ``embedder`` (``monosemanticity.load_embedder()``); their intervals as ``uncertainty`` says
    (default: 95 %, 1000 resamples, seeded by ``seed``). The picture: the ``n_picture`` scored neurons
    with the lowest score next to the ``n_picture`` scored latents with the highest.
    """
    decode = token_decoder(lm.tokenizer)
    corpus = Corpus(context_row, result.docs)
    scorer = None
    if embedder is not None:
        scorer = CoherenceScorer(embedder, random_contexts(context_row, result.docs, n_groups=16,
                                                           group_size=result.latents.top.values.shape[1],
                                                           decode=decode, seed=seed))
    kinds = {"latent": (result.latents, n_latents, _latent_directions(sae), lm.W_out)}
    if result.neurons is not None:
        neuron_w_out = lm.W_out if lm.neuron_W_out is None else lm.neuron_W_out
        kinds["neuron"] = (result.neurons, n_neurons, _neuron_directions(result.neurons), neuron_w_out)
    scorable = {kind: qualified(summary.top, summary.top.values.shape[1])
                for kind, (summary, *_) in kinds.items()}
    n_common = min(n_scored, *(len(u) for u in scorable.values()))
    cards, scores = {}, {}
    for kind, (summary, n_show, directions, w_out) in kinds.items():
        sample = sorted(random.Random(seed).sample(scorable[kind], n_common))
        scores[kind] = score_units(kind, summary.top, sample, context_row, decode, scorer, corpus,
                                   n_qualified=len(scorable[kind]), seed=seed)
        shown = fired(summary, sorted(summary.tracked))[:n_show]
        effects = (direct_logit_effect(directions(shown), lm.W_U, w_out)
                   if shown and lm.W_U is not None else None)
        shown_scores = score_units(kind, summary.top, shown, context_row, decode, scorer, corpus, seed=seed)
        cards[kind] = unit_cards(kind, shown, summary, context_row, decode, effects, shown_scores, corpus)
    numbers = score_metrics(scores, uncertainty or Uncertainty(seed=seed))
    picture = {kind: _picture_cards(scores[kind], kinds[kind][0], context_row, decode, corpus, n_picture,
                                    most_monosemantic=kind == "latent") for kind in scores}
    data = ReportData(title=title, metrics={**metrics, **numbers}, latents=cards["latent"],
                      neurons=cards.get("neuron", []), scores=list(scores.values()),
                      feature_density=result.feature_density.numpy(), history=history, details=details or {},
                      picture_neurons=picture.get("neuron", []), picture_latents=picture["latent"])
    return data, numbers


def _picture_cards(scores: MonosemanticityScores, summary: UnitSummary, context_row: ContextRow,
                   decode: TokenDecoder, corpus: Corpus, k: int,
                   most_monosemantic: bool) -> list[UnitCard]:
    """Cards (no histogram) for the ``k`` scored units of one kind at one end of the score."""
    units = pick_by_score(scores, k, most_monosemantic)
    return unit_cards(scores.kind, units, summary, context_row, decode, scores=scores, corpus=corpus,
                      histograms=False)


def _latent_directions(sae: nn.Module) -> Callable[[list[int]], Tensor]:
    """Decoder rows in raw activation space of what the SAE reconstructs (``W_dec / output_scale``: the
    weights act on normalized activations)."""
    return lambda units: sae.weights().W_dec.detach().float().cpu()[units] / float(sae.output_scale)


def _neuron_directions(summary: UnitSummary) -> Callable[[list[int]], Tensor]:
    """One-hot rows ``e_i`` (a neuron's direction in its own basis)."""
    n = summary.fire_counts.shape[0]
    return lambda units: torch.nn.functional.one_hot(torch.tensor(units), n).float()
