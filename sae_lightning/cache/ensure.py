"""``ensure_cache(cfg)``: the one call train.py and the CLI make to get the caches a config asks for.

The LM side (``sae_lightning.lm``, ``sae_lightning.lm.text``) is imported lazily and the model is loaded
only when a cache is actually missing, so reusing a cache costs reading two fingerprints and a JSON file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .build import build_cache
from .key import CacheKey, hook_id
from .reader import ActivationCache

log = logging.getLogger(__name__)


def hook_points(cfg: Any) -> list[tuple[int, str]]:
    """(layer, name) of every hook the config asks for, the trained one first: ``hook.name`` then
    ``hook.extra`` names, at ``layer`` and then at each of ``hook.extra_layers``, then a transcoder's
    target (``cfg.target_hook``) when it is not among them (one forward pass)."""
    names = list(dict.fromkeys([cfg.hook.name, *cfg.hook.extra]))
    layers = list(dict.fromkeys([cfg.layer, *cfg.hook.extra_layers]))
    points = [(layer, n) for layer in layers for n in names]
    target = cfg.target_hook
    return points if target is None or target in points else [*points, target]


def _labels(cfg: Any) -> tuple[str, str]:
    """Short readable names of the model and the text for directory names (not part of the identity)."""
    m, d = cfg.model, cfg.data
    model = Path(m.name).name if m.source == "hub" else Path(m.path or m.gguf_file or "").stem
    data = f"{d.name.split('/')[-1]}_{d.split}" if d.source == "hub" else Path(d.path or "").stem
    return model, data


def cache_key(cfg: Any, model_fingerprint: str, text_fingerprint: str,
              points: list[tuple[int, str]] | None = None) -> CacheKey:
    """The key of the caches ``cfg`` (a TrainConfig) describes, for its ``hook_points`` or ``points``."""
    model_label, data_label = _labels(cfg)
    return CacheKey(model=model_fingerprint, data=text_fingerprint, model_label=model_label,
                    data_label=data_label,
                    hooks=tuple(hook_id(layer, name) for layer, name in points or hook_points(cfg)),
                    context_size=cfg.data.context_size, n_tokens=cfg.data.n_tokens,
                    dtype=cfg.activations.dtype, model_dtype=cfg.model.dtype,
                    prepend_bos=cfg.data.prepend_bos, exclude_special=cfg.data.exclude_special)


def ensure_cache(cfg: Any, points: list[tuple[int, str]] | None = None) -> list[ActivationCache]:
    """Open (building first if missing) one cache per hook point of ``cfg``, in ``hook_points`` order, or
    per (layer, name) of ``points`` (a group's hooks), one LM pass building every missing one.

    Returns ``[]`` unless ``activations.source=lm``: an imported array or synthetic rows need no cache.
    """
    if cfg.activations.source != "lm":
        return []
    from .. import lm as lm_side
    from ..lm import text as text_side

    key = cache_key(cfg, lm_side.model_fingerprint(cfg.model), text_side.text_fingerprint(cfg.data), points)
    hooks = [lm_side.HookPoint(layer, name) for layer, name in points or hook_points(cfg)]
    device = lm_side.resolve_device(None, cfg.model)

    @cache
    def model() -> Any:
        log.info("loading %s on %s to build activation cache %s", cfg.model.name, device, key.name)
        return lm_side.load_lm(cfg.model, device=device)

    def token_batches() -> Iterator[torch.Tensor]:
        """Token batches, with a progress bar (rate, ETA) in tokens for the LM pass."""
        with tqdm(total=cfg.data.n_tokens, unit="tok", unit_scale=True, desc=f"LM forward -> {key.name}",
                  dynamic_ncols=True) as bar:
            for tokens in text_side.iter_token_batches(cfg.data, model().tokenizer, cfg.data.lm_batch_size):
                yield tokens
                bar.update(tokens.numel())

    def compute(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        acts = model().activations(tokens.to(device), hooks)
        return {hook_id(h.layer, h.name): a for h, a in acts.items()}

    def exclude(tokens: torch.Tensor) -> torch.Tensor:
        return text_side.special_token_mask(tokens, model().tokenizer)

    paths = build_cache(key, token_batches(), compute, exclude if cfg.data.exclude_special else None,
                        Path(cfg.activations.cache_dir), shard_rows=cfg.activations.shard_rows)
    return [ActivationCache(paths[k.hooks[0]], expected_key=k) for k in key.split()]
