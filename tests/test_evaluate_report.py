"""evaluate/report.py: a self-contained HTML file, and the whole gather-then-write path on a tiny GPT-2."""

import base64
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_lightning.config import SAEConfig
from sae_lightning.evaluate.contexts import Context, UnitCollector, direct_logit_effect, token_decoder
from sae_lightning.evaluate.monosemanticity import CoherenceScorer, random_contexts, score_units
from sae_lightning.evaluate.report import ReportData, UnitCard, render, unit_cards, write_report
from sae_lightning.lm import HookPoint
from sae_lightning.saes import build_sae
from sae_lightning.text import special_token_mask

METRICS = {"explained_variance": 0.8125, "l0": 12.5, "ce_loss_recovered": float("nan"), "n_tokens": 20000.0}


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(uri) for uri in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    ctx = Context(tokens=["a", " <b>", " c"], active=1, value=2.5, doc=0, pos=1, token_id=7)
    card = UnitCard(kind="latent", index=3, density=0.01, contexts=[ctx],
                    histogram=np.histogram([1.0, 2.0, 2.5], bins=3), promoted=[(" dog", 1.25)])
    data = ReportData(title="SAE <run>", metrics=METRICS, latents=[card], neurons=[],
                      feature_density=np.array([0.0, 0.01, 0.2, 0.001]),
                      history={"step": [0, 10, 20], "l0": [50, 20, 12], "mse": [1.0, 0.5, 0.4]})
    page = write_report(tmp_path / "sub" / "report.html", data).read_text()
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from the network
    images = _images(page)
    assert len(images) == 3 and all(img.startswith(b"\x89PNG") for img in images)
    assert "<mark> &lt;b&gt;</mark>" in page and "SAE &lt;run&gt;" in page
    assert "0.8125" in page and "20,000" in page and "n/a" in page  # NaN recovered shown as n/a


def test_gather_and_write_on_tiny_gpt2(tmp_path: Path, tiny_gpt2) -> None:
    """The evaluate.py path: activations -> latents -> collectors -> scores -> cards -> HTML."""
    lm, hook = tiny_gpt2, HookPoint(1, "mlp_post")
    torch.manual_seed(0)
    tokens = torch.randint(3, len(lm.tokenizer), (4, 16))
    tokens[:, 0] = lm.tokenizer.bos_token_id
    keep = ~special_token_mask(tokens, lm.tokenizer)
    acts = lm.activations(tokens, [hook])[hook][keep]  # [N, d_mlp], BOS rows dropped as in the cache
    doc, pos = keep.nonzero(as_tuple=True)
    sae = build_sae(SAEConfig(architecture="relu", d_sae=64), acts.shape[1])
    norm_scale = 2.0
    with torch.no_grad():
        latents = sae.encode(acts * norm_scale)
    decode, row = token_decoder(lm.tokenizer), lambda d: tokens[d].tolist()
    summaries = {}
    for kind, matrix, shown in (("latent", latents, [0, 1, 2]), ("neuron", acts, [5, 6])):
        collector = UnitCollector(matrix.shape[1], n_top=4, track=shown)
        for part in range(0, matrix.shape[0], 20):  # streamed in batches of 20 rows
            sl = slice(part, part + 20)
            collector.update(matrix[sl], tokens[keep][sl], doc[sl], pos[sl])
        summaries[kind] = (collector.result(), shown)
    scorer = CoherenceScorer(lambda texts: torch.nn.functional.normalize(torch.randn(len(texts), 8), dim=-1),
                             random_contexts(row, range(4), 3, 4, decode))
    W_out, W_U = lm.output_projection(hook), lm.unembed_directions()
    directions = {"latent": lambda u: sae.W_dec.detach()[u] / norm_scale,  # raw-space decoder rows
                  "neuron": lambda u: torch.eye(acts.shape[1])[u]}
    cards, scores = {}, []
    for kind, (summary, shown) in summaries.items():
        scored = score_units(kind, summary.top, range(summary.fire_counts.shape[0]), row, decode, scorer)
        scores.append(scored)
        effects = direct_logit_effect(directions[kind](shown), W_U, W_out)
        cards[kind] = unit_cards(kind, shown, summary, row, decode, effects, scored, n_promoted=3)
    data = ReportData(title="tiny", metrics=METRICS, latents=cards["latent"], neurons=cards["neuron"],
                      scores=scores, feature_density=summaries["latent"][0].density().numpy())
    page = render(data)
    assert len(cards["latent"][0].promoted) == 3 and cards["neuron"][1].index == 6
    assert page.count("class='card latent'") == 3 and page.count("class='card neuron'") == 2
    assert "Monosemanticity: neurons vs latents" in page and "neuron_entropy_median" in page
    assert "latent_coherence_median" in page and "context coherence" in page  # the explanation
    assert all(img.startswith(b"\x89PNG") for img in _images(page))


@pytest.mark.parametrize("field", ["latents", "neurons"])
def test_one_kind_of_unit_is_enough(field: str) -> None:
    card = UnitCard(kind=field[:-1], index=0, density=0.0, contexts=[], histogram=(np.zeros(0), np.zeros(0)),
                    promoted=[])
    page = render(ReportData(title="t", metrics={}, **{field: [card]}))
    assert "never fired" in page
