"""Feature absorption (Chanin et al. 2024, "A is for Absorption"), measured as SAEBench's ``absorption``
eval measures it, on the hook's own held-out activations and the model's own tokenizer (no LM forward).

A first-letter feature ("this token starts with s") is *absorbed* when, on some tokens that have it, the
SAE's main first-letter latents stay silent and a token-specific latent whose decoder carries the letter's
direction fires instead. The steps (docs/metrics.md, "Absorption", has the formulas):

1. Rows: held-out activations of alphabetic tokens (``" Sam"``, ``"the"``: letters after at most one
   leading space), at most ``per_token`` occurrences of each distinct token, labelled with the token's
   first letter, lower-cased. The distinct tokens are split at random into train and test (test:
   ``test_fraction``), so every test token is unseen by the probes.
2. A linear probe per letter (one-vs-rest logistic regression on the activations, train tokens).
3. Its main latents by k-sparse probing: an L1-penalised logistic probe on the SAE's latents ranks
   them per letter; for k = 1, 2, ... a logistic regression on the top k is scored by F1 on the test
   tokens, and k grows while F1 gains more than ``f1_jump`` (SAEBench's feature-split rule).
4. On the test tokens of each letter whose probe F1 exceeds ``min_probe_f1`` and where the probe fires
   (its true positives), the full-absorption test and the absorption fraction of SAEBench, from each
   latent's projection on the probe direction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sae_lightning.evaluate.monosemanticity import Uncertainty, percentile_interval

log = logging.getLogger(__name__)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EPS = 1e-8  # a main latent at or below this has not fired
FULL_ABSORPTION_COS = 0.025  # SAEBench: the top projecting latent's cosine with the probe, at least
FRACTION_COS = 0.1  # SAEBench: a potential absorber's cosine with the probe, at least
PROJECTION_SHARE = 0.4  # SAEBench: the absorbers' share of the probe projection, at least
MAX_ABSORBERS = 3  # SAEBench: latents that may share one absorbed feature (absorption fraction)
LETTER_STREAM = 21  # np.random.default_rng([seed, 21]): the bootstrap over letters


@dataclass(frozen=True)
class AbsorptionSettings:
    """The knobs of the measurement (SAEBench's defaults)."""

    min_probe_f1: float = 0.6  # letters whose probe's test F1 is at or below this are not scored
    max_k: int = 10  # largest k of the k-sparse probes
    f1_jump: float = 0.03  # k grows while the k-sparse probe's F1 gains more than this
    l1_decay: float = 0.01  # L1 weight of the probe that ranks the latents
    test_fraction: float = 0.2  # share of the distinct tokens held out from the probes
    seed: int = 0


def first_letter(text: str) -> int:
    """The letter index (0-25) of an alphabetic token's text (at most one leading space, ASCII letters
    only, any case), else -1."""
    word = text[1:] if text.startswith(" ") else text
    if not word or not all(c.isascii() and c.isalpha() for c in word):
        return -1
    return LETTERS.index(word[0].lower())


class LetterRows:
    """Collects, from a stream of held-out batches, the rows of alphabetic tokens (at most ``per_token``
    of each distinct token, the first ones seen) with their first letter; ``tokenizer.decode`` names
    each token once."""

    def __init__(self, tokenizer: Any, per_token: int, max_rows: int) -> None:
        self.tokenizer, self.per_token, self.max_rows = tokenizer, per_token, max_rows
        self._letter: dict[int, int] = {}
        self._seen: dict[int, int] = {}
        self._acts: list[Tensor] = []
        self._tokens: list[Tensor] = []
        self.n_rows = 0

    def letter_of(self, token: int) -> int:
        """The first letter of ``token``'s text (-1 if it is not alphabetic)."""
        if token not in self._letter:
            self._letter[token] = first_letter(self.tokenizer.decode([token]))
        return self._letter[token]

    def update(self, acts: Tensor, tokens: Tensor) -> None:
        """Keep the rows of ``acts [N, d]`` whose ``tokens [N]`` are alphabetic and not yet kept enough."""
        keep = []
        for i, token in enumerate(tokens.tolist()):
            if self.n_rows + len(keep) >= self.max_rows:
                break
            if self.letter_of(token) >= 0 and self._seen.get(token, 0) < self.per_token:
                self._seen[token] = self._seen.get(token, 0) + 1
                keep.append(i)
        if keep:
            idx = torch.tensor(keep)
            self._acts.append(acts[idx].detach().float().cpu())
            self._tokens.append(tokens[idx].cpu())
            self.n_rows += len(keep)

    def observe(self, batch: Any) -> None:
        """:meth:`update` with one held-out batch (``pipeline.Rows``: ``acts``, ``tokens``)."""
        self.update(batch.acts, batch.tokens)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """Activations ``[N, d]``, token ids ``[N]`` and first letters ``[N]`` of the kept rows."""
        if not self._acts:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        tokens = torch.cat(self._tokens)
        return torch.cat(self._acts), tokens, torch.tensor([self._letter[int(t)] for t in tokens])


def split_by_token(tokens: Tensor, test_fraction: float, seed: int) -> Tensor:
    """True for the rows whose token is among a random ``test_fraction`` of the distinct tokens."""
    distinct = tokens.unique()
    order = torch.randperm(distinct.numel(), generator=torch.Generator().manual_seed(seed))
    test_tokens = distinct[order[: round(test_fraction * distinct.numel())]]
    return torch.isin(tokens, test_tokens)


def f1_score(predicted: Tensor, truth: Tensor) -> float:
    """F1 of boolean ``predicted`` against boolean ``truth`` (0 when neither has a positive)."""
    tp = int((predicted & truth).sum())
    denominator = int(predicted.sum()) + int(truth.sum())
    return 2 * tp / denominator if denominator else 0.0


def train_letter_probe(x: Tensor, labels: Tensor, n_classes: int = len(LETTERS),
                       weight_decay: float = 1e-4, max_iter: int = 100) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic probes ``(W [n_classes, d], b [n_classes])`` on raw activations ``x``
    (binary cross-entropy with SAEBench's positive weight ``negatives / positives``, L2
    ``weight_decay / 2 |W|^2``), fitted by L-BFGS on centred rows scaled to unit mean norm (a change of
    variables: the returned ``W``, ``b`` act on raw ``x``)."""
    mean = x.mean(0)
    scale = 1 / x.sub(mean).norm(dim=1).mean().clamp(min=1e-12)
    u = (x - mean) * scale
    y = nn.functional.one_hot(labels, n_classes).float()
    positives = y.sum(0)
    pos_weight = (y.shape[0] - positives) / positives.clamp(min=1)
    W = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = nn.functional.binary_cross_entropy_with_logits(u @ W.T + b, y, pos_weight=pos_weight)
        value = value + weight_decay / 2 * W.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    W_raw = W.detach() * scale
    return W_raw, b.detach() - W_raw @ mean


def l1_latent_ranking(z: Tensor, labels: Tensor, n_classes: int, l1_decay: float, epochs: int = 50,
                      batch_size: int = 4096, seed: int = 0) -> Tensor:
    """Per class, the weights ``[n_classes, d_sae]`` of an L1-penalised one-vs-rest logistic probe on the
    latents ``z [N, d_sae]``: SAEBench's ranking of latents for k-sparse probing (binary cross-entropy
    with the positive weight plus ``l1_decay`` times the mean over classes of ``sum |w|``, L2 1e-6, Adam
    from 0.01 decaying to 1e-5 over ``epochs`` of shuffled batches)."""
    y = nn.functional.one_hot(labels, n_classes).float()
    positives = y.sum(0)
    pos_weight = (y.shape[0] - positives) / positives.clamp(min=1)
    W = torch.zeros(n_classes, z.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.Adam([W, b], lr=0.01, weight_decay=1e-6)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=(1e-5 / 0.01) ** (1 / epochs))
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(z.shape[0], generator=generator).split(batch_size):
                optimizer.zero_grad()
                logits = z[batch] @ W.T + b
                loss = nn.functional.binary_cross_entropy_with_logits(logits, y[batch], pos_weight=pos_weight)
                (loss + l1_decay * W.abs().sum(1).mean()).backward()
                optimizer.step()
            schedule.step()
    return W.detach()


def fit_logistic(features: Tensor, truth: Tensor, max_iterations: int = 50) -> Tensor:
    """Balanced, L2-penalised logistic regressions (scikit-learn's ``LogisticRegression(class_weight=
    "balanced")``: ``|w|^2 / 2 + sum_i c_i logloss_i``, intercept not penalised) by Newton's method,
    batched: ``features [P, N, k]``, boolean ``truth [P, N]`` -> ``[P, k + 1]`` (weights, intercept)."""
    P, N, k = features.shape
    A = torch.cat([features.double(), torch.ones(P, N, 1, dtype=torch.float64)], -1)
    y = truth.double()
    n_pos = y.sum(1, keepdim=True).clamp(min=1)
    c = torch.where(truth, N / (2 * n_pos), N / (2 * (N - n_pos).clamp(min=1)))
    penalty = torch.diag(torch.tensor([1.0] * k + [0.0], dtype=torch.float64)) + 1e-9 * torch.eye(k + 1)
    w = torch.zeros(P, k + 1, dtype=torch.float64)
    for _ in range(max_iterations):
        p = torch.sigmoid((A @ w.unsqueeze(-1)).squeeze(-1))
        grad = (A.transpose(1, 2) @ (c * (p - y)).unsqueeze(-1)).squeeze(-1) + w @ penalty
        hess = A.transpose(1, 2) @ (A * (c * p * (1 - p)).unsqueeze(-1)) + penalty
        step = torch.linalg.solve(hess, grad)
        w = w - step
        if step.abs().max() < 1e-10:
            break
    return w.float()


def main_latents(z_train: Tensor, y_train: Tensor, z_test: Tensor, y_test: Tensor, letters: Iterable[int],
                 settings: AbsorptionSettings) -> dict[int, list[int]]:
    """Each letter's main latents: the top-k latents of the L1 ranking for the largest k reached while
    the k-sparse probe's test F1 gains more than ``settings.f1_jump`` over the best so far."""
    letters = list(letters)
    ranking = l1_latent_ranking(z_train, y_train, len(LETTERS), settings.l1_decay, seed=settings.seed)
    top = ranking[letters].topk(min(settings.max_k, z_train.shape[1]), dim=1).indices  # [L, max_k]
    truth_train = torch.stack([y_train == letter for letter in letters])
    truth_test = torch.stack([y_test == letter for letter in letters])
    f1 = torch.zeros(len(letters), top.shape[1])
    for k in range(1, top.shape[1] + 1):
        feats = top[:, :k]
        w = fit_logistic(z_train[:, feats].permute(1, 0, 2), truth_train)
        scores = torch.einsum("pnk,pk->pn", z_test[:, feats].permute(1, 0, 2), w[:, :k]) + w[:, k:]
        f1[:, k - 1] = torch.tensor([f1_score(s > 0, t) for s, t in zip(scores, truth_test, strict=True)])
    out = {}
    for i, letter in enumerate(letters):
        best, chosen = -math.inf, 1
        for k in range(1, top.shape[1] + 1):
            if float(f1[i, k - 1]) <= best + settings.f1_jump:
                break
            best, chosen = float(f1[i, k - 1]), k
        out[letter] = top[i, :chosen].tolist()
    return out


