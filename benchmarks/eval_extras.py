"""What the monosemanticity intervals and the absorption measurement add to evaluate.py, against the
training time of the run they evaluate.

    python -m benchmarks.eval_extras <run dir> [--repeats 3] [--out benchmarks/results/eval_extras_cpu.txt]

Each part is timed with the package's own functions at evaluate.py's defaults (``EvalConfig()``), on the
run's held-out rows as evaluate.py reads them:

- ``intervals``: ``monosemanticity.score_metrics`` for ``monosemanticity_units`` units of each kind,
  ``top_contexts`` contexts each, with every resampled array filled (the bootstrap's cost depends on these
  sizes only, not on the embeddings, so random cosines stand in for them);
- ``absorption rows``: the held-out pass's extra work, ``LetterRows.update`` on every held-out batch;
- ``absorption``: ``absorption.absorption_metrics`` on those rows with the run's SAE.

Medians of ``--repeats`` runs with their min-max; the training time is the run's ``summary.json``
``train_seconds`` (one run: give a run trained on this machine under the same conditions).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import header, invocation
from sae_lightning.cache.datamodule import datamodule_from_config
from sae_lightning.config import EvalConfig
from sae_lightning.evaluate.absorption import AbsorptionSettings, LetterRows, absorption_metrics
from sae_lightning.evaluate.monosemanticity import MonosemanticityScores, Uncertainty, score_metrics
from sae_lightning.evaluate.run import load_trained
from sae_lightning.lm.loading import load_tokenizer
from sae_lightning.train.rundir import RunDir


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, float, object]:
    """Median, min and max seconds of ``repeats`` calls, and the last call's result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def stand_in_scores(kind: str, m: int, n: int, seed: int) -> MonosemanticityScores:
    """Scores of ``m`` units with ``n`` contexts each, every array the bootstrap resamples filled."""
    rng = np.random.default_rng(seed)
    sims = rng.uniform(-0.2, 0.6, size=(m, n, n))
    sims = (sims + sims.transpose(0, 2, 1)) / 2
    sims[:, np.arange(n), np.arange(n)] = 1.0
    coherence = rng.normal(0.05, 0.05, m)
    return MonosemanticityScores(kind=kind, units=list(range(m)), entropy=rng.uniform(0, 3, m),
                                 coherence=coherence, matched=coherence - rng.normal(0.03, 0.05, m),
                                 baseline=0.2, n_qualified=10 * m, n_contexts=n,
                                 tokens=rng.integers(0, 50, size=(m, n)), similarities=sims,
                                 matched_similarities=sims.copy(),
                                 baseline_groups=rng.uniform(0.15, 0.25, 16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder (its sae/ and summary.json)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results file (default: print only)")
    args = parser.parse_args()

    cfg = EvalConfig(ckpt_path=str(args.run))
    sae, train_cfg = load_trained(args.run)
    train_seconds = RunDir.of(args.run).read_summary().train_seconds
    m, n = cfg.monosemanticity_units, cfg.top_contexts
    scores = {kind: stand_in_scores(kind, m, n, seed) for seed, kind in enumerate(("latent", "neuron"))}
    uncertainty = Uncertainty(cfg.monosemanticity_ci_level, cfg.monosemanticity_resamples, cfg.seed,
                              cfg.monosemanticity_ci_width)
    intervals = timed(lambda: score_metrics(scores, uncertainty), args.repeats)

    dm = datamodule_from_config(train_cfg)
    batches = list(dm.eval_rows(cfg.max_tokens, cfg.batch_size))
    tokenizer = load_tokenizer(train_cfg.model)

    def collect() -> LetterRows:
        rows = LetterRows(tokenizer, cfg.absorption_per_token, cfg.absorption_rows)
        for batch in batches:
            rows.update(batch.acts, batch.tokens)
        return rows

    collected = timed(collect, args.repeats)
    rows = collected[3]
    settings = AbsorptionSettings(min_probe_f1=cfg.absorption_min_probe_f1, seed=cfg.seed)
    absorbed = timed(lambda: absorption_metrics(rows, sae, settings, uncertainty), args.repeats)
    metrics = absorbed[3]

    n_rows = sum(b.acts.shape[0] for b in batches)
    lines = [f"run: {args.run} ({train_cfg.sae.architecture}, d_in {sae.d_in}, d_sae {sae.d_sae}); "
             f"training {train_seconds:.1f} s (summary.json train_seconds)",
             f"held-out rows: {n_rows}; absorption rows kept: {rows.n_rows} of "
             f"{metrics['absorption_distinct_tokens']} distinct alphabetic tokens", ""]
    total = 0.0
    for name, (median, low, high, _), what in (
            ("intervals", intervals, f"score_metrics, {m} units x {n} contexts per kind, "
                                     f"{cfg.monosemanticity_resamples} resamples"),
            ("absorption rows", collected, "LetterRows.update over the held-out pass"),
            ("absorption", absorbed, "absorption_metrics: probe, k-sparse probing, scoring")):
        total += median
        lines.append(f"{name:16s} median {median:7.2f} s  (min {low:.2f}, max {high:.2f}, n={args.repeats})"
                     f"  {what}")
    lines += [f"{'added':16s} median {total:7.2f} s = {total / train_seconds:.1%} of the training time", "",
              "absorption metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in metrics.items())]
    text = header(invocation("benchmarks.eval_extras")) + "\n".join(lines) + "\n"
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
