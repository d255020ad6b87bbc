"""Two halves of the held-out contexts (``evaluate.py contexts=validation|test``): choose a setting by its
numbers on one half, report it on the other, which the choice never saw.

Each context row is drawn into a half by its own number and ``context_split_seed`` alone (a hash, not the
order the rows arrive in), so the split is the same for every SAE evaluated on the same activations, for any
``max_tokens`` or batch size, and the two halves never share a context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from sae_lightning.checks import ConfigError


def in_validation_half(doc: int, seed: int) -> bool:
    """Whether context row ``doc`` falls in the validation half (else the test half) for ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{doc}".encode(), digest_size=8).digest()
    return digest[0] < 128


def keep_half(rows: Iterable[Any], half: str, seed: int) -> Iterator[Any]:
    """The batches of ``rows`` (``EvalRows``) cut to the contexts of ``half`` (``validation`` or ``test``);
    ``all`` passes them through. Rows with no known context (``doc < 0``) cannot be split."""
    if half == "all":
        yield from rows
        return
    want = half == "validation"
    halves: dict[int, bool] = {}
    for batch in rows:
        docs = batch.doc.tolist()
        if docs and min(docs) < 0:
            raise ConfigError(f"contexts={half}: these held-out rows carry no context numbers (an imported "
                              "array), so they cannot be split into halves; use contexts=all")
        for d in set(docs) - halves.keys():
            halves[d] = in_validation_half(d, seed)
        mask = torch.tensor([halves[d] == want for d in docs], dtype=torch.bool)
        if mask.any():
            yield type(batch)(**{name: _rows(value, mask) for name, value in vars(batch).items()})


def _rows(value: Any, mask: torch.Tensor) -> Any:
    return value[mask] if isinstance(value, torch.Tensor) else value
