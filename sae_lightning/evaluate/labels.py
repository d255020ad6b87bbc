"""A short automatic description of a unit from its top contexts: the tokens it fires on and the words
around them that are much more common there than in the corpus (the held-out text, :class:`Corpus`).

For a token ``t`` found in ``k`` of the unit's ``n`` contexts (at the activating position, or anywhere else
in the window), compare ``k / n`` with the chance ``q`` that one position (``q = p``), or a window of ``w``
other positions (``q = 1 - (1 - p)^w``), holds ``t``, where ``p`` is ``t``'s corpus frequency. A token is
*distinctive* when ``k >= 2`` and ``k / n >= 2 q``; the most distinctive are those with the largest
``k · ln(k / (n q))`` (found often, and far more often than chance).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sae_lightning.evaluate.contexts import Context
from sae_lightning.evaluate.corpus import Corpus

NOTHING_SHARED = "no distinctive token or word in two of its contexts"


@dataclass
class UnitLabel:
    """The distinctive tokens a unit fires on and words around them, each with how many of the ``n``
    contexts hold it, most distinctive first."""

    firing: list[tuple[str, int]]
    around: list[tuple[str, int]]
    n: int

    def __str__(self) -> str:
        parts = []
        if self.firing:
            parts.append("on " + ", ".join(f"“{t}” {k}/{self.n}" for t, k in self.firing))
        if self.around:
            parts.append("around " + ", ".join(f"{w} {k}/{self.n}" for w, k in self.around))
        return "; ".join(parts) or NOTHING_SHARED


def label_unit(contexts: Sequence[Context], corpus: Corpus, k: int = 3) -> UnitLabel:
    """The ``k`` most distinctive firing tokens and context words of a unit's top ``contexts``."""
    n = len(contexts)
    firing, around = Counter[int](), Counter[int]()
    text: dict[int, str] = {}
    for c in contexts:
        firing[c.token_id] += 1
        others = {t: c.tokens[i] for i, t in enumerate(c.ids) if i != c.active}
        around.update(others.keys())  # contexts holding the token, not occurrences
        text |= others | {c.token_id: c.tokens[c.active]}
    width = max((len(c.ids) - 1 for c in contexts), default=0)
    chosen_firing = _most_distinctive(firing, n, corpus, 1, text, k)
    shown = {t.lower() for t, _ in chosen_firing}
    words = Counter({t: m for t, m in around.items() if any(ch.isalpha() for ch in text[t])})
    chosen_around = [(w, m) for w, m in _most_distinctive(words, n, corpus, width, text, k + len(shown))
                     if w.lower() not in shown][:k]
    return UnitLabel(firing=chosen_firing, around=chosen_around, n=n)


def _most_distinctive(counts: Counter[int], n: int, corpus: Corpus, width: int, text: dict[int, str],
                      k: int) -> list[tuple[str, int]]:
    """The ``k`` distinctive tokens of ``counts`` (token -> contexts holding it), best first, shown once per
    text."""
    scored = []
    for token, m in counts.items():
        p = max(corpus.count(token), 1) / max(len(corpus), 1)
        chance = 1 - (1 - p) ** width
        if m >= 2 and m / n >= 2 * chance:
            scored.append((m * math.log(m / (n * chance)), _show(text[token]), m))
    out: dict[str, int] = {}
    for _, shown, m in sorted(scored, key=lambda s: -s[0]):
        if len(out) < k and shown not in out:
            out[shown] = m
    return list(out.items())


def _show(token_text: str) -> str:
    """A token's text for a one-line label: stripped, or its whitespace made visible."""
    return token_text.strip() or token_text.replace("\n", "↵").replace(" ", "␣") or "∅"
