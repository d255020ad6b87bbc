"""Building caches: lock, reuse, resume, compute in batches, write shards, publish atomically.

Directory layout under the cache root::

    <root>/<name>-<hash12>/          finished caches (meta.json + shards); only ever created by a rename
    <root>/.partial/<name>-<hash12>/ builds in progress or interrupted: checksummed shards + progress.json
    <root>/.locks/<name>-<hash12>.lock

A cache is visible only once complete: ``meta.json`` is written last inside the partial directory,
which is then renamed into place. An interrupted build leaves its complete shards (each written to
a ``.tmp`` file, fsynced and renamed, then recorded with its checksum in ``progress.json``); the next
build of the same key re-verifies them and recomputes only the rest, skipping the token batches
already stored (only their cheap special-token masks are recomputed to count rows).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from .key import CacheKey
from .reader import META
from .writer import CacheBuildError, RowBatch, ShardAssembler, ShardSet, WriterThread, write_json

log = logging.getLogger(__name__)

Compute = Callable[[torch.Tensor], dict[str, torch.Tensor]]
ExcludeMask = Callable[[torch.Tensor], torch.Tensor]
PARTIAL_DIR = ".partial"
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_path(root: Path, key: CacheKey) -> Path:
    return Path(root) / key.name


def partial_path(root: Path, key: CacheKey) -> Path:
    return Path(root) / PARTIAL_DIR / key.name


def _acquire(locks: list[FileLock], names: list[str]) -> None:
    """Take every lock (sorted order, so two builders never deadlock), saying when we have to wait."""
    for lock, name in zip(locks, names, strict=True):
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("waiting for another process that is building activation cache %s", name)
            lock.acquire()


def build_cache(key: CacheKey, token_batches: Iterable[torch.Tensor], compute: Compute,
                exclude_mask: ExcludeMask | None, root: str | Path,
                shard_rows: int = 65_536) -> dict[str, Path]:
    """Make sure one cache per hook of ``key`` exists under ``root``; returns ``{hook: cache dir}``.

    ``compute(tokens [B, T]) -> {hook: [B, T, d]}`` runs the model (already truncated and under
    inference mode on the LM side); ``exclude_mask(tokens) -> bool [B, T]`` marks positions not to
    store (BOS/special tokens) and may be None. ``token_batches`` is only iterated when something is
    missing. Concurrent callers with the same key build once: the others wait on the lock, then reuse.
    """
    root = Path(root)
    keys = sorted(key.split(), key=lambda k: k.name)
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    locks = [FileLock(root / ".locks" / f"{k.name}.lock") for k in keys]
    _acquire(locks, [k.name for k in keys])
    try:
        missing = [k for k in keys if not (cache_path(root, k) / META).is_file()]
        for k in keys:
            if k not in missing:
                log.info("reusing activation cache %s (same key: %s)", cache_path(root, k), k.identity())
        if missing:
            _build(missing, token_batches, compute, exclude_mask, root, shard_rows)
    finally:
        for lock in reversed(locks):
            lock.release()
    return {k.hooks[0]: cache_path(root, k) for k in keys}


def _build(keys: list[CacheKey], token_batches: Iterable[torch.Tensor], compute: Compute,
           exclude_mask: ExcludeMask | None, root: Path, shard_rows: int) -> None:
    start = time.perf_counter()
    sets = {k.hooks[0]: ShardSet(partial_path(root, k), k.identity(), _np_storage(k.dtype),
                                 k.dtype == "bfloat16", shard_rows) for k in keys}
    rows_done = _resume_point(sets)
    storage = _TORCH_DTYPES[keys[0].dtype]
    rows_seen = doc = tokens_seen = 0
    writer: WriterThread | None = None
    try:
        for tokens in token_batches:
            keep = _keep_mask(tokens, exclude_mask)
            n_keep = int(keep.sum())
            if rows_seen + n_keep > rows_done:   # not (entirely) stored by an earlier run
                with torch.inference_mode():
                    acts = compute(tokens)
                _check_outputs(acts, list(sets), tokens)
                writer = writer or _start_writer(sets, acts)
                writer.put(_row_batch(tokens, keep, acts, storage, doc, max(0, rows_done - rows_seen)))
            rows_seen, doc, tokens_seen = rows_seen + n_keep, doc + len(tokens), tokens_seen + tokens.numel()
        if writer is not None:
            writer.close(flush=True)
    except BaseException:
        if writer is not None and writer.thread.is_alive():
            writer.close(flush=False)
        raise
    if not any(s.shards for s in sets.values()):
        raise CacheBuildError(f"no rows for {keys[0].name}: the text source yielded no token batches (or "
                              "only special tokens). Check data.path / data.name and data.n_tokens")
    for k in keys:
        _publish(k, sets[k.hooks[0]], root, tokens_seen, time.perf_counter() - start)


def _np_storage(dtype: str) -> type:
    """numpy type holding stored values (bf16 as its uint16 bit pattern)."""
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]


def _start_writer(sets: dict[str, ShardSet], acts: dict[str, torch.Tensor]) -> WriterThread:
    for h, s in sets.items():
        s.set_dim(int(acts[h].shape[-1]))
    return WriterThread(ShardAssembler(sets))


def _keep_mask(tokens: torch.Tensor, exclude_mask: ExcludeMask | None) -> torch.Tensor:
    if tokens.ndim != 2:
        raise CacheBuildError(f"token batches must be [B, T] LongTensors, got shape {tuple(tokens.shape)}")
    if exclude_mask is None:
        return torch.ones(tokens.shape, dtype=torch.bool)
    return ~exclude_mask(tokens).to("cpu", torch.bool)


def _check_outputs(acts: dict[str, torch.Tensor], hooks: list[str], tokens: torch.Tensor) -> None:
    for h in hooks:
        if h not in acts:
            raise CacheBuildError(f"compute() returned hooks {sorted(acts)} but the key asks for {h!r}")
        if tuple(acts[h].shape[:2]) != tuple(tokens.shape) or acts[h].ndim != 3:
            raise CacheBuildError(f"compute() returned {h} with shape {tuple(acts[h].shape)}; expected "
                                  f"[{tokens.shape[0]}, {tokens.shape[1]}, d]")


def _row_batch(tokens: torch.Tensor, keep: torch.Tensor, acts: dict[str, torch.Tensor], storage: torch.dtype,
               doc0: int, skip: int) -> RowBatch:
    """Select kept positions (on the compute device, before the copy to host), convert, drop ``skip``."""
    b, t = keep.nonzero(as_tuple=True)
    b, t = b[skip:], t[skip:]
    out = {}
    for h, a in acts.items():
        rows = a[b.to(a.device), t.to(a.device)].to(storage).cpu()
        out[h] = (rows.view(torch.uint16) if storage == torch.bfloat16 else rows).numpy()
    tok = tokens.cpu()
    return RowBatch(acts=out, tokens=tok[b, t].numpy().astype(np.int32), doc=(b + doc0).numpy(),
                    pos=t.numpy().astype(np.int32), contexts=tok.numpy().astype(np.int32), doc0=doc0)


def _resume_point(sets: dict[str, ShardSet]) -> int:
    """Rows every hook already holds in complete, verified shards; later shards are dropped."""
    for s in sets.values():
        s.load_progress()
    n = min(len(s.shards) for s in sets.values())
    for s in sets.values():
        s.truncate(n)
    first = next(iter(sets.values()))
    rows = sum(e["rows"] for e in first.shards)
    if n:
        log.info("resuming activation cache build from shard %d (%d rows already stored in %s)", n, rows,
                 first.dir)
    return rows


def _publish(key: CacheKey, shards: ShardSet, root: Path, tokens_seen: int, seconds: float) -> None:
    """Write meta.json inside the partial directory, then rename it into place (the atomic step)."""
    meta = {"format_version": key.format_version, "name": key.name, "key": key.to_dict(),
            "hook": key.hooks[0], "shape": [sum(s["rows"] for s in shards.shards), shards.d],
            "d": shards.d, "dtype": key.dtype, "shard_rows": shards.shard_rows,
            "n_rows": sum(s["rows"] for s in shards.shards), "n_docs": shards.shards[-1]["doc_last"] + 1,
            "tokens_seen": tokens_seen, "shards": shards.shards, "build_seconds": round(seconds, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    mean = sum(s["norm_sum"] for s in shards.shards) / sum(s["norm_count"] for s in shards.shards)
    if not math.isfinite(mean) or mean <= 0:
        raise CacheBuildError(f"{shards.dir}: activations have mean norm {mean} (NaN/inf from the model?); "
                              "check model.dtype (float16 overflows) and rebuild")
    meta.update(norm_scale=math.sqrt(shards.d) / mean, mean_norm=mean)
    write_json(shards.dir / META, meta)
    final = cache_path(root, key)
    if final.exists():   # a stale directory without meta.json (we hold the lock, so nobody is using it)
        shutil.rmtree(final)
    os.replace(shards.dir, final)
    log.info("built activation cache %s: %d rows x %d (%s), %.1f s", final, meta["n_rows"], shards.d,
             key.dtype, seconds)
