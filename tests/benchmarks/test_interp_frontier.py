"""The frontier study's grid, its selection rule and its frontier (``benchmarks/interp_frontier.py``); the
study itself runs for hours and is run by hand (``--smoke`` runs it end to end at a tiny budget)."""

from __future__ import annotations

import argparse

from benchmarks import interp_frontier as study


def _args(**kw) -> argparse.Namespace:
    values = {"architectures": list(study.ARCHITECTURES), "l0": [16, 45, 128], "widths": [2, 8]}
    return argparse.Namespace(**(values | kw))


def test_the_grid_has_every_setting_two_seeds_at_one_point_and_the_reference():
    groups = study.grid(_args())
    jobs = [j for g in groups for j in g]
    assert len(jobs) == 1 + 6 * 3 * 2 + 6
    assert len({j.name for j in jobs}) == len(jobs)
    assert [j.name for j in groups[1]] == ["relu_dn_L16_x2_s0", "relu_dn_L45_x2_s0", "relu_dn_L128_x2_s0",
                                           "relu_dn_L45_x2_s1"]
    assert all(len({j.width for j in g}) == 1 and len({j.architecture for j in g}) == 1 for g in groups)
    assert [(j.architecture, j.l0, j.width) for j in jobs if j.sae_seed == 1] == [
        (a, 45, 2) for a in study.ARCHITECTURES]
    topk = next(j for j in jobs if j.architecture == "topk" and j.l0 == 128 and j.width == 8)
    gated = next(j for j in jobs if j.architecture == "gated" and j.l0 == 16 and j.width == 2)
    assert "sae.k=128" in topk.overrides and "sae.target_l0=16" in gated.overrides
    assert jobs[0].architecture == study.REFERENCE and jobs[0].l0 is None
    assert [g[0].width for g in groups] == [2] * 7 + [8] * 6  # the cheaper width first


def _row(job: str, ev: float, score: float, l0: float = 20.0, seed: int = 0) -> dict:
    return {"job": job, "sae_seed": seed, "validation_half": {"explained_variance": ev, "l0": l0,
                                                              "latent_coherence_median": score}}


def test_the_rule_maximises_the_score_at_enough_explained_variance_on_seed_0_jobs():
    rows = [_row("a", 0.65, 0.30), _row("b", 0.75, 0.10), _row("c", 0.71, 0.12, l0=40),
            _row("d", 0.90, 0.12, l0=30), _row("e", 0.95, 0.50, seed=1)]
    assert study.choose(rows, 0.7)["job"] == "d"  # a: too little EV; e: a second seed; c vs d: lower L0
    assert study.choose(rows, 0.99) is None
    both = [{**r, "validation_half": {**r["validation_half"],
                                      "latent_minus_neuron_coherence_median": -r["validation_half"]
                                      ["latent_coherence_median"]}} for r in rows]
    assert study.score_key(both) == "latent_minus_neuron_coherence_median"
    assert study.choose(both, 0.7)["job"] == "b"


def test_the_frontier_keeps_the_points_nothing_beats_on_both_axes():
    points = [(16, 0.05, "a"), (32, 0.08, "b"), (64, 0.07, "c"), (128, 0.09, "d"), (32, 0.04, "e")]
    assert study.frontier(points, lower_x_better=True) == ["a", "b", "d"]
    assert study.frontier([(0.8, 0.05, "a"), (0.7, 0.06, "b"), (0.6, 0.04, "c")], lower_x_better=False) == [
        "a", "b"]


def test_the_verdict_needs_the_intervals_to_part():
    key = "latent_coherence_median"
    chosen = {key: 0.09, f"{key}_ci_low": 0.08, f"{key}_ci_high": 0.10}
    assert "better beyond the intervals" in study.verdict(chosen, {key: 0.05, f"{key}_ci_high": 0.07}, key)
    assert "not better" in study.verdict(chosen, {key: 0.07, f"{key}_ci_high": 0.085}, key)
    assert "no claim" in study.verdict({key: 0.09}, {key: 0.05}, key)
