"""Synthetic activations with a known dictionary (``activations=synthetic``), to measure feature recovery.

The generative model (every knob is a field of ``SyntheticConfig``):

- *Dictionary.* ``n_features`` random unit vectors in ``d`` dimensions (``n_features > d`` is
  superposition). Feature ``i`` is row ``i`` of ``SyntheticSource.dictionary``.
- *Frequencies.* Feature ``i`` (0-based) fires with probability ``p_i ∝ (i + 1)^-freq_exponent``, scaled so
  that ``Σ p_i = mean_active`` (the expected number of firing features per row); probabilities above 1
  are capped and the excess spread over the others.
- *Correlation.* Firing is drawn through a Gaussian copula: features are split into random groups of
  ``correlation_group``; feature ``i`` fires when ``sqrt(ρ) g_group + sqrt(1 - ρ) e_i < Φ⁻¹(q_i)`` with
  ``g, e ~ N(0, 1)`` and ``ρ = correlation``, so marginal probabilities stay exact while features of one
  group tend to fire together.
- *Hierarchy.* The ``hierarchy_parents`` most frequent features each get ``hierarchy_children``
  children (the next most frequent features, dealt round-robin). A child fires only when its parent
  fires, with conditional probability ``q = p_child / p_parent``, so its marginal is still ``p_child``.
- *Magnitudes.* A firing feature's coefficient is log-normal with mean ``magnitude_mean`` and standard
  deviation ``magnitude_std`` (0: constant).
- *Noise.* ``noise_std`` Gaussian noise is added to every dimension.

Rows are cut into virtual shards like an imported array (``activations.shard_rows``, at least 64
shards), and shard ``k`` is drawn from its own generator seeded by ``(seed, k)``: any process
regenerates exactly the same rows and dictionary from the config, so nothing is written to disk and
``evaluate.py`` recovers the true dictionary from the checkpoint's config. (NumPy does not promise the
same random streams across its versions: evaluate with the NumPy that trained.) Generated shards stay
in memory (``n_rows · d · 4`` bytes) because regenerating costs more than keeping them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..config import SyntheticConfig
from .reader import RowSource, estimate_norm_scale, virtual_shards

MIN_SHARDS = 64


def firing_probabilities(cfg: SyntheticConfig) -> np.ndarray:
    """``p [n_features]``: power law in the feature index, summing to ``mean_active``, capped at 1."""
    p = np.arange(1, cfg.n_features + 1, dtype=np.float64) ** -cfg.freq_exponent
    capped = np.zeros(cfg.n_features, dtype=bool)
    while True:  # water-filling: each pass caps at least one more feature, or stops
        free = ~capped
        p[capped] = 1.0
        if not free.any():  # mean_active = n_features: every feature always fires
            return p
        p[free] *= (cfg.mean_active - capped.sum()) / p[free].sum()
        over = free & (p > 1.0)
        if not over.any():
            return p
        capped |= over


def parents(cfg: SyntheticConfig) -> np.ndarray:
    """Parent index of every feature, -1 for features without one (see the module docstring)."""
    parent = np.full(cfg.n_features, -1, dtype=np.int64)
    n_parents = cfg.hierarchy_parents
    children = np.arange(n_parents, n_parents * (1 + cfg.hierarchy_children))
    parent[children] = (children - n_parents) % max(n_parents, 1)
    return parent


def true_dictionary(cfg: SyntheticConfig) -> np.ndarray:
    """The ground-truth feature directions ``[n_features, d]`` (float32, unit rows)."""
    w = np.random.default_rng([cfg.seed, 0]).standard_normal((cfg.n_features, cfg.d))
    return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


class SyntheticGenerator:
    """Draws rows (and their true codes) from the model in the module docstring."""

    def __init__(self, cfg: SyntheticConfig):
        self.cfg = cfg
        self.dictionary = true_dictionary(cfg)
        self.p = firing_probabilities(cfg)
        self.parent = parents(cfg)
        self.child = np.flatnonzero(self.parent >= 0)
        q = self.p.copy()
        q[self.child] = self.p[self.child] / self.p[self.parent[self.child]]
        self.threshold = torch.special.ndtri(torch.from_numpy(q)).numpy().astype(np.float32)
        perm = np.random.default_rng([cfg.seed, 1]).permutation(cfg.n_features)
        self.group = np.empty(cfg.n_features, dtype=np.int64)
        self.group[perm] = np.arange(cfg.n_features) // cfg.correlation_group
        sigma2 = math.log1p((cfg.magnitude_std / cfg.magnitude_mean) ** 2)
        self.log_mu, self.log_sigma = math.log(cfg.magnitude_mean) - sigma2 / 2, math.sqrt(sigma2)

    def codes(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """True feature coefficients ``[n, n_features]`` (float32, mostly zero)."""
        rho = self.cfg.correlation
        z = rng.standard_normal((n, self.cfg.n_features), dtype=np.float32)
        if rho > 0:
            shared = rng.standard_normal((n, int(self.group.max()) + 1), dtype=np.float32)
            z = math.sqrt(1 - rho) * z + math.sqrt(rho) * shared[:, self.group]
        fires = z < self.threshold
        fires[:, self.child] &= fires[:, self.parent[self.child]]  # parents have no parents: one pass
        codes = np.zeros(fires.shape, dtype=np.float32)
        codes[fires] = rng.lognormal(self.log_mu, self.log_sigma, int(fires.sum()))
        return codes

    def rows(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Activations ``[n, d]`` (float32): codes times the dictionary plus noise."""
        x = self.codes(rng, n) @ self.dictionary
        if self.cfg.noise_std:
            x += self.cfg.noise_std * rng.standard_normal(x.shape, dtype=np.float32)
        return x


class SyntheticSource(RowSource):
    """``SyntheticConfig`` rows as a ``RowSource``: streamed, split and normalized like an imported array."""

    def __init__(self, cfg: SyntheticConfig, shard_rows: int = 65_536, normalize: bool = True):
        super().__init__()
        self.cfg, self.generator = cfg, SyntheticGenerator(cfg)
        self.path = Path(f"activations=synthetic(seed={cfg.seed})")
        self.d, self.dtype = cfg.d, "float32"
        self.starts, self.shard_sizes = virtual_shards(cfg.n_rows, shard_rows, MIN_SHARDS)
        self._generated: dict[int, np.ndarray] = {}
        self.norm_scale = estimate_norm_scale(self)[0] if normalize else 1.0

    @property
    def dictionary(self) -> np.ndarray:
        """The true feature directions ``[n_features, d]`` (unit rows, raw scale)."""
        return self.generator.dictionary

    def __getstate__(self) -> dict:
        """Pickle without generated rows (dataloader workers generate their own)."""
        return {**super().__getstate__(), "_generated": {}}

    def _map(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._generated:
            rng = np.random.default_rng([self.cfg.seed, 2, i])
            self._generated[i] = self.generator.rows(rng, self.shard_sizes[i])
        return {"acts": self._generated[i]}
