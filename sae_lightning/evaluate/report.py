"""A self-contained HTML report (inline CSS, plots as base64 PNGs: opens offline, one file).

``evaluate.py`` gathers plain data into :class:`ReportData` (unit cards via :func:`unit_cards`) and calls
:func:`write_report`. Every string from the data (token text, names) is HTML-escaped. The page opens with
the picture: a few raw neurons next to a few SAE latents, picked by the monosemanticity score
(:func:`monosemanticity.pick_by_score`), each with its automatic label and top contexts.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from sae_lightning.evaluate import plots
from sae_lightning.evaluate.contexts import (
    Context,
    ContextRow,
    TokenDecoder,
    UnitSummary,
    activation_histogram,
    top_contexts,
    top_promoted,
)
from sae_lightning.evaluate.corpus import Corpus
from sae_lightning.evaluate.labels import label_unit
from sae_lightning.evaluate.monosemanticity import EXPLANATION, MonosemanticityScores

# headline metrics in display order, with what they mean (keys of metrics.json)
HEADLINE = {
    "explained_variance": "1 - SSE / total variance of the eval set",
    "nmse": "SSE / sum ||x - mean x||²",
    "mse": "mean squared error per element",
    "cosine_sim": "mean cos(x, x̂) over tokens",
    "l0": "mean active latents per token",
    "dead_fraction": "latents that never fired",
    "dense_fraction": "latents firing on > 10% of tokens",
    "ce_loss_recovered": "(L_zero - L_sae) / (L_zero - L_clean)",
    "kl_div": "KL(clean || SAE-spliced) next-token, nats",
    "ce_loss_clean": "LM loss, clean",
    "ce_loss_sae": "LM loss, SAE reconstruction spliced in",
    "ce_loss_zero": "LM loss, hook zero-ablated",
    "ce_loss_mean_ablation": "LM loss, hook mean-ablated",
    "n_tokens": "evaluation tokens",
}


@dataclass
class UnitCard:
    """What the report shows for one latent or neuron (the picture's cards have no histogram)."""

    kind: str  # "latent" | "neuron"
    index: int
    density: float
    contexts: list[Context]
    histogram: tuple[np.ndarray, np.ndarray] | None  # counts, bin edges of its positive activations
    promoted: list[tuple[str, float]]  # top tokens by direct logit effect
    coherence: float | None = None
    entropy: float | None = None
    lift: float | None = None  # token-matched lift
    label: str = ""  # automatic description (labels.label_unit)


@dataclass
class ReportData:
    """Everything the report shows; all fields are plain values."""

    title: str
    metrics: Mapping[str, float]
    latents: Sequence[UnitCard] = ()
    neurons: Sequence[UnitCard] = ()
    scores: Sequence[MonosemanticityScores] = ()  # one per kind of unit
    feature_density: np.ndarray | None = None  # per latent
    history: Mapping[str, Sequence[float]] | None = None  # training curve: step, l0, mse
    details: Mapping[str, Any] = field(default_factory=dict)  # run facts (checkpoint, hook, config...)
    picture_neurons: Sequence[UnitCard] = ()  # the opening picture: least monosemantic scored neurons
    picture_latents: Sequence[UnitCard] = ()  # ... next to the most monosemantic scored latents


def unit_cards(kind: str, units: Sequence[int], summary: UnitSummary, context_row: ContextRow,
               decode: TokenDecoder, logit_effects: Tensor | None = None,
               scores: MonosemanticityScores | None = None, corpus: Corpus | None = None, *,
               histograms: bool = True, n_promoted: int = 8, before: int = 12,
               after: int = 4) -> list[UnitCard]:
    """Cards for ``units`` from a :class:`UnitSummary`; ``logit_effects [len(units), vocab]`` rows follow
    ``units``; histograms need the units to have been ``track``-ed by the collector; labels need the
    ``corpus``."""
    density = summary.density()
    by_unit = _scores_by_unit(scores)
    cards = []
    for i, unit in enumerate(units):
        contexts = top_contexts(summary.top, unit, context_row, decode, before, after)
        coherence, entropy, lift = by_unit.get(unit, (None, None, None))
        cards.append(UnitCard(
            kind=kind, index=unit, density=float(density[unit]), contexts=contexts,
            histogram=activation_histogram(summary.tracked.get(unit, np.zeros(0))) if histograms else None,
            promoted=top_promoted(logit_effects[i], n_promoted, decode) if logit_effects is not None else [],
            coherence=coherence, entropy=entropy, lift=lift,
            label=str(label_unit(contexts, corpus)) if corpus is not None and contexts else "",
        ))
    return cards


def _scores_by_unit(scores: MonosemanticityScores | None) -> dict[int, tuple[float | None, ...]]:
    """unit -> (coherence, entropy, token-matched lift), None for what was not computed."""
    if scores is None:
        return {}
    absent = [None] * len(scores.units)
    coherence = absent if scores.coherence is None else scores.coherence.tolist()
    lift = scores.lift()
    return {u: (c, float(e), m) for u, c, e, m in zip(scores.units, coherence, scores.entropy,
                                                      absent if lift is None else lift.tolist(), strict=True)}


def write_report(path: str | Path, data: ReportData) -> Path:
    """Write the HTML report to ``path`` (parents created) and return it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data), encoding="utf-8")
    return out


def render(data: ReportData) -> str:
    """The report as one HTML string."""
    sections = [
        f"<h1>{_e(data.title)}</h1>",
        _picture_section(data),
        _details(data.details),
        "<h2>Headline metrics</h2>",
        _metrics_table(data.metrics),
        _density_and_history(data),
        _units_section(data),
        _scores_section(data.scores, data.metrics),
    ]
    return _page(data.title, sections)


def _page(title: str, sections: Sequence[str]) -> str:
    """A whole HTML page: ``title`` and the non-empty ``sections``, with the report's CSS inline."""
    body = "\n".join(s for s in sections if s)
    return f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{_e(title)}</title>" \
           f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n"


def write_table_report(path: str | Path, title: str, details: Mapping[str, Any], columns: Sequence[str],
                       rows: Sequence[Sequence[Any]], note: str = "",
                       links: Mapping[str, str] | None = None) -> Path:
    """A one-table page (a group's replacement-model evaluation): ``details``, then the table (``""`` cells
    stay empty), ``note`` under it and ``links`` (text -> relative href, e.g. each member's report)."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td class='num'>{_fmt(v)}</td>" if isinstance(v, float)
                                    else f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    items = "".join(f"<li><a href='{_e(href)}'>{_e(text)}</a></li>" for text, href in (links or {}).items())
    sections = [f"<h1>{_e(title)}</h1>", _details(details),
                f"<table class='metrics'><tr>{head}</tr>{body}</table>",
                f"<p class='note'>{_e(note)}</p>" if note else "", f"<ul>{items}</ul>" if items else ""]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_page(title, sections), encoding="utf-8")
    return out


def _e(value: object) -> str:
    return html.escape(str(value))


def _fmt(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return _e(value)


def _details(details: Mapping[str, Any]) -> str:
    if not details:
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in details.items())
    return f"<table class='details'>{rows}</table>"


INTERVAL_SUFFIXES = ("_ci_low", "_ci_high", "_context_se", "_units_needed")  # shown in the score section


def _metrics_table(metrics: Mapping[str, float]) -> str:
    keys = [k for k in HEADLINE if k in metrics] + sorted(
        k for k in metrics if k not in HEADLINE and not k.endswith(INTERVAL_SUFFIXES))
    rows = "".join(f"<tr><th>{_e(k)}</th><td class='num'>{_fmt(metrics[k])}</td>"
                   f"<td class='what'>{_e(HEADLINE.get(k, ''))}</td></tr>" for k in keys)
    return f"<table class='metrics'>{rows}</table>"


def _img(uri: str, alt: str) -> str:
    return f"<img src='{uri}' alt='{_e(alt)}'>"


def _density_and_history(data: ReportData) -> str:
    figs = []
    if data.feature_density is not None:
        figs.append(_img(plots.density_histogram(np.asarray(data.feature_density)), "feature density"))
    if data.history:
        figs.append(_img(plots.training_curves(data.history), "L0 and MSE during training"))
    return f"<h2>Sparsity</h2><div class='row'>{''.join(figs)}</div>" if figs else ""


def _units_section(data: ReportData) -> str:
    if not data.latents and not data.neurons:
        return ""
    columns = "".join(
        f"<div class='col'><h3>{_e(title)}</h3>{''.join(_card(c) for c in cards)}</div>"
        for title, cards in (("SAE latents", data.latents), ("Raw MLP neurons", data.neurons)) if cards)
    return ("<h2>Units side by side</h2><p class='note'>Top-activating contexts (activating token "
            "highlighted, activation in brackets), histogram of positive activations, tokens most promoted "
            f"by the unit's direct logit effect, and density.</p><div class='row'>{columns}</div>")


def _card(card: UnitCard) -> str:
    named = (("coherence", card.coherence), ("token-matched lift", card.lift),
             ("token entropy", card.entropy))
    scores = "".join(f" · {name} {_fmt(v)}" for name, v in named if v is not None)
    label = f"<p class='label'>{_e(card.label)}</p>" if card.label else ""
    contexts = "".join(_context(c) for c in card.contexts) or "<li class='note'>never fired</li>"
    head = (f"<div class='card {card.kind}'><h4>{_e(card.kind)} {card.index}</h4>{label}"
            f"<p class='note'>density {_fmt(card.density)}{scores}</p><ol class='ctx'>{contexts}</ol>")
    if card.histogram is None:
        return head + "</div>"
    counts, edges = card.histogram
    promoted = ", ".join(f"<code>{_e(t)}</code> {v:+.3g}" for t, v in card.promoted)
    return (f"{head}{_img(plots.unit_histogram(counts, edges, card.kind), 'activation histogram')}"
            f"<p class='promoted'>promotes: {promoted or 'n/a'}</p></div>")


def _picture_section(data: ReportData) -> str:
    if not data.picture_neurons or not data.picture_latents:
        return ""
    by = ("context coherence" if data.picture_latents[0].coherence is not None
          else "activating-token entropy (context coherence was not computed)")
    columns = "".join(f"<div class='col'><h3>{title}</h3>{''.join(_card(c) for c in cards)}</div>"
                      for title, cards in (("Raw MLP neurons: lowest score", data.picture_neurons),
                                           ("SAE latents: highest score", data.picture_latents)))
    return ("<h2>Neurons and latents at a glance</h2>"
            f"<p class='note'>Picked automatically by {by}, among the units scored below: the scored neurons "
            "that score lowest (top contexts mixing unrelated themes) and the scored latents that score "
            "highest (keeping to one). The medians in the monosemanticity section say how typical they are. "
            "Each card's first line is its automatic label: the tokens it fires on and the words around "
            "them that are far more common in its contexts than in the text.</p>"
            f"<div class='row'>{columns}</div>")


def _context(c: Context) -> str:
    shown = [t.replace("\n", "↵") for t in c.tokens]  # keep each context on one line
    parts = [f"<mark>{_e(t)}</mark>" if i == c.active else _e(t) for i, t in enumerate(shown)]
    return f"<li><span class='tok'>{''.join(parts)}</span> <span class='val'>[{c.value:.3g}]</span></li>"


SCORE_ROWS = {  # metrics.json suffix -> what the row says (keys: <kind>_<suffix>; docs/metrics.md)
    "qualified": "units with the full number of contexts (the scored ones are drawn from them)",
    "scored": "units scored (equal-size random samples)",
    "coherence_median": "median context coherence above the random baseline",
    "above_random_fraction": "share of scored units with coherence > 0",
    "token_matched_lift_median": "median coherence above the token-matched control",
    "entropy_median": "median activating-token entropy (bits)",
}


def _scores_section(scores: Sequence[MonosemanticityScores], metrics: Mapping[str, float]) -> str:
    if not scores:
        return ""
    distributions = {
        "context coherence above random baseline (higher = more monosemantic)":
            {s.kind: s.coherence for s in scores if s.coherence is not None},
        "token-matched lift (> 0: a topic beyond the token)": {s.kind: s.lift() for s in scores},
        "activating-token entropy (bits, lower = more specific)": {s.kind: s.entropy for s in scores},
    }
    figs = []
    for label, by_kind in distributions.items():
        computed = {kind: values for kind, values in by_kind.items() if values is not None}
        if computed:
            figs.append(_img(plots.score_distributions(computed, label), label))
    baseline = next((s.baseline for s in scores if s.baseline is not None), None)
    note = (f"<p class='note'>{scores[0].n_contexts} contexts per unit"
            + (f"; random-context similarity (the baseline) {_fmt(baseline)}" if baseline is not None else "")
            + ".</p>")
    explanation = "".join(f"<p>{_e(p)}</p>" for p in EXPLANATION)
    numbers = {k: v for s in scores for k, v in s.metrics().items()} | dict(metrics)
    return (f"<h2>Monosemanticity: neurons vs latents</h2><div class='row'>{''.join(figs)}</div>"
            f"{_scores_table([s.kind for s in scores], numbers)}{note}{_interval_note(scores, numbers)}"
            f"<div class='explain'>{explanation}</div>")


DIFFERENCE = "latent_minus_neuron"  # metrics.json prefix of the latent-minus-neuron differences


def _scores_table(kinds: Sequence[str], numbers: Mapping[str, float]) -> str:
    """One row per score (:data:`SCORE_ROWS`), one column per kind of unit and one for the latent-minus-
    neuron difference when there is one; each value with its interval when it has one."""
    prefixes = [*kinds, *([DIFFERENCE] if any(k.startswith(DIFFERENCE) for k in numbers) else [])]
    head = "".join(f"<th>{'latent − neuron' if p == DIFFERENCE else _e(p) + 's'}</th>" for p in prefixes)
    rows = []
    for suffix, what in SCORE_ROWS.items():
        keys = [f"{p}_{suffix}" for p in prefixes]
        if any(k in numbers for k in keys):
            cells = "".join(f"<td class='num'>{_with_interval(numbers, k)}</td>" for k in keys)
            rows.append(f"<tr><th>{_e(suffix)}</th>{cells}<td class='what'>{_e(what)}</td></tr>")
    return f"<table class='metrics'><tr><th></th>{head}<th></th></tr>{''.join(rows)}</table>"


def _with_interval(numbers: Mapping[str, float], key: str) -> str:
    """``value [low, high]``, or the value alone without an interval ('' when absent)."""
    if key not in numbers:
        return ""
    low, high = numbers.get(f"{key}_ci_low"), numbers.get(f"{key}_ci_high")
    interval = f" [{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else ""
    return f"{_fmt(numbers[key])}{interval}"


def _interval_note(scores: Sequence[MonosemanticityScores], numbers: Mapping[str, float]) -> str:
    """How the intervals were computed and how many units a narrower one needs (width ~ 1/sqrt(units))."""
    if "monosemanticity_ci_level" not in numbers:
        return ""
    n, qualified = len(scores[0].units), min(s.n_qualified for s in scores)
    target = numbers["monosemanticity_ci_width"]
    lines = [f"Intervals: {numbers['monosemanticity_ci_level']:.0%} percentile bootstrap over the scored "
             f"units ({int(numbers['monosemanticity_resamples']):,} resamples, the random baseline resampled "
             "by group). A unit's score carries the noise of its own contexts, so resampling the units "
             "covers both; 'contexts alone' is the standard error of resampling each unit's contexts with "
             "the units fixed."]
    planned = [k for k in numbers if k.endswith("_units_needed")]
    first = [k for k in planned if k.startswith(DIFFERENCE)] or planned
    for key in (k.removesuffix("_units_needed") for k in first):
        width = numbers[f"{key}_ci_high"] - numbers[f"{key}_ci_low"]
        if not math.isfinite(width):
            continue
        needed = int(numbers[f"{key}_units_needed"])
        line = (f"With {n:,} units of each kind the interval of {key} is {width:.3g} wide (contexts alone: "
                f"SE {_fmt(numbers.get(f'{key}_context_se', math.nan))}). Widths shrink as 1/√units: a width "
                f"of {target:g} needs about {needed:,} units of each kind (monosemanticity_units={needed})")
        if needed > qualified:
            line += (f", more than the {qualified:,} that qualify: evaluate on more held-out tokens "
                     "(max_tokens)")
        lines.append(line + ".")
    return "".join(f"<p class='note'>{_e(line)}</p>" for line in lines)


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; margin-top: 1.6em; } h4 { margin: 0 0 .3em; }
table { border-collapse: collapse; margin: .5em 0; } th, td { padding: .2em .8em; text-align: left; }
table.metrics tr:nth-child(odd), table.details tr:nth-child(odd) { background: #f4f6f8; }
td.num { font-variant-numeric: tabular-nums; text-align: right; } td.what, .note { color: #666; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.col { flex: 1; min-width: 420px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .6em .8em; margin-bottom: 1em; }
.card.latent { border-left: 4px solid #1f6fb4; } .card.neuron { border-left: 4px solid #d2691e; }
ol.ctx { padding-left: 1.4em; margin: .3em 0; font-size: .85em; }
.tok { font-family: ui-monospace, monospace; white-space: pre-wrap; }
mark { background: #ffd54f; font-weight: bold; } .val { color: #888; } .promoted { font-size: .85em; }
.explain { max-width: 900px; font-size: .9em; color: #444; } .label { margin: 0 0 .2em; font-style: italic; }
"""
