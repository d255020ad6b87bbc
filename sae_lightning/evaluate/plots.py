"""Small matplotlib figures for the report, returned as ``data:image/png;base64,...`` URIs so the HTML
opens offline with no side files. Figures are built with ``matplotlib.figure.Figure`` directly (no
pyplot), so nothing touches the process-wide backend or figure registry."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

COLORS = {"latent": "#1f6fb4", "neuron": "#d2691e"}


def to_data_uri(fig: Figure) -> str:
    """Render ``fig`` as a PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def density_histogram(density: np.ndarray) -> str:
    """Histogram of log10(feature density) over latents; dead latents (density 0) counted in the title."""
    density = np.asarray(density, dtype=np.float64)
    alive = density[density > 0]
    fig = Figure(figsize=(5.5, 2.8))
    ax = fig.subplots()
    if alive.size:
        ax.hist(np.log10(alive), bins=40, color=COLORS["latent"])
    ax.set_xlabel("log10 feature density (fraction of tokens where the latent fires)")
    ax.set_ylabel("latents")
    ax.set_title(f"{density.size - alive.size} of {density.size} latents never fired", fontsize=10)
    return to_data_uri(fig)


def unit_histogram(counts: np.ndarray, edges: np.ndarray, kind: str) -> str:
    """A unit's histogram of positive activations (precomputed ``counts``/``edges``)."""
    fig = Figure(figsize=(3.2, 1.6))
    ax = fig.subplots()
    if counts.size:
        ax.stairs(counts, edges, fill=True, color=COLORS.get(kind, "gray"))
    else:
        ax.text(0.5, 0.5, "never fired", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("activation", fontsize=8)
    ax.tick_params(labelsize=7)
    return to_data_uri(fig)


def score_distributions(scores: Mapping[str, np.ndarray], xlabel: str) -> str:
    """Overlaid histograms of one monosemanticity score per kind of unit, medians as dashed lines."""
    fig = Figure(figsize=(5, 2.8))
    ax = fig.subplots()
    for kind, values in scores.items():
        finite = values[np.isfinite(values)]
        if not finite.size:
            continue
        color = COLORS.get(kind, "gray")
        ax.hist(finite, bins=20, alpha=0.55, color=color, label=f"{kind}s (median {np.median(finite):.3g})")
        ax.axvline(float(np.median(finite)), color=color, linestyle="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("units")
    if ax.patches:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no unit could be scored", ha="center", va="center", transform=ax.transAxes)
    return to_data_uri(fig)


def training_curves(history: Mapping[str, Sequence[float]]) -> str:
    """L0 and MSE against the training step (``history`` holds ``step``, ``l0``, ``mse``)."""
    fig = Figure(figsize=(5.5, 2.8))
    ax = fig.subplots()
    ax.plot(history["step"], history["mse"], color=COLORS["latent"])
    ax.set_xlabel("step")
    ax.set_ylabel("MSE", color=COLORS["latent"])
    twin = ax.twinx()
    twin.plot(history["step"], history["l0"], color=COLORS["neuron"])
    twin.set_ylabel("L0", color=COLORS["neuron"])
    return to_data_uri(fig)
