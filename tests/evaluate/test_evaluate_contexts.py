"""evaluate/contexts.py: streaming top-k equals brute force, windows, histograms, direct logit effects."""

import numpy as np
import pytest
import torch

from sae_lightning.evaluate.contexts import (
    UnitCollector,
    activation_histogram,
    direct_logit_effect,
    make_context,
    token_decoder,
    top_contexts,
    top_promoted,
)


def _str_tokens(ids: list[int]) -> list[str]:
    return [str(t) for t in ids]


def _stream(n_rows: int = 50, n_units: int = 7) -> tuple[torch.Tensor, ...]:
    """Random non-negative activations; rows come from 8 context rows, interleaved (several per row)."""
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(n_rows, n_units, generator=g).relu()
    token = torch.randint(0, 100, (n_rows,), generator=g)
    doc = torch.randint(0, 8, (n_rows,), generator=g)
    return acts, token, doc, torch.arange(n_rows)


def _best_per_row(acts: torch.Tensor, doc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: per unit, each context row's largest activation (its first row on ties), the ``k``
    largest of those; returns values and stream rows ``[U, k]``."""
    values, rows = [], []
    for unit in range(acts.shape[1]):
        best = {}
        for r in range(acts.shape[0]):
            d = int(doc[r])
            if d not in best or acts[r, unit] > acts[best[d], unit]:
                best[d] = r
        top = sorted(best.values(), key=lambda r: -float(acts[r, unit]))[:k]
        values.append(acts[top, unit])
        rows.append(torch.tensor(top))
    return torch.stack(values), torch.stack(rows)


@pytest.mark.parametrize("batch", [3, 16, 50])
def test_running_top_k_equals_brute_force(batch: int) -> None:
    acts, token, doc, pos = _stream()
    collector = UnitCollector(acts.shape[1], n_top=5, track=[2])
    for start in range(0, acts.shape[0], batch):
        sl = slice(start, start + batch)
        collector.update(acts[sl], token[sl], doc[sl], pos[sl])
    summary = collector.result()
    values, rows = _best_per_row(acts, doc, 5)
    torch.testing.assert_close(summary.top.values, values)
    assert torch.equal(summary.top.doc, doc[rows]) and torch.equal(summary.top.pos, pos[rows])
    assert torch.equal(summary.top.token, token[rows])
    assert all(len(set(row.tolist())) == 5 for row in summary.top.doc)  # one window per context row
    assert torch.equal(summary.fire_counts, (acts > 0).sum(0)) and summary.n_tokens == 50
    np.testing.assert_allclose(np.sort(summary.tracked[2]), np.sort(acts[:, 2][acts[:, 2] > 0].numpy()))


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_top_contexts_take_one_window_per_context_row(batch: int) -> None:
    # adjacent firings in row 0 (5, 4, 3) would give three windows sharing most tokens: keep only the 5
    acts = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])[:, None]
    token, pos = torch.tensor([10, 11, 12, 13, 14]), torch.tensor([3, 4, 5, 0, 7])
    doc = torch.tensor([0, 0, 0, 1, 2])
    collector = UnitCollector(1, n_top=3)
    for start in range(0, 5, batch):
        sl = slice(start, start + batch)
        collector.update(acts[sl], token[sl], doc[sl], pos[sl])
    top = collector.result().top
    assert top.values.tolist() == [[5.0, 2.0, 1.0]] and top.doc.tolist() == [[0, 1, 2]]
    assert top.pos.tolist() == [[3, 0, 7]] and top.token.tolist() == [[10, 13, 14]]
    unknown = UnitCollector(1, n_top=3)  # rows of an imported array (doc -1) are each their own row
    unknown.update(acts, token, torch.full((5,), -1), torch.full((5,), -1))
    assert unknown.result().top.values.tolist() == [[5.0, 4.0, 3.0]]


def test_density_and_unfilled_slots_by_hand() -> None:
    # unit 0 fires on rows 0 and 2 (of 4), unit 1 never: density 1/2 and 0; only two contexts for unit 0
    # (each row its own context row here, all four reading the same tokens)
    acts = torch.tensor([[1.0, 0.0], [0.0, 0.0], [3.0, 0.0], [0.0, 0.0]])
    collector = UnitCollector(2, n_top=3)
    collector.update(acts, torch.tensor([5, 6, 7, 8]), torch.arange(4), torch.arange(4))
    summary = collector.result()
    torch.testing.assert_close(summary.density(), torch.tensor([0.5, 0.0]))
    row = [5, 6, 7, 8]
    contexts = top_contexts(summary.top, 0, lambda doc: row, _str_tokens, before=1, after=0)
    assert [(c.value, c.pos, c.tokens, c.active) for c in contexts] == [(3.0, 2, ["6", "7"], 1),
                                                                        (1.0, 0, ["5"], 0)]
    assert top_contexts(summary.top, 1, lambda doc: row, _str_tokens) == []


def test_context_window_is_clipped_and_marks_the_token() -> None:
    row = list(range(10, 20))
    c = make_context(row, pos=1, value=2.0, doc=4, decode=lambda ids: [f"<{t}>" for t in ids], before=3,
                     after=2)
    assert c.tokens == ["<10>", "<11>", "<12>", "<13>"] and c.active == 1 and c.tokens[c.active] == "<11>"
    end = make_context(row, pos=9, value=1.0, doc=4, decode=_str_tokens, before=2, after=5)
    assert end.tokens == ["17", "18", "19"] and end.active == 2 and end.text == "171819"


def test_token_decoder_reassembles_the_text(tiny_tokenizer) -> None:
    text = "Once upon a time, a little dog said “wow” 🐶."
    ids = tiny_tokenizer.encode(text)
    pieces = token_decoder(tiny_tokenizer)(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text  # multi-byte characters shown whole
    assert "\ufffd" not in "".join(pieces) and "🐶" in pieces
    assert token_decoder(tiny_tokenizer)([tiny_tokenizer.bos_token_id, ids[0]]) == ["", pieces[0]]  # BOS: ""


def test_histogram_of_a_unit() -> None:
    counts, edges = activation_histogram(np.array([0.5, 1.0, 1.5, 2.0]), bins=3)
    assert counts.tolist() == [1, 1, 2] and edges[0] == 0.5 and edges[-1] == 2.0
    assert activation_histogram(np.zeros(0))[0].size == 0


def test_direct_logit_effect_by_hand() -> None:
    W_out = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # d_mlp 3 -> d_model 2
    W_U = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])  # d_model 2 -> vocab 3
    neurons = direct_logit_effect(torch.eye(3)[[1, 2]], W_U, W_out)
    # neuron 1: W_out[1] = [0, 2] -> [0, 2, 2]; neuron 2: [1, 1] -> [1, 1, 0]
    torch.testing.assert_close(neurons, torch.tensor([[0.0, 2.0, 2.0], [1.0, 1.0, 0.0]]))
    latent = direct_logit_effect(torch.tensor([[0.5, 0.0, 0.5]]), W_U, W_out)  # = (W_out[0] + W_out[2]) / 2
    torch.testing.assert_close(latent, torch.tensor([[1.0, 0.5, -0.5]]))
    assert top_promoted(latent[0], 2, lambda ids: ["abc"[i] for i in ids]) == [("a", 1.0), ("b", 0.5)]
