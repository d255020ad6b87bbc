"""Activation cache: keyed, sharded, atomically written, resumable; plus imported arrays.

- ``key.py``: what identifies a cache (readable name + hash of every field that changes the numbers);
- ``shardfile.py``: the shard format (safetensors, written in one pass, read memory-mapped) and why;
- ``writer.py``: shard assembly on a writer thread, progress records, disk-full handling;
- ``build.py``: locking, reuse, resume and the atomic publish of a finished cache;
- ``reader.py``: ``ActivationCache`` / ``ArraySource`` and when checksums are verified;
- ``ensure.py``: ``ensure_cache(cfg)`` for train.py and the CLI (``python -m sae_lightning.cache``).
"""

from .build import build_cache, cache_path
from .ensure import ensure_cache
from .key import CacheKey, hook_id
from .reader import ActivationCache, ArraySource, CacheError, RowSource, open_source
from .writer import CacheBuildError

__all__ = ["ActivationCache", "ArraySource", "CacheBuildError", "CacheError", "CacheKey", "RowSource",
           "build_cache", "cache_path", "ensure_cache", "hook_id", "open_source"]
