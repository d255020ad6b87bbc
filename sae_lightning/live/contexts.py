"""The text of a live run as numbered contexts: which are held out, which rank trains on which.

Contexts are the packed rows ``[context_size]`` of ``text.pack_rows``, numbered ``0, 1, ...`` in text order:
a pure function of the data config and the tokenizer, re-read from the start whenever needed (nothing about
the text is stored). The split follows the cache's semantics: a cache of the same config holds the first
``C = ceil(data.n_tokens / context_size)`` contexts and holds out its last ``eval_fraction`` (evaluation) and
the ``val_fraction`` before them (validation). A live run holds out exactly those contexts and trains on
every other context of the text, in order: ``[0, C - held-out)`` then ``[C, ...)``, so it is not limited to
``data.n_tokens``.

Training context ``j`` (its index among the training contexts, within one pass over the text) belongs to
rank ``j % world_size``: ranks read disjoint contexts, in every pass. The same rule deals out the
validation contexts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae_lightning.config import DataConfig
from sae_lightning.lm.text import iter_documents, pack_rows, special_token_ids


@dataclass(frozen=True)
class Split:
    """Context indices held out for evaluation and validation; every other context trains."""

    budget: int        # contexts a cache of this config would hold: ceil(data.n_tokens / context_size)
    val: range
    eval: range

    @classmethod
    def of(cls, data: DataConfig, val_fraction: float, eval_fraction: float) -> Split:
        budget = math.ceil(data.n_tokens / data.context_size)
        n_eval = math.ceil(eval_fraction * budget)
        n_val = math.ceil(val_fraction * budget)
        if n_eval + n_val >= budget:
            raise ValueError(f"data.n_tokens={data.n_tokens} gives {budget} contexts of {data.context_size} "
                             f"tokens: too few to hold out activations.val_fraction={val_fraction} and "
                             f"eval_fraction={eval_fraction} and train on the rest. Raise data.n_tokens")
        return cls(budget, range(budget - n_eval - n_val, budget - n_eval), range(budget - n_eval, budget))

    def held_out(self, index: int) -> bool:
        return self.val.start <= index < self.eval.stop


class TextContexts:
    """Contexts of the text with the positions a run trains on (BOS/EOS/special tokens excluded when
    ``data.exclude_special``, as the cache builder does)."""

    def __init__(self, data: DataConfig, tokenizer: Any) -> None:
        self.data, self.tokenizer = data, tokenizer
        self.special = np.asarray(special_token_ids(tokenizer), np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        """Every context ``[context_size]`` int64 of the text, in order (one pass)."""
        for block in pack_rows(iter_documents(self.data), self.tokenizer, self.data.context_size,
                               self.data.prepend_bos):
            yield from block

    def kept(self, tokens: np.ndarray) -> np.ndarray:
        """Bool mask ``tokens.shape``: the positions whose activations are trained on."""
        if not self.data.exclude_special:
            return np.ones(tokens.shape, bool)
        return ~np.isin(tokens, self.special)


@dataclass(frozen=True)
class Context:
    """One context of a rank's training stream: its text-wide index, tokens and trained positions."""

    index: int
    tokens: np.ndarray   # [context_size] int64
    kept: np.ndarray     # [context_size] bool

    @property
    def rows(self) -> int:
        return int(self.kept.sum())


def training_contexts(text: TextContexts, split: Split, rank: int, world_size: int,
                      repeat: bool) -> Iterator[Context]:
    """Rank ``rank``'s training contexts in order; with ``repeat`` the text is read again after its end
    (endless), otherwise the iterator ends with the text."""
    while True:
        j = -1
        for index, tokens in enumerate(text):
            if split.held_out(index):
                continue
            j += 1
            if j % world_size == rank:
                yield Context(index, tokens, text.kept(tokens))
        if not repeat or j < 0:
            return


@dataclass
class Survey:
    """What one pass over the text found: the held-out contexts' tokens and how many training rows each
    rank has (counted up to ``need`` rows per rank; ``exhausted`` when the text ended first)."""

    held_out: dict[int, np.ndarray]
    train_rows: list[int]
    train_contexts: int
    exhausted: bool


def survey(text: TextContexts, split: Split, world_size: int, need: int | None) -> Survey:
    """Read the text until the held-out contexts are known and every rank has ``need`` training rows
    (``None``: only the held-out contexts), tokenizing only: no LM."""
    held: dict[int, np.ndarray] = {}
    rows = [0] * world_size
    j = -1
    for index, tokens in enumerate(text):
        if split.held_out(index):
            held[index] = tokens
        else:
            j += 1
            rows[j % world_size] += int(text.kept(tokens).sum())
        if index + 1 >= split.eval.stop and (need is None or min(rows) >= need):
            return Survey(held, rows, j + 1, exhausted=False)
    return Survey(held, rows, j + 1, exhausted=True)
