"""evaluate/labels.py and evaluate/corpus.py: a unit's label from its contexts against corpus frequencies."""

import numpy as np

from sae_lightning.evaluate.contexts import make_context
from sae_lightning.evaluate.corpus import Corpus
from sae_lightning.evaluate.labels import NOTHING_SHARED, UnitLabel, label_unit

WORDS = ["the", " cat", " dog", " sat", " park", ".", " ran", "\n"]
THE, CAT, DOG, SAT, PARK, DOT, RAN, NEWLINE = range(8)
# three dog-in-the-park stories among eight cat stories: 47 tokens
ROWS = {0: [THE, DOG, RAN, PARK, DOT], 1: [THE, DOG, RAN, PARK, DOT], 2: [THE, DOG, RAN, PARK, DOT],
        **{d: [THE, CAT, SAT, DOT] for d in range(3, 10)}, 10: [THE, CAT, RAN, DOT]}


def _words(ids: list[int]) -> list[str]:
    return [WORDS[i] for i in ids]


def test_corpus_counts_and_finds_every_occurrence() -> None:
    corpus = Corpus(ROWS.__getitem__, list(ROWS))
    assert len(corpus) == 47 and corpus.count(THE) == 11 and corpus.count(RAN) == 4 and corpus.count(99) == 0
    ran = corpus.occurrences(RAN)
    places = sorted(zip(corpus.doc[ran].tolist(), corpus.pos[ran].tolist(), strict=True))
    assert places == [(0, 2), (1, 2), (2, 2), (10, 2)]
    assert corpus.occurrences(99).size == 0


def test_label_by_hand() -> None:
    corpus = Corpus(ROWS.__getitem__, list(ROWS))
    contexts = [make_context(ROWS[d], 1, 1.0, d, _words, before=1, after=3) for d in (0, 1, 2)]
    label = label_unit(contexts, corpus)
    # fires on " dog" in 3/3 (corpus p = 3/47). Around it (4 other positions): " park", p = 3/47, chance in a
    # window q = 1 - (44/47)^4 = 0.231, score 3 ln(1 / q) = 4.38; " ran", p = 4/47, q = 0.299, score 3.62;
    # "the" (p = 11/47, q = 0.655) is in every window but not twice as often as chance; "." is no word
    assert label == UnitLabel(firing=[("dog", 3)], around=[("park", 3), ("ran", 3)], n=3)
    assert str(label) == "on “dog” 3/3; around park 3/3, ran 3/3"


def test_a_unit_with_nothing_in_common_says_so() -> None:
    corpus = Corpus(ROWS.__getitem__, list(ROWS))
    contexts = [make_context(ROWS[d], p, 1.0, d, _words, before=0, after=0)
                for d, p in [(0, 0), (3, 1), (4, 2)]]
    assert str(label_unit(contexts, corpus)) == NOTHING_SHARED


def test_whitespace_tokens_are_shown_visibly() -> None:
    rows = {0: [CAT, NEWLINE], 1: [DOG, NEWLINE], 2: [CAT, SAT, SAT, SAT]}
    corpus = Corpus(rows.__getitem__, list(rows))
    contexts = [make_context(rows[d], 1, 1.0, d, _words, before=0, after=0) for d in (0, 1)]
    assert label_unit(contexts, corpus).firing == [("↵", 2)]
    assert np.array_equal(corpus.doc, [0, 0, 1, 1, 2, 2, 2, 2])
