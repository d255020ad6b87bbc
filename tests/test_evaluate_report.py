"""evaluate/report.py: a self-contained HTML file, and the whole gather-then-write path on a tiny GPT-2."""

import base64
import re
from pathlib import Path

import numpy as np
import pytest

from sae_lightning.evaluate.contexts import Context
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
