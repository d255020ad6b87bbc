"""Shard assembly and the writer thread: rows go into fixed-size shards while the next batch computes.

A build keeps one ``ShardSet`` per hook point in its partial directory. Every hook sees the same rows
in the same order (same tokens, same exclusion mask), so all hooks cut their shards at the same rows
and a resumed build restarts every hook from the same row.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checks import UserError
from ..io import atomic_write_json, sha256_file
from .shardfile import read_header, write_shard

PROGRESS = "progress.json"
NORM_STRIDE = 8


class CacheBuildError(UserError, RuntimeError):
    """A build could not finish; the message names the file and what to do."""


def _hint(err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return ("the disk is full or over quota: free space or point activations.cache_dir "
                "(or $SAE_LIGHTNING_CACHE) at a bigger disk")
    return "check that the cache directory is writable"


def write_json(path: Path, obj: dict) -> None:
    """``io.atomic_write_json``, with a write error turned into a ``CacheBuildError`` that says what to do."""
    try:
        atomic_write_json(path, obj)
    except OSError as err:
        raise CacheBuildError(f"writing {path} failed: {os.strerror(err.errno or 0)}. Fix: {_hint(err)}; "
                              "the next run resumes from the complete shards") from err


@dataclass
class RowBatch:
    """Kept rows of one token batch: ``acts[hook] [n, d]`` and where each row came from."""

    acts: dict[str, np.ndarray]
    tokens: np.ndarray      # [n] int32 token id of each row
    doc: np.ndarray         # [n] int64 global index of the context row
    pos: np.ndarray         # [n] int32 position inside the context
    contexts: np.ndarray    # [B, T] int32 the whole token batch
    doc0: int               # global index of contexts[0]


class ShardSet:
    """The shards of one hook in a partial directory, with their progress record."""

    def __init__(self, directory: Path, key: dict, np_dtype: type, bf16: bool, shard_rows: int):
        self.dir, self.key, self.shard_rows = directory, key, shard_rows
        self.np_dtype, self.bf16 = np_dtype, bf16
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.d: int | None = None
        self.buf = np.empty((0, 0), np_dtype)

    def set_dim(self, d: int) -> None:
        """Allocate the shard buffer once the first forward pass tells the width ``d``."""
        if self.d is not None and self.d != d:
            raise CacheBuildError(f"{self.dir / PROGRESS} records width d={self.d} but the model now gives "
                                  f"d={d} for the same key: the model changed under the same fingerprint. "
                                  f"Delete {self.dir} and rebuild")
        self.d = d
        self.buf = np.empty((self.shard_rows, d), self.np_dtype)

    def load_progress(self) -> None:
        """Keep the leading shards whose record, size and checksum hold; forget the rest."""
        for tmp in self.dir.glob("*.tmp"):        # a write cut short by a kill
            tmp.unlink()
        path = self.dir / PROGRESS
        rec = json.loads(path.read_text()) if path.exists() else {}
        if rec.get("key") != self.key or rec.get("shard_rows") != self.shard_rows:
            for stale in self.dir.glob("shard_*"):  # another layout (or none recorded): start over
                stale.unlink()
            return
        self.d = rec["d"]
        for entry in rec["shards"]:
            f = self.dir / entry["file"]
            try:
                read_header(f)
                if sha256_file(f) != entry["sha256"]:
                    break
            except (OSError, RuntimeError, ValueError):
                break
            self.shards.append(entry)

    def truncate(self, n_shards: int) -> None:
        """Drop shards past ``n_shards`` (another hook got less far; they will be rewritten identically)."""
        for entry in self.shards[n_shards:]:
            (self.dir / entry["file"]).unlink(missing_ok=True)
        self.shards = self.shards[:n_shards]
        self._save_progress()

    def _save_progress(self) -> None:
        write_json(self.dir / PROGRESS, {"key": self.key, "shard_rows": self.shard_rows, "d": self.d,
                                               "shards": self.shards})

    def _norm_sample(self, n: int) -> dict[str, float]:
        """Sum of row norms over every ``NORM_STRIDE``-th row: the cache's E||x|| without a second pass."""
        rows = self.buf[:n:NORM_STRIDE]
        x = torch.from_numpy(np.ascontiguousarray(rows))
        x = (x.view(torch.bfloat16) if self.bf16 else x).double()
        return {"norm_sum": float(x.norm(dim=1).sum()), "norm_count": len(rows)}

    def write(self, n: int, meta: dict[str, np.ndarray], contexts: np.ndarray, doc_first: int) -> None:
        """Write the first ``n`` buffered rows as the next shard (tmp file, fsync, rename, record)."""
        name = f"shard_{len(self.shards):05d}.safetensors"
        tmp = self.dir / (name + ".tmp")
        arrays = {"acts": self.buf[:n], **meta, "contexts": contexts}
        try:
            sha = write_shard(tmp, arrays, bf16=frozenset({"acts"}) if self.bf16 else frozenset())
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise CacheBuildError(
                f"writing shard {tmp} failed: {os.strerror(err.errno or 0)}. Nothing half-written was kept; "
                f"the {len(self.shards)} complete shards in {self.dir} are checksummed and the next run "
                f"resumes from them. Fix: {_hint(err)}.") from err
        os.replace(tmp, self.dir / name)
        self.shards.append({"file": name, "rows": n, "bytes": (self.dir / name).stat().st_size, "sha256": sha,
                            "doc_first": doc_first, "doc_last": doc_first + len(contexts) - 1,
                            **self._norm_sample(n)})
        self._save_progress()