def absorption_per_row(x: Tensor, z: Tensor, decoder: Tensor, b_dec: Tensor, direction: Tensor,
                       main: list[int]) -> tuple[Tensor, Tensor]:
    """SAEBench's absorption fraction and full-absorption flag for rows ``x [n, d]`` with latents
    ``z [n, d_sae]``, given the latents' raw-space decoder rows ``decoder [d_sae, d]`` and bias
    ``b_dec [d]``, the probe's ``direction [d]`` and the letter's ``main`` latents. A latent's projection
    is its contribution ``z_i decoder_i`` along the unit probe direction; the row's is ``(x - b_dec)``'s
    (the part the latents reconstruct)."""
    p = direction / direction.norm()
    along = decoder @ p  # [d_sae] a unit activation's projection
    cos = along / decoder.norm(dim=1).clamp(min=1e-12)
    proj = z * along  # [n, d_sae]
    total = (x - b_dec) @ p  # [n]
    is_main = torch.zeros(z.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_proj = proj[:, is_main].sum(1)
    candidates = proj.masked_fill(is_main | (cos < FRACTION_COS), 0.0).clamp(min=0)
    absorbers = candidates.topk(min(MAX_ABSORBERS, z.shape[1]), dim=1).values.sum(1)
    share = absorbers / total
    absorbed = torch.minimum(absorbers, total - main_proj)
    partial = (absorbed / (absorbed + main_proj)).clamp(0, 1)
    none = (main_proj >= total) | (total <= 0) | (share < PROJECTION_SHARE)
    fraction = torch.where(none, 0.0, torch.where(main_proj <= 0, 1.0, partial))
    top_proj, top = proj.max(dim=1)
    full = ((z[:, is_main] < EPS).all(1) & (cos[top] >= FULL_ABSORPTION_COS) & (total > 0)
            & (top_proj / total >= PROJECTION_SHARE))
    return fraction, full


@dataclass
class LetterResult:
    """One letter's numbers."""

    letter: str
    probe_f1: float  # the linear probe's F1 on the test tokens
    main_latents: list[int] = field(default_factory=list)
    true_positives: int = 0  # test rows of this letter where the probe fires
    full_absorption_rate: float = math.nan  # full absorptions / true positives
    absorption_fraction: float = math.nan  # mean absorption fraction over the true positives
    scored: bool = False  # probe F1 above the threshold and at least one true positive


@dataclass
class AbsorptionResult:
    """Per-letter results and the ``absorption_*`` metrics.json keys."""

    letters: list[LetterResult]
    n_rows: int
    n_tokens: int  # distinct tokens

    def metrics(self, uncertainty: Uncertainty | None = None) -> dict[str, float]:
        """Means over the scored letters (intervals: percentile bootstrap over the letters)."""
        scored = [r for r in self.letters if r.scored]
        tested = [r.probe_f1 for r in self.letters if not math.isnan(r.probe_f1)]
        out = {
            "absorption_rate": _mean([r.full_absorption_rate for r in scored]),
            "absorption_fraction": _mean([r.absorption_fraction for r in scored]),
            "absorption_split_features": _mean([len(r.main_latents) for r in scored]),
            "absorption_letters": len(scored),
            "absorption_probe_f1": _mean(tested),
            "absorption_true_positives": sum(r.true_positives for r in scored),
            "absorption_rows": self.n_rows,
            "absorption_distinct_tokens": self.n_tokens,
        }
        u = uncertainty or Uncertainty()
        rng = np.random.default_rng([u.seed, LETTER_STREAM])
        idx = rng.integers(0, max(len(scored), 1), size=(u.resamples, len(scored)))
        per_letter = {"absorption_rate": [r.full_absorption_rate for r in scored],
                      "absorption_fraction": [r.absorption_fraction for r in scored]}
        for key, values in per_letter.items():
            replicates = np.array(values)[idx].mean(1) if scored else np.full(u.resamples, math.nan)
            out[f"{key}_ci_low"], out[f"{key}_ci_high"] = percentile_interval(replicates, u.level)
        return out


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def measure_absorption(x: Tensor, tokens: Tensor, letters: Tensor, test: Tensor, sae: nn.Module,
                       settings: AbsorptionSettings) -> AbsorptionResult:
    """Absorption of first-letter features by ``sae`` on raw rows ``x [N, d]`` with their ``tokens`` and
    first ``letters`` (0-25), the rows marked ``test`` held out from the probes (whole tokens)."""
    train = ~test
    if not train.any() or not test.any():
        return AbsorptionResult([LetterResult(c, math.nan) for c in LETTERS], int(x.shape[0]),
                                int(tokens.unique().numel()))
    W, b = train_letter_probe(x[train], letters[train])
    with torch.no_grad():
        z = torch.cat([sae.encode(chunk) for chunk in x.split(4096)]).float()
        decoder = sae.weights().W_dec.float() / float(sae.output_scale)
        b_dec = sae.b_dec.float() / float(sae.output_scale)
    fires = (x[test] @ W.T + b) > 0  # [n_test, 26]
    present = [c for c in range(len(LETTERS)) if (letters[train] == c).any() and (letters[test] == c).any()]
    results = {c: LetterResult(LETTERS[c], f1_score(fires[:, c], letters[test] == c)) for c in present}
    good = [c for c in present if results[c].probe_f1 > settings.min_probe_f1]
    mains = main_latents(z[train], letters[train], z[test], letters[test], good, settings) if good else {}
    for c in good:
        rows = (letters[test] == c) & fires[:, c]
        r = results[c]
        r.main_latents, r.true_positives = mains[c], int(rows.sum())
        if r.true_positives:
            fraction, full = absorption_per_row(x[test][rows], z[test][rows], decoder, b_dec, W[c], mains[c])
            r.full_absorption_rate = int(full.sum()) / r.true_positives
            r.absorption_fraction = float(fraction.double().mean())
            r.scored = True
    letters_out = [results.get(c, LetterResult(LETTERS[c], math.nan)) for c in range(len(LETTERS))]
    return AbsorptionResult(letters=letters_out, n_rows=int(x.shape[0]),
                            n_tokens=int(tokens.unique().numel()))


def absorption_metrics(rows: LetterRows, sae: nn.Module, settings: AbsorptionSettings,
                       uncertainty: Uncertainty | None = None) -> dict[str, float]:
    """The ``absorption_*`` keys from the rows ``rows`` collected (see :func:`measure_absorption`)."""
    x, tokens, letters = rows.result()
    if x.shape[0] == 0:
        log.warning("absorption: no alphabetic tokens among the held-out rows; not measured")
        return AbsorptionResult(letters=[], n_rows=0, n_tokens=0).metrics(uncertainty)
    test = split_by_token(tokens, settings.test_fraction, settings.seed)
    result = measure_absorption(x, tokens, letters, test, sae, settings)
    metrics = result.metrics(uncertainty)
    if not metrics["absorption_letters"]:
        log.warning("absorption: no letter's first-letter probe reaches F1 %.2f on unseen tokens (mean F1 "
                    "%.2f over %d distinct tokens): the activations do not carry first letters linearly "
                    "enough here, so absorption is not measured", settings.min_probe_f1,
                    metrics["absorption_probe_f1"], result.n_tokens)
    return metrics
