"""Per-unit summaries for interpretation: top-activating contexts, density, activation histograms and
direct logit effects. A "unit" is an SAE latent or a raw neuron: everything here takes an activation
matrix ``[N, n_units]`` and does not care which.

:class:`UnitCollector` streams held-out rows (each with its token id, context row ``doc`` and position
``pos``, as stored in the activation cache) and keeps, per unit, the ``n_top`` largest activations in
bounded memory (a running top-k merge: the batch's own top-k, merged with the kept ones), how many rows
it fired on (activation > 0), and every positive activation of a few ``track``-ed units (histograms).
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
    """Per unit, the ``n_top`` largest activations (descending) and where they happened; unused slots
    (a unit seen fewer than ``n_top`` times) hold ``-inf`` and ``-1``."""

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
    """Running top-``n_top`` activations per unit, fire counts, and values of ``track``-ed units."""

    def __init__(self, n_units: int, n_top: int, track: Sequence[int] = ()) -> None:
        self.n_top = n_top
        self.top = TopActivations(
            values=torch.full((n_units, n_top), -torch.inf),
            token=torch.full((n_units, n_top), -1, dtype=torch.long),
            doc=torch.full((n_units, n_top), -1, dtype=torch.long),
            pos=torch.full((n_units, n_top), -1, dtype=torch.long),
        )
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
        self.n_tokens += acts.shape[0]
        for unit in self._track:
            column = acts[:, unit]
            self._tracked[unit].append(column[column > 0].numpy())
        self._merge(acts, *meta)

    def _merge(self, acts: Tensor, token: Tensor, doc: Tensor, pos: Tensor) -> None:
        k = min(self.n_top, acts.shape[0])
        values, rows = acts.topk(k, dim=0)  # [k, U]: the batch's own top-k per unit
        rows = rows.T
        candidates = {
            "values": torch.cat([self.top.values, values.T], 1),
            "token": torch.cat([self.top.token, token[rows]], 1),
            "doc": torch.cat([self.top.doc, doc[rows]], 1),
            "pos": torch.cat([self.top.pos, pos[rows]], 1),
        }
        keep = candidates["values"].topk(self.n_top, dim=1).indices
        self.top = TopActivations(**{name: c.gather(1, keep) for name, c in candidates.items()})

    def result(self) -> UnitSummary:
        tracked = {u: np.concatenate(v) if v else np.zeros(0, np.float32) for u, v in self._tracked.items()}
        return UnitSummary(top=self.top, fire_counts=self.fire_counts.clone(), n_tokens=self.n_tokens,
                           tracked=tracked)


@dataclass
class Context:
    """A window of decoded tokens around an activating position; ``tokens[active]`` is that token."""

    tokens: list[str]
    active: int
    value: float
    doc: int
    pos: int
    token_id: int

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
                   pos=pos, token_id=int(row[pos]))


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
