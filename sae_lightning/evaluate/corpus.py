"""The held-out text as one token array: how often each token occurs (what unit labels compare against)
and where (what the token-matched control draws its windows from).

The corpus is the context rows the evaluation's held-out activations came from (``RowsResult.docs``): the
same text the top contexts and the random baseline windows are taken from.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

import numpy as np

from sae_lightning.evaluate.contexts import ContextRow


class Corpus:
    """Token ids of ``docs`` (read with ``context_row``), with a token -> occurrences index."""

    def __init__(self, context_row: ContextRow, docs: Sequence[int]) -> None:
        rows = [np.asarray(context_row(int(d)), dtype=np.int64) for d in docs]
        self.context_row = context_row
        self.ids = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.doc = np.repeat(np.asarray(docs, dtype=np.int64), [len(r) for r in rows])
        self.pos = np.concatenate([np.arange(len(r)) for r in rows]) if rows else np.zeros(0, np.int64)
        self._by_token = np.argsort(self.ids, kind="stable")  # occurrences of token t: a contiguous run
        self._counts = np.bincount(self.ids) if self.ids.size else np.zeros(0, np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self._counts)])

    def __len__(self) -> int:
        return int(self.ids.size)

    def count(self, token: int) -> int:
        """How many times ``token`` occurs in the corpus."""
        return int(self._counts[token]) if 0 <= token < self._counts.size else 0

    def occurrences(self, token: int) -> np.ndarray:
        """Flat indices (into ``ids``/``doc``/``pos``) of every occurrence of ``token``."""
        if not 0 <= token < self._counts.size:
            return np.zeros(0, np.int64)
        return self._by_token[self._starts[token]:self._starts[token + 1]]

    def matching(self, tokens: Sequence[int], exclude_docs: Collection[int],
                 rng: np.random.Generator) -> list[tuple[int, int]] | None:
        """For each of ``tokens``, a random ``(doc, pos)`` holding the same token, every one in a different
        context row and none in ``exclude_docs`` (the unit's own rows), in the order of ``tokens`` (the
        i-th place holds ``tokens[i]``); None when some token has too few such rows."""
        used = set(exclude_docs)
        found: dict[int, list[tuple[int, int]]] = {}
        for token, n in Counter(int(t) for t in tokens).items():
            occurrences = self.occurrences(token)
            places = found[token] = []
            for i in occurrences[rng.permutation(occurrences.size)]:
                if len(places) == n:
                    break
                if int(self.doc[i]) not in used:
                    used.add(int(self.doc[i]))
                    places.append((int(self.doc[i]), int(self.pos[i])))
            if len(places) < n:
                return None
        return [found[int(t)].pop() for t in tokens]
