"""evaluate/monosemanticity.py's intervals: the bootstrap against a hand computation (explicit loops over
the documented random streams), determinism, the context part, units needed, and the report's text."""

import math
import re
import statistics

import numpy as np
import pytest
import torch

from sae_lightning.evaluate.monosemanticity import (
    MonosemanticityScores,
    Uncertainty,
    mean_pairwise_cosine,
    pair_weighted_mean,
    score_metrics,
    token_entropy,
    units_needed,
    weighted_entropy,
)
from sae_lightning.evaluate.report import ReportData, render

GROUPS = np.array([0.20, 0.35, 0.25, 0.30])  # raw mean cosine of each random baseline group
BASELINE = float(GROUPS.mean())


def _scores(kind: str, coherence: list[float], matched: list[float], entropy: list[float],
            qualified: int = 100) -> MonosemanticityScores:
    return MonosemanticityScores(kind=kind, units=list(range(len(coherence))), entropy=np.array(entropy),
                                 coherence=np.array(coherence), matched=np.array(matched), baseline=BASELINE,
                                 n_qualified=qualified, n_contexts=8, baseline_groups=GROUPS)


LATENT = _scores("latent", [0.30, 0.10, 0.50, -0.10, 0.20], [0.10, 0.00, 0.20, math.nan, 0.30],
                 [0.0, 1.0, 2.0, 1.5, 0.5])