class ShardAssembler:
    """Fills every hook's buffer with rows and cuts a shard each time ``shard_rows`` rows are in."""

    def __init__(self, sets: dict[str, ShardSet]):
        self.sets = sets
        self.S = next(iter(sets.values())).shard_rows
        self.fill = 0
        self.meta = {k: np.empty(self.S, t) for k, t in (("tokens", np.int32), ("doc", np.int64),
                                                         ("pos", np.int32))}
        self.pending: list[tuple[int, np.ndarray]] = []   # (doc0, contexts) of batches with buffered rows

    def add(self, rb: RowBatch) -> None:
        self.pending.append((rb.doc0, rb.contexts))
        n, start = len(rb.tokens), 0
        while start < n:
            take = min(n - start, self.S - self.fill)
            sl, dst = slice(start, start + take), slice(self.fill, self.fill + take)
            for hook, s in self.sets.items():
                s.buf[dst] = rb.acts[hook][sl]
            for k in self.meta:
                self.meta[k][dst] = getattr(rb, k)[sl]
            self.fill += take
            start += take
            if self.fill == self.S:
                self.flush()

    def flush(self) -> None:
        """Write the buffered rows (a full shard, or the last short one) to every hook."""
        if self.fill == 0:
            return
        n = self.fill
        meta = {k: v[:n] for k, v in self.meta.items()}
        first, last = int(meta["doc"][0]), int(meta["doc"][-1])
        contexts = np.concatenate([c[max(0, first - d0):last - d0 + 1] for d0, c in self.pending
                                   if d0 + len(c) > first and d0 <= last])
        for s in self.sets.values():
            s.write(n, meta, contexts, first)
        self.pending = [(d0, c) for d0, c in self.pending if d0 + len(c) - 1 >= last]
        self.fill = 0


class WriterThread:
    """Runs ``ShardAssembler.add`` on a background thread so disk writes overlap the next forward pass.

    The queue is short (``depth`` batches) so memory stays bounded; an error in the thread is raised
    in the producer at its next ``put`` or at ``close``.
    """

    _DONE = object()

    def __init__(self, assembler: ShardAssembler, depth: int = 2):
        self.assembler, self.q = assembler, queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not self._DONE:
            if self.error is None:
                try:
                    self.assembler.add(item)
                except BaseException as err:  # handed to the producer thread
                    self.error = err

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, rb: RowBatch) -> None:
        self._raise()
        while True:
            try:
                self.q.put(rb, timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def close(self, flush: bool) -> None:
        """Stop the thread; with ``flush`` write the last short shard. Raises the thread's error if any."""
        self.q.put(self._DONE)
        self.thread.join()
        self._raise()
        if flush:
            self.assembler.flush()
