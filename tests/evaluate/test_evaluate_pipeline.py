"""evaluate/pipeline.py: one pass over held-out rows, then the report data, on the tiny GPT-2."""

import pytest
import torch

from sae_lightning.cache.datamodule import EvalRows
from sae_lightning.evaluate.monosemanticity import pick_by_score, qualified
from sae_lightning.evaluate.pipeline import LMParts, build_report_data, evaluate_rows, track_candidates
from sae_lightning.evaluate.report import render
from sae_lightning.lm import HookPoint
from sae_lightning.lm.text import special_token_mask
from sae_lightning.metrics import ReconstructionStats
from sae_lightning.saes import build_sae
from sae_lightning.saes.relu import ReLUConfig

HOOK, SCALE = HookPoint(1, "mlp_post"), 2.0


@pytest.fixture(scope="module")
def held_out(tiny_gpt2) -> tuple[torch.Tensor, list[EvalRows]]:
    """Token rows and their non-special activations as the datamodule yields them (normalized, batched)."""
    lm = tiny_gpt2
    tokens = torch.randint(3, len(lm.tokenizer), (6, 16), generator=torch.Generator().manual_seed(0))
    tokens[:, 0] = lm.tokenizer.bos_token_id
    keep = ~special_token_mask(tokens, lm.tokenizer)
    acts = lm.activations(tokens, [HOOK])[HOOK][keep]
    doc, pos = keep.nonzero(as_tuple=True)
    rows = [EvalRows(acts[i:i + 25], tokens[keep][i:i + 25], doc[i:i + 25], pos[i:i + 25])
            for i in range(0, acts.shape[0], 25)]
    return tokens, rows


def _sae(d_in: int) -> torch.nn.Module:
    torch.manual_seed(0)
    sae = build_sae(ReLUConfig(d_sae=64), d_in)
    sae.set_input_scale(SCALE)
    return sae


def test_one_pass_gives_metrics_and_both_kinds_of_units(held_out) -> None:
    _, rows = held_out
    x = torch.cat([r.acts for r in rows])
    sae = _sae(x.shape[1])
    result = evaluate_rows(rows, sae, n_top=3, track_latents=[0, 1], track_neurons=[4])
    expected = ReconstructionStats()
    with torch.no_grad():
        expected.update(x, sae.decode(sae.encode(x)), sae.encode(x))
    assert result.metrics == pytest.approx(expected.compute())
    # neurons are reported in raw units: the top value of neuron 4 is the max of its raw activations
    assert float(result.neurons.top.values[4, 0]) == pytest.approx(float(x[:, 4].max()))
    assert result.docs == list(range(6)) and set(result.latents.tracked) == {0, 1}
    # rows of 6 prompts in batches of 25 (prompts straddle batches): tokens fired on per prompt fired in
    fired = sae.encode(x) != 0
    doc = torch.cat([r.doc for r in rows])
    prompts = torch.stack([fired[doc == d].any(0) for d in range(6)]).sum(0)
    torch.testing.assert_close(result.consistent_activation, fired.sum(0) / prompts)


def test_report_data_scores_neurons_and_latents_alike(held_out, tiny_gpt2) -> None:
    tokens, rows = held_out
    sae = _sae(rows[0].acts.shape[1])
    result = evaluate_rows(rows, sae, n_top=4, track_latents=track_candidates(64, 12, seed=0),
                           track_neurons=track_candidates(rows[0].acts.shape[1], 12, seed=0))
    lm = LMParts(W_out=tiny_gpt2.output_projection(HOOK), W_U=tiny_gpt2.unembed_directions(),
                 tokenizer=tiny_gpt2.tokenizer)

    def embed(texts):  # a stand-in embedder: any unit-norm vectors will do here
        return torch.nn.functional.normalize(torch.randn(len(texts), 8), dim=-1)

    data, medians = build_report_data("tiny", result.metrics, result, sae, lm,
                                      lambda d: tokens[d].tolist(), n_latents=3, n_neurons=2, n_scored=10,
                                      embedder=embed)
    assert len(data.latents) == 3 and len(data.neurons) == 2
    assert all(card.contexts and len(card.promoted) == 8 for card in [*data.latents, *data.neurons])
    latent_scores, neuron_scores = data.scores
    assert len(latent_scores.units) == len(neuron_scores.units) == 10
    # scored units come from those that fired in 4 context rows; both kinds are counted
    assert medians["latent_qualified"] == len(qualified(result.latents.top, 4)) >= 10
    assert medians["neuron_qualified"] == len(qualified(result.neurons.top, 4)) >= 10
    assert set(latent_scores.units) <= set(qualified(result.latents.top, 4))
    stats = ("entropy_median", "coherence_median", "above_random_fraction", "token_matched_lift_median")
    medians_of = [f"latent_minus_neuron_{s}" for s in ("entropy_median", "coherence_median",
                                                       "token_matched_lift_median")]
    values = [f"{kind}_{s}" for kind in ("latent", "neuron") for s in stats] + medians_of
    planned = [k for k in values if "coherence_median" in k or "lift" in k]
    counts = {f"{kind}_{name}" for kind in ("latent", "neuron") for name in ("qualified", "scored")}
    assert set(medians) == counts | {
        *values, *(f"{k}_ci_{end}" for k in values for end in ("low", "high")),
        *(f"{k}_context_se" for k in values if k.endswith("median")), *(f"{k}_units_needed" for k in planned),
        "monosemanticity_ci_level", "monosemanticity_resamples", "monosemanticity_ci_width"}
    assert medians["latent_minus_neuron_coherence_median"] == pytest.approx(
        medians["latent_coherence_median"] - medians["neuron_coherence_median"])
    key = "latent_minus_neuron_coherence_median"
    assert medians[f"{key}_ci_low"] < medians[f"{key}_ci_high"]
    assert all(card.label for card in [*data.latents, *data.neurons])
    assert [c.index for c in data.picture_latents] == pick_by_score(latent_scores, 3, most_monosemantic=True)
    assert [c.index for c in data.picture_neurons] == pick_by_score(neuron_scores, 3, most_monosemantic=False)
    page = render(data)
    assert "neuron_coherence_median" in data.metrics and "Raw MLP neurons" in page
    assert "Context coherence (higher = more monosemantic)" in page  # the explanation