NEURON = _scores("neuron", [0.00, 0.10, -0.20, 0.05], [0.05, 0.00, -0.10, 0.10], [2.5, 3.0, 2.0, 1.0])


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if not math.isnan(v))
    k = len(finite)
    return finite[k // 2] if k % 2 else (finite[k // 2 - 1] + finite[k // 2]) / 2


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics at position (R - 1) q."""
    v = sorted(values)
    h = (len(v) - 1) * q
    lo = math.floor(h)
    return v[lo] + (h - lo) * (v[min(lo + 1, len(v) - 1)] - v[lo])


def _resampled_units(values: list[float], seed: int, stream: int, resamples: int) -> list[list[float]]:
    """Each resample of the units drawn one index at a time from default_rng([seed, stream])."""
    rng = np.random.default_rng([seed, stream])
    return [[values[int(rng.integers(0, len(values)))] for _ in values] for _ in range(resamples)]


def test_intervals_match_a_hand_computation() -> None:
    seed, resamples, level = 7, 200, 0.9
    got = score_metrics({"latent": LATENT, "neuron": NEURON}, Uncertainty(level, resamples, seed))
    rng = np.random.default_rng([seed, 3])  # the baseline's groups, drawn with replacement per resample
    shift = [BASELINE - statistics.fmean(GROUPS[int(rng.integers(0, 4))] for _ in GROUPS)
             for _ in range(resamples)]
    expected = {}
    for scores, stream in ((LATENT, 1), (NEURON, 2)):
        lift = [c - m for c, m in zip(scores.coherence, scores.matched, strict=True)]
        for stat, values, moved in (("coherence_median", list(scores.coherence), True),
                                    ("token_matched_lift_median", lift, False),
                                    ("entropy_median", list(scores.entropy), False)):
            medians = [_median(d) for d in _resampled_units(values, seed, stream, resamples)]
            expected[f"{scores.kind}_{stat}"] = [m + s for m, s in zip(medians, shift, strict=True)] \
                if moved else medians
        shares = [sum(c + s > 0 for c in drawn) / len(drawn) for drawn, s in zip(
            _resampled_units(list(scores.coherence), seed, stream, resamples), shift, strict=True)]
        expected[f"{scores.kind}_above_random_fraction"] = shares
    for stat in ("coherence_median", "token_matched_lift_median", "entropy_median"):
        expected[f"latent_minus_neuron_{stat}"] = [a - b for a, b in zip(
            expected[f"latent_{stat}"], expected[f"neuron_{stat}"], strict=True)]
    for key, replicates in expected.items():
        assert got[f"{key}_ci_low"] == pytest.approx(_quantile(replicates, 0.05), abs=1e-12), key
        assert got[f"{key}_ci_high"] == pytest.approx(_quantile(replicates, 0.95), abs=1e-12), key
    # the point values: medians of each kind and their difference (NaN lifts left out)
    assert got["latent_coherence_median"] == pytest.approx(0.2)
    assert got["latent_token_matched_lift_median"] == pytest.approx(_median([0.2, 0.1, 0.3, -0.1]))
    assert got["latent_minus_neuron_coherence_median"] == pytest.approx(0.2 - 0.025)
    assert got["latent_minus_neuron_entropy_median"] == pytest.approx(1.0 - 2.25)
    assert got["latent_coherence_median_ci_low"] < 0.2 < got["latent_coherence_median_ci_high"]
    # units needed for a 0.02-wide interval: min(5, 4) units per kind scaled by (width / 0.02)^2
    key = "latent_minus_neuron_coherence_median"
    width = got[f"{key}_ci_high"] - got[f"{key}_ci_low"]
    assert got[f"{key}_units_needed"] == math.ceil(4 * (width / 0.02) ** 2)
    assert "latent_minus_neuron_entropy_median_units_needed" not in got  # bits: no cosine-scale width


def test_intervals_are_deterministic_and_follow_the_seed() -> None:
    first = score_metrics({"latent": LATENT, "neuron": NEURON}, Uncertainty(seed=3))
    again = score_metrics({"latent": LATENT, "neuron": NEURON}, Uncertainty(seed=3))
    other = score_metrics({"latent": LATENT, "neuron": NEURON}, Uncertainty(seed=4))
    assert first.keys() == again.keys() and all(
        first[k] == again[k] or (math.isnan(first[k]) and math.isnan(again[k])) for k in first)
    assert any(first[k] != other[k] for k in first if k.endswith("_ci_low"))
    assert first["monosemanticity_ci_level"] == 0.95 and first["monosemanticity_resamples"] == 1000


def test_resample_weights_of_one_give_the_point_scores() -> None:
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2, 4, 3))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    sims = emb @ emb.transpose(0, 2, 1)
    tokens = np.array([[5, 5, 7, 9], [1, 1, 1, 1]])
    ones = np.ones((1, 2, 4))
    assert pair_weighted_mean(sims, ones)[0] == pytest.approx(
        [mean_pairwise_cosine(torch.from_numpy(e)) for e in emb])
    assert weighted_entropy(tokens, ones)[0].tolist() == [token_entropy([5, 5, 7, 9]), 0.0]


def test_context_part_matches_a_hand_computation() -> None:
    # two units of 3 contexts: pairwise cosines, token-matched cosines and activating tokens
    sims = np.array([[[1, .5, .1], [.5, 1, .3], [.1, .3, 1]], [[1, .9, .8], [.9, 1, .7], [.8, .7, 1]]])
    matched = np.array([[[1, .2, .0], [.2, 1, .1], [.0, .1, 1]], [[1, .4, .4], [.4, 1, .4], [.4, .4, 1]]])
    tokens = np.array([[4, 4, 6], [2, 3, 8]])
    scores = MonosemanticityScores(
        kind="latent", units=[0, 1], entropy=np.array([token_entropy(t) for t in tokens.tolist()]),
        coherence=np.array([0.3 - BASELINE, 0.8 - BASELINE]), matched=np.array([0.1, 0.4]) - BASELINE,
        baseline=BASELINE, n_qualified=2, n_contexts=3, tokens=tokens, similarities=sims,
        matched_similarities=matched, baseline_groups=GROUPS)
    seed, resamples = 5, 60
    got = score_metrics({"latent": scores}, Uncertainty(resamples=resamples, seed=seed))
    rng = np.random.default_rng([seed, 11])
    coherence, lift, entropy = [], [], []
    for _ in range(resamples):
        per_unit = []
        for unit in range(2):
            counts = rng.multinomial(3, [1 / 3] * 3)
            drawn = [i for i in range(3) for _ in range(counts[i])]
            pairs = [(a, b) for a in drawn for b in drawn if a != b]  # a context is not paired with itself
            raw = statistics.fmean(sims[unit][a, b] for a, b in pairs) if pairs else math.nan
            control = statistics.fmean(matched[unit][a, b] for a, b in pairs) if pairs else math.nan
            per_unit.append((raw - BASELINE, raw - control, token_entropy([tokens[unit][i] for i in drawn])))
        coherence.append(_median([c for c, _, _ in per_unit]))
        lift.append(_median([v for _, v, _ in per_unit]))
        entropy.append(_median([h for _, _, h in per_unit]))
    assert got["latent_coherence_median_context_se"] == pytest.approx(statistics.stdev(coherence))
    assert got["latent_token_matched_lift_median_context_se"] == pytest.approx(statistics.stdev(lift))
    assert got["latent_entropy_median_context_se"] == pytest.approx(statistics.stdev(entropy))


def test_units_needed_scales_as_one_over_root_n() -> None:
    assert units_needed(64, 0.04, 0.02) == 256  # half the width: four times the units
    assert units_needed(64, 0.01, 0.02) == 16
    assert math.isnan(units_needed(64, math.nan, 0.02))


def test_the_report_shows_intervals_and_the_units_needed() -> None:
    scores = [_scores("latent", [0.30, 0.10, 0.50, -0.10, 0.20], [0.1] * 5, [1.0] * 5, qualified=40),
              _scores("neuron", [0.00, 0.10, -0.20, 0.05, 0.0], [0.0] * 5, [2.0] * 5, qualified=900)]
    metrics = score_metrics({s.kind: s for s in scores}, Uncertainty(resamples=500))
    page = render(ReportData(title="t", metrics=metrics, scores=scores))
    key = "latent_minus_neuron_coherence_median"
    low, high, needed = metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"], metrics[f"{key}_units_needed"]
    assert needed > 40
    assert (f"With 5 units of each kind the interval of {key} is {high - low:.3g} wide" in page)
    assert (f"a width of 0.02 needs about {needed:,} units of each kind (monosemanticity_units={needed}), "
            "more than the 40 that qualify" in page)
    assert "95% percentile bootstrap over the scored units (500 resamples" in page
    row = re.search(r"<tr><th>coherence_median</th>(.*?)</tr>", page).group(1)
    assert f"0.2 [{metrics['latent_coherence_median_ci_low']:.4g}, " in row and "latent − neuron" in page
    assert f"{key}_ci_low" not in page.split("Monosemanticity")[0]  # not repeated in the headline table
