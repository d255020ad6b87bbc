"""evaluate/report.py: a self-contained HTML file with the opening picture, labels and the score table."""

import base64
import re
from pathlib import Path

import numpy as np
import pytest

from sae_lightning.evaluate.contexts import Context
from sae_lightning.evaluate.monosemanticity import MonosemanticityScores, token_entropy
from sae_lightning.evaluate.report import ReportData, UnitCard, render, write_report

METRICS = {"explained_variance": 0.8125, "l0": 12.5, "ce_loss_recovered": float("nan"), "n_tokens": 20000}


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(uri) for uri in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    ctx = Context(tokens=["a\n", " <b>", " c"], active=1, value=2.5, doc=0, pos=1, token_id=7)
    card = UnitCard(kind="latent", index=3, density=0.01, contexts=[ctx],
                    histogram=np.histogram([1.0, 2.0, 2.5], bins=3), promoted=[(" dog", 1.25)])
    data = ReportData(title="SAE <run>", metrics=METRICS, latents=[card], neurons=[],
                      feature_density=np.array([0.0, 0.01, 0.2, 0.001]),
                      history={"step": [0, 10, 20], "l0": [50, 20, 12], "mse": [1.0, 0.5, 0.4]})
    page = write_report(tmp_path / "sub" / "report.html", data).read_text()
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from the network
    images = _images(page)
    assert len(images) == 3 and all(img.startswith(b"\x89PNG") for img in images)
    assert "a↵<mark> &lt;b&gt;</mark>" in page and "SAE &lt;run&gt;" in page
    assert "0.8125" in page and "20,000" in page and "n/a" in page  # NaN recovered shown as n/a


@pytest.mark.parametrize("field", ["latents", "neurons"])
def test_one_kind_of_unit_is_enough(field: str) -> None:
    card = UnitCard(kind=field[:-1], index=0, density=0.0, contexts=[], histogram=(np.zeros(0), np.zeros(0)),
                    promoted=[])
    page = render(ReportData(title="t", metrics={}, **{field: [card]}))
    assert "never fired" in page


def _card(kind: str, index: int, label: str, entropy: float) -> UnitCard:
    ctx = Context(tokens=["the", " dog"], active=1, value=1.0, doc=0, pos=1, token_id=7)
    return UnitCard(kind=kind, index=index, density=0.01, contexts=[ctx], histogram=None, promoted=[],
                    coherence=0.25, entropy=entropy, lift=0.125, label=label)


def test_the_report_opens_with_the_picture_and_shows_labels() -> None:
    one_token = token_entropy([7, 7, 7, 7])  # a unit always firing on one token: entropy zero
    data = ReportData(title="t", metrics=METRICS, picture_neurons=[_card("neuron", 5, "on “the” 2/8", 2.0)],
                      picture_latents=[_card("latent", 9, "on “dog” 8/8; around park 3/8", one_token)])
    page = render(data)
    assert page.index("Neurons and latents at a glance") < page.index("Headline metrics")
    assert "neuron 5" in page and "latent 9" in page and "on “dog” 8/8; around park 3/8" in page
    assert "token entropy 0<" in page and "-0" not in page  # once printed "token entropy -0"
    assert "token-matched lift 0.125" in page and len(_images(page)) == 0  # picture cards: no histogram
    assert "at a glance" not in render(ReportData(title="t", metrics=METRICS,  # needs both kinds of unit
                                                  picture_latents=data.picture_latents))


def _scores(kind: str, coherence: list[float], matched: list[float], qualified: int) -> MonosemanticityScores:
    return MonosemanticityScores(kind=kind, units=list(range(3)), entropy=np.zeros(3),
                                 coherence=np.array(coherence), matched=np.array(matched), baseline=0.3,
                                 n_qualified=qualified, n_contexts=8)


def test_score_table_counts_qualified_units_per_kind() -> None:
    scores = [_scores("latent", [0.5, 0.25, -0.5], [0, 0, 0], 1234),
              _scores("neuron", [0, -0.25, 0.125], [0, 0, 1], 77)]
    page = render(ReportData(title="t", metrics={}, scores=scores))
    rows = dict(re.findall(r"<tr><th>(\w+)</th>(.*?)<td class='what'>", page))
    cells = {name: re.findall(r"<td class='num'>([^<]*)</td>", row) for name, row in rows.items()}
    # lifts: latents 0.5, 0.25, -0.5; neurons 0, -0.25, -0.875. Above random: coherence > 0
    assert cells["qualified"] == ["1,234", "77"] and cells["scored"] == ["3", "3"]
    assert cells["coherence_median"] == ["0.25", "0"]
    assert cells["token_matched_lift_median"] == ["0.25", "-0.25"]
    assert cells["above_random_fraction"] == ["0.6667", "0.3333"] and cells["entropy_median"] == ["0", "0"]
    assert "8 contexts per unit" in page and len(_images(page)) == 3  # coherence, lift, entropy
