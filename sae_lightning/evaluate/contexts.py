"""Per-unit summaries for interpretation: top-activating contexts, density, activation histograms and
direct logit effects. A "unit" is an SAE latent or a raw neuron: everything here takes an activation
matrix ``[N, n_units]`` and does not care which.

:class:`UnitCollector` streams held-out rows (each with its token id, context row ``doc`` and position
``pos``, as stored in the activation cache) and keeps, per unit, the ``n_top`` largest activations AT
MOST ONE PER CONTEXT ROW (adjacent firings in one story give windows sharing most of their tokens, which
would make a unit look coherent), in bounded memory: a running top-k merge of each context row's best
window. It also counts the rows each unit fired on (activation > 0) and keeps every positive activation
of a few ``track``-ed units (histograms).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

TokenDecoder = Callable[[Sequence[int]], list[str]]  # token ids -> the text of each, in order
REPLACEMENT_CHAR = "\ufffd"  # what decoding an incomplete UTF-8 byte sequence yields
ContextRow = Callable[[int], Sequence[int]]  # doc index -> the token ids of that context row


@dataclass
class TopActivations:
    """Per unit, the ``n_top`` largest activations (descending), each from a different context row, and
    where they happened; unused slots (a unit seen in fewer than ``n_top`` rows) hold ``-inf`` and ``-1``.
    Rows of unknown context (doc -1, imported arrays) each count as their own context row."""

    values: Tensor  # [U, n_top] float32
    token: Tensor  # [U, n_top] int64 token id at the activating position
    doc: Tensor  # [U, n_top] int64 context row
    pos: Tensor  # [U, n_top] int64 position in the row


@dataclass
class UnitSummary:
    """What :class:`UnitCollector` found over the held-out rows."""

    top: TopActivations
    fire_counts: Tensor  # [U] rows with activation > 0
    n_tokens: int
    tracked: dict[int, np.ndarray] = field(default_factory=dict)  # unit -> its positive activations

    def density(self) -> Tensor:
        """Fraction of rows on which each unit was positive ``[U]``."""
        return self.fire_counts.double().div(max(self.n_tokens, 1)).float()


class UnitCollector:
    """Running top-``n_top`` activations per unit (one per context row), fire counts, and values of
    ``track``-ed units."""

    def __init__(self, n_units: int, n_top: int, track: Sequence[int] = ()) -> None:
        self.n_top = n_top
        self.top = TopActivations(
            values=torch.full((n_units, n_top), -torch.inf),
            token=torch.full((n_units, n_top), -1, dtype=torch.long),
            doc=torch.full((n_units, n_top), -1, dtype=torch.long),
            pos=torch.full((n_units, n_top), -1, dtype=torch.long),
        )
        self._key = torch.full((n_units, n_top), UNUSED, dtype=torch.long)  # context row of each kept slot
        self.fire_counts = torch.zeros(n_units, dtype=torch.long)
        self.n_tokens = 0
        self._track = list(track)
        self._tracked: dict[int, list[np.ndarray]] = {u: [] for u in self._track}

    @torch.no_grad()
    def update(self, acts: Tensor, token: Tensor, doc: Tensor, pos: Tensor) -> None:
        """Add rows ``acts [N, U]`` whose metadata are ``token``, ``doc``, ``pos`` (each ``[N]``)."""
        acts = acts.detach().float().cpu()
        meta = [t.detach().cpu().long() for t in (token, doc, pos)]
        self.fire_counts += (acts > 0).sum(0)
        for unit in self._track:
            column = acts[:, unit]
            self._tracked[unit].append(column[column > 0].numpy())
        self._merge(acts, *meta)
        self.n_tokens += acts.shape[0]

    def _merge(self, acts: Tensor, token: Tensor, doc: Tensor, pos: Tensor) -> None:
        # each row's context row: its doc, or for doc -1 (an imported array) a negative key of its own
        key = torch.where(doc >= 0, doc, -1 - self.n_tokens - torch.arange(doc.shape[0]))
        values, rows = _top_rows_one_per_key(acts, key, self.n_top)  # the batch's own best, [U, n_top]
        found = rows >= 0
        rows = rows.clamp(min=0)
        candidates = {
            "values": torch.cat([self.top.values, values], 1),
            "token": torch.cat([self.top.token, token[rows].masked_fill(~found, -1)], 1),
            "doc": torch.cat([self.top.doc, doc[rows].masked_fill(~found, -1)], 1),
            "pos": torch.cat([self.top.pos, pos[rows].masked_fill(~found, -1)], 1),
            "key": torch.cat([self._key, key[rows].masked_fill(~found, UNUSED)], 1),
        }
        # a context row split over two batches: keep only its best window
        order = candidates["values"].argsort(dim=1, descending=True, stable=True)
        repeated = ~_first_of_each_key(candidates["key"].gather(1, order))
        keep = candidates["values"].gather(1, order).masked_fill(repeated, -torch.inf).topk(self.n_top, 1)
        kept = {name: c.gather(1, order).gather(1, keep.indices) for name, c in candidates.items()}
        self._key = kept.pop("key")
        self.top = TopActivations(**kept)

    def result(self) -> UnitSummary:
        tracked = {u: np.concatenate(v) if v else np.zeros(0, np.float32) for u, v in self._tracked.items()}
        return UnitSummary(top=self.top, fire_counts=self.fire_counts.clone(), n_tokens=self.n_tokens,
                           tracked=tracked)


UNUSED = torch.iinfo(torch.long).min  # the row key of an empty slot


def _first_of_each_key(key: Tensor) -> Tensor:
    """``[U, M]`` keys (each row in descending order of value) -> True where a key occurs for the first
    time in its row (empty slots, ``UNUSED``, always count as first)."""
    sorted_key, order = key.sort(dim=1, stable=True)
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[:, 1:] = sorted_key[:, 1:] != sorted_key[:, :-1]
    first |= sorted_key == UNUSED
    return torch.zeros_like(first).scatter(1, order, first)


def _top_rows_one_per_key(acts: Tensor, key: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per unit, the ``k`` largest POSITIVE activations of ``acts [N, U]`` at most one per ``key`` (context
    row), as values and row indices ``[U, k]`` (``-inf`` and ``-1`` where there are fewer).

    Exact without a per-row reduction: the top ``m`` rows of a unit that hold ``k`` distinct keys contain
    its answer, so ``m`` grows (x4) only for the units whose top rows repeat one context row."""
    n, n_units = acts.shape
    values = torch.full((n_units, k), -torch.inf)
    rows = torch.full((n_units, k), -1, dtype=torch.long)
    pending, m = torch.arange(n_units), 2 * k
    while pending.numel():
        m = min(m, n)
        sub = acts if pending.numel() == n_units else acts[:, pending]  # no copy on the first round
        top, at = sub.topk(m, dim=0)
        top, at = top.T, at.T  # [P, m], descending
        first = _first_of_each_key(key[at]) & (top > 0)
        done = (first.sum(1) >= k) | (m == n) | (top[:, -1] <= 0)
        best = top[done].masked_fill(~first[done], -torch.inf).topk(min(k, m), dim=1)
        values[pending[done], :best.values.shape[1]] = best.values
        rows[pending[done], :best.values.shape[1]] = at[done].gather(1, best.indices)
        pending, m = pending[~done], 4 * m
    rows[values == -torch.inf] = -1
    return values, rows


