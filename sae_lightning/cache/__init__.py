"""Activation cache: keyed, sharded, atomically written, resumable; plus imported arrays."""

from .build import build_cache, cache_path
from .ensure import ensure_cache
from .key import CacheKey, hook_id
from .reader import ActivationCache, ArraySource, CacheError, RowSource, open_source
from .writer import CacheBuildError

__all__ = ["ActivationCache", "ArraySource", "CacheBuildError", "CacheError", "CacheKey", "RowSource",
           "build_cache", "cache_path", "ensure_cache", "hook_id", "open_source"]
