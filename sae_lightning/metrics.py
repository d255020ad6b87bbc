"""Every number users compare between SAEs, each defined once (formulas also in ``docs/metrics.md``).

Rows of ``x`` are tokens, ``d`` is the activation width, ``N`` the number of tokens in the evaluation set.
Reconstruction numbers are accumulated by :class:`ReconstructionStats`, whose sufficient statistics are
merged exactly (float64, Chan's pairwise update for the variance), so ``compute()`` gives the full-set
number whatever the batching. :func:`batch_metrics` is the same computation on one batch, for training
logs only: its explained variance uses the variance *within that batch*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DENSE_THRESHOLD = 0.1
FREQ_THRESHOLDS = (0.01, 0.1)  # SAEBench's "firing on more than 1 % / 10 % of tokens"
SMALL_NORM = 1e-4  # SAEBench's guard: an input row this short is divided by 1 in l2_ratio
COSINE_EPS = 1e-8  # F.cosine_similarity's default eps
_NORM_SUMS = ("norm_in", "norm_out", "ratio", "sq_out", "dot")
LATENT_BLOCK_VALUES = 1 << 20  # ReconstructionStats reads latents in row blocks of at most this many values


class ReconstructionStats:
    """Streaming reconstruction / sparsity statistics over an evaluation set.

    Formulas (sums run over all ``N`` tokens of the set, ``x̄`` is the set mean):

    - ``mse = sum ||x - x̂||² / (N d)``                         (per element)
    - ``nmse = sum ||x - x̂||² / sum ||x - x̄||²``
    - ``explained_variance = 1 - sum ||x - x̂||² / (N (E||x||² - ||E x||²)) = 1 - nmse``
      (``N (E||x||² - ||E x||²) = sum ||x - x̄||²``: the TOTAL variance of the set, not a per-batch one)
    - ``cosine_sim = mean_tokens cos(x, x̂)``
    - ``l2_norm_in = mean_tokens ||x||``, ``l2_norm_out = mean_tokens ||x̂||``,
      ``l2_ratio = mean_tokens ||x̂|| / ||x||`` (a token with ``||x|| < 1e-4`` is divided by 1, as SAEBench)
    - ``relative_reconstruction_bias = sum ||x̂||² / sum <x, x̂>`` (1 = no shrinkage, < 1 = shrunk)
    - ``l0 = mean_tokens #{i: z_i != 0} = sum_i fire_count_i / N``; ``l1 = mean_tokens sum_i |z_i|``
      (only when latents, not fire counts, were given)
    - ``density_i = fire_count_i / N``; ``dead_fraction = #{i: fire_count_i = 0} / d_sae``;
      ``dense_fraction = #{i: density_i > dense_threshold} / d_sae``; for each ``p`` in ``freq_thresholds``
      :func:`frequency_fractions` (``freq_over_<100p>_percent``, ``normalized_freq_over_<100p>_percent``)
    """

    def __init__(self, dense_threshold: float = DENSE_THRESHOLD,
                 freq_thresholds: tuple[float, ...] = FREQ_THRESHOLDS) -> None:
        self.dense_threshold = dense_threshold
        self.freq_thresholds = freq_thresholds
        self.n_tokens = 0
        self._sse = 0.0
        self._cos_sum = 0.0
        self._sums = dict.fromkeys(_NORM_SUMS, 0.0)  # shrinkage sums over tokens, see _norm_sums
        self._l1_sum = 0.0
        self.n_l1_tokens = 0  # rows whose latents (not only fire counts) were given
        self._mean: Tensor | None = None  # running mean of x [d], float64
        self._m2 = 0.0  # running sum ||x - mean||², merged with Chan's formula
        self._d = 0
        self.fire_counts: Tensor | None = None  # [d_sae] float64
        self.n_latent_tokens = 0  # rows whose latents were given (the denominator of l0 and density)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, latents_or_fire_counts: Tensor | None = None) -> None:
        """Add a batch. ``latents_or_fire_counts`` is either the latents ``[B, d_sae]`` or, already reduced,
        the number of rows where each latent fired ``[d_sae]`` (``SAEOutput.fire_counts``); omit it to skip
        the sparsity numbers."""
        x, x_hat = _rows(x), _rows(x_hat)
        n_b = x.shape[0]
        if n_b == 0:
            return
        # row norms and dot products once, shared by cosine_sim and the shrinkage sums
        norm_in, norm_out, dot = x.norm(dim=-1), x_hat.norm(dim=-1), torch.linalg.vecdot(x, x_hat)
        self._sse += float((x - x_hat).pow_(2).sum())
        self._cos_sum += float(_cosine(dot, norm_in, norm_out).sum())
        for key, value in _norm_sums(norm_in, norm_out, dot).items():
            self._sums[key] += value
        mean_b = x.mean(0)
        self._merge(n_b, mean_b, float((x - mean_b).pow_(2).sum()))
        z = latents_or_fire_counts
        if z is not None and z.dim() == 1:
            self._add_fire_counts(z, n_b)
        elif z is not None:
            self._add_latents(z.detach().reshape(-1, z.shape[-1]))

    def _add_latents(self, z: Tensor) -> None:
        """Fire counts and the L1 sum of latents ``[n, d_sae]``, in blocks of at most ``LATENT_BLOCK_VALUES``
        values: a float64 copy of a whole [4096, 6144] batch would be 200 MB, mapped and zeroed afresh by
        the OS on every call."""
        rows = max(1, LATENT_BLOCK_VALUES // z.shape[1])
        counts, l1 = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device), 0.0
        for block in z.split(rows):
            counts += torch.count_nonzero(block, dim=0)
            l1 += float(block.double().abs().sum())
        self._add_fire_counts(counts, z.shape[0])
        self._l1_sum += l1
        self.n_l1_tokens += z.shape[0]

    def _merge(self, n_b: int, mean_b: Tensor, m2_b: float) -> None:
        """Chan et al. pairwise merge of (count, mean, M2): exact for any split of the set."""
        n_a = self.n_tokens
        if self._mean is None:
            self._mean, self._m2, self._d = mean_b.double(), m2_b, mean_b.shape[0]
        else:
            delta = mean_b.double().to(self._mean.device) - self._mean
            n = n_a + n_b
            self._m2 += m2_b + float((delta**2).sum()) * n_a * n_b / n
            self._mean = self._mean + delta * (n_b / n)
        self.n_tokens = n_a + n_b

    def merge(self, other: ReconstructionStats) -> None:
        """Add everything ``other`` saw (e.g. another rank's stats): same result as one stream."""
        if other.n_tokens == 0:
            return
        self._sse += other._sse
        self._cos_sum += other._cos_sum
        for key, value in other._sums.items():
            self._sums[key] += value
        self._l1_sum += other._l1_sum
        self.n_l1_tokens += other.n_l1_tokens
        self._merge(other.n_tokens, other._mean, other._m2)
        if other.fire_counts is not None:
            self._add_fire_counts(other.fire_counts.to(self._mean.device), other.n_latent_tokens)

    def _add_fire_counts(self, counts: Tensor, n_rows: int) -> None:
        counts = counts.detach().double()
        self.fire_counts = counts.clone() if self.fire_counts is None else self.fire_counts + counts
        self.n_latent_tokens += n_rows

    def feature_density(self) -> Tensor:
        """Fraction of tokens on which each latent fired, ``[d_sae]`` (for the density histogram)."""
        if self.fire_counts is None:
            raise ValueError("no latents were given to update(); feature density is undefined")
        return (self.fire_counts / self.n_latent_tokens).float().cpu()

    def compute(self) -> dict[str, float]:
        """The metrics.json numbers over everything seen so far."""
        if self.n_tokens == 0:
            raise ValueError("ReconstructionStats.compute() called before any update()")
        nmse = _safe_div(self._sse, self._m2)
        out = {
            "mse": self._sse / (self.n_tokens * self._d),
            "nmse": nmse,
            "explained_variance": 1.0 - nmse,
            "cosine_sim": self._cos_sum / self.n_tokens,
            "l2_norm_in": self._sums["norm_in"] / self.n_tokens,
            "l2_norm_out": self._sums["norm_out"] / self.n_tokens,
            "l2_ratio": self._sums["ratio"] / self.n_tokens,
            "relative_reconstruction_bias": _safe_div(self._sums["sq_out"], self._sums["dot"]),
            "n_tokens": self.n_tokens,
        }
        if self.fire_counts is not None:
            density = self.fire_counts / self.n_latent_tokens
            out["l0"] = float(self.fire_counts.sum()) / self.n_latent_tokens
            out["dead_fraction"] = float((self.fire_counts == 0).double().mean())
            out["dense_fraction"] = float((density > self.dense_threshold).double().mean())
            for p in self.freq_thresholds:
                out |= frequency_fractions(density, p)
        if self.n_l1_tokens:
            out["l1"] = self._l1_sum / self.n_l1_tokens
        return out


def _cosine(dot: Tensor, norm_in: Tensor, norm_out: Tensor) -> Tensor:
    """Per-row ``cos(x, x̂)`` from the rows' dot products and norms, as ``F.cosine_similarity`` computes it
    (each norm clamped at ``COSINE_EPS``: 0 for a zero row)."""
    return dot / (norm_in.clamp(min=COSINE_EPS) * norm_out.clamp(min=COSINE_EPS))


def _norm_sums(norm_in: Tensor, norm_out: Tensor, dot: Tensor) -> dict[str, float]:
    """Per-batch sums behind the shrinkage numbers: ``||x||``, ``||x̂||``, ``||x̂||/||x||``, ``||x̂||²``,
    ``<x, x̂>`` over the rows, from their norms and dot products (float64 ``[n]``)."""
    safe_in = torch.where(norm_in < SMALL_NORM, torch.ones_like(norm_in), norm_in)
    return {"norm_in": float(norm_in.sum()), "norm_out": float(norm_out.sum()),
            "ratio": float((norm_out / safe_in).sum()), "sq_out": float((norm_out**2).sum()),
            "dot": float(dot.sum())}


def frequency_fractions(density: Tensor, threshold: float) -> dict[str, float]:
    """SAEBench's frequency numbers for one threshold ``p`` over per-latent densities ``[d_sae]``:
    ``freq_over_<100p>_percent = #{i: density_i > p} / d_sae`` and
    ``normalized_freq_over_<100p>_percent = sum_{i: density_i > p} density_i / sum_i density_i`` (the share
    of all firings made by those latents; 0 when nothing fired)."""
    name = f"over_{threshold * 100:g}_percent"
    density = density.double()
    over = density > threshold
    total = float(density.sum())
    return {f"freq_{name}": float(over.double().mean()),
            f"normalized_freq_{name}": float(density[over].sum()) / total if total > 0 else 0.0}


class PromptFireCounts:
    """Per latent, the number of prompts (context rows, ``doc``) in which it fired at least once, over rows
    streamed in prompt order (``doc`` non-decreasing, as ``eval_rows`` yields a cache's held-out rows; a
    prompt may continue into the next batch). :meth:`consistent_activation` turns it into SAEBench's
    ``consistent_activation_heuristic``. Rows with unknown prompts (``doc < 0``, imported arrays) or out of
    order make the count undefined: ``valid`` becomes False."""

    def __init__(self) -> None:
        self.counts: Tensor | None = None  # [d_sae] float64
        self.valid = True
        self._last_doc = -1
        self._last_fired: Tensor | None = None  # [d_sae] bool: fired so far in prompt _last_doc

    @torch.no_grad()
    def update(self, latents: Tensor, doc: Tensor) -> None:
        """Add rows ``latents [n, d_sae]`` of prompts ``doc [n]``."""
        doc = doc.to(latents.device)
        if not self.valid or doc.numel() == 0:
            return
        if bool((doc < 0).any()) or bool((doc[1:] < doc[:-1]).any()) or int(doc[0]) < self._last_doc:
            self.valid = False
            return
        docs, segment = torch.unique_consecutive(doc, return_inverse=True)
        fired = torch.zeros(len(docs), latents.shape[1], device=latents.device)
        fired = fired.index_add_(0, segment, (latents != 0).float()) > 0  # [prompts in batch, d_sae]
        new = fired.sum(0).double()
        continues = int(docs[0]) == self._last_doc
        if continues:  # the last prompt goes on: its latents that already fired are counted already
            new -= (fired[0] & self._last_fired).double()
        self.counts = new if self.counts is None else self.counts + new
        if continues and len(docs) == 1:
            self._last_fired = self._last_fired | fired[0]
        else:
            self._last_fired = fired[-1]
        self._last_doc = int(docs[-1])

    def consistent_activation(self, fire_counts: Tensor) -> Tensor | None:
        """``fire_count_i / prompts_i``: tokens a latent fires on per prompt it fires in (NaN if it never
        fired); None when the prompt counts are undefined."""
        if not self.valid or self.counts is None:
            return None
        return (fire_counts.double().to(self.counts.device) / self.counts).float().cpu()


def _rows(t: Tensor) -> Tensor:
    """``[..., d]`` -> ``[n, d]`` float64 (sums of many float32 squares lose digits otherwise)."""
    return t.detach().reshape(-1, t.shape[-1]).double()


def _safe_div(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def batch_metrics(x: Tensor, x_hat: Tensor, l0: Tensor | float) -> dict[str, float]:
    """Cheap numbers for training logs, on ONE batch: same formulas as :class:`ReconstructionStats`,
    but ``explained_variance``/``nmse`` use the variance within this batch (noisier than, and not equal to,
    the evaluation-set number). ``l0`` is passed through (``SAEOutput.l0``). The shrinkage numbers are left
    to validation and evaluation."""
    stats = ReconstructionStats()
    stats.update(x, x_hat)
    full = stats.compute()
    out = {k: full[k] for k in ("mse", "nmse", "explained_variance", "cosine_sim")}
    out["l0"] = float(l0)
    return out


def ce_loss_recovered(l_clean: float, l_sae: float, l_zero: float) -> float:
    """``(L_zero - L_sae) / (L_zero - L_clean)``: 1 = the SAE splice loses nothing, 0 = as bad as
    zero-ablating the hooked activation. NaN when zero-ablation does not change the loss (undefined ratio)."""
    den = l_zero - l_clean
    return (l_zero - l_sae) / den if den != 0 else math.nan


def kl_div_score(kl_sae: float, kl_zero: float) -> float:
    """``(KL_zero - KL_sae) / KL_zero`` (SAEBench's ``kl_div_score``): 1 = the SAE splice leaves the
    next-token distribution unchanged, 0 = it changes it as much as zero-ablation. NaN when KL_zero = 0."""
    return (kl_zero - kl_sae) / kl_zero if kl_zero != 0 else math.nan


def next_token_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-position cross-entropy ``-log p(tokens[:, t+1] | tokens[:, :t+1])``, shape ``[B, T-1]``
    (position ``t`` predicts token ``t+1``)."""
    pred = logits[:, :-1].float()
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), tokens[:, 1:].reshape(-1),
                           reduction="none").view(pred.shape[:2])


def next_token_kl(clean_logits: Tensor, spliced_logits: Tensor) -> Tensor:
    """Per-position ``KL(P_clean || P_spliced) = sum_v p_clean(v) (log p_clean(v) - log p_spliced(v))`` over
    the next-token distributions, shape ``[B, T-1]`` (aligned with :func:`next_token_loss`)."""
    logp = clean_logits[:, :-1].float().log_softmax(-1)
    logq = spliced_logits[:, :-1].float().log_softmax(-1)
    return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