@dataclass
class Context:
    """A window of decoded tokens around an activating position; ``tokens[active]`` is that token."""

    tokens: list[str]
    active: int
    value: float
    doc: int
    pos: int
    token_id: int
    ids: list[int] = field(default_factory=list)  # the window's token ids (``tokens`` decoded from them)

    @property
    def text(self) -> str:
        """The window as plain text (what the monosemanticity score embeds)."""
        return "".join(self.tokens)


def token_decoder(tokenizer: Any) -> TokenDecoder:
    """Token ids -> the text each contributes to the decoded string (not its BPE symbol).

    Decoded by prefixes, so a character split over several byte-level tokens (an emoji, curly quotes)
    is shown whole, on the first of its tokens, instead of as replacement characters. Special tokens
    (BOS/EOS/PAD) contribute "" so they do not enter the embedded context text.
    """

    def decode(ids: Sequence[int]) -> list[str]:
        ids = [int(i) for i in ids]
        pieces, done, first = [""] * len(ids), "", 0  # first: the first token not yet given text
        for i in range(len(ids)):
            text = tokenizer.decode(ids[:i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            if text.endswith(REPLACEMENT_CHAR) and i + 1 < len(ids):
                continue  # an incomplete character: wait for the tokens that complete it
            pieces[first] = text[len(done):] if text.startswith(done) else text
            done, first = text, i + 1
        return pieces

    return decode


def make_context(row: Sequence[int], pos: int, value: float, doc: int, decode: TokenDecoder,
                 before: int = 12, after: int = 4) -> Context:
    """The tokens ``row[pos - before : pos + after + 1]`` decoded, with the activating one marked."""
    start = max(0, pos - before)
    window = list(row[start:pos + after + 1])
    return Context(tokens=decode(window), active=pos - start, value=float(value), doc=doc,
                   pos=pos, token_id=int(row[pos]), ids=[int(t) for t in window])


def top_contexts(top: TopActivations, unit: int, context_row: ContextRow, decode: TokenDecoder,
                 before: int = 12, after: int = 4) -> list[Context]:
    """The kept top contexts of ``unit`` where it actually fired (activation > 0), strongest first."""
    return [make_context(context_row(int(d)), int(p), float(v), int(d), decode, before, after)
            for v, d, p in zip(top.values[unit], top.doc[unit], top.pos[unit], strict=True) if v > 0]


def activation_histogram(values: np.ndarray, bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Counts and bin edges of a unit's positive activations (empty arrays if it never fired)."""
    if values.size == 0:
        return np.zeros(0), np.zeros(0)
    return np.histogram(values, bins=bins)


def direct_logit_effect(directions: Tensor, W_U: Tensor, W_out: Tensor | None = None) -> Tensor:
    """``directions [U, d_hook] (@ W_out [d_hook, d_model]) @ W_U [d_model, vocab]`` -> ``[U, vocab]``.

    SAE latent i: its decoder row ``W_dec[i] / input_scale`` (raw activation space). Raw mlp_post neuron i:
    the one-hot ``e_i``, i.e. ``W_out[i] @ W_U``. ``W_out`` is ``HookedLM.output_projection(hook)`` (None
    for hooks already in the residual stream). Computed on ``W_U``'s device, returned on the CPU. The
    final norm is ignored (see
    ``HookedLM.unembed_directions``), so only the ranking and relative sizes are meaningful.
    """
    d = directions.to(W_U.device).float()
    if W_out is not None:
        d = d @ W_out.float()
    return (d @ W_U.float()).cpu()


def top_promoted(effect: Tensor, k: int, decode: TokenDecoder) -> list[tuple[str, float]]:
    """The ``k`` tokens with the largest direct logit effect in one unit's ``effect [vocab]``."""
    values, ids = effect.topk(k)
    return [(decode([int(i)])[0], float(v)) for v, i in zip(values, ids, strict=True)]
