"""A rank's training stream from the live LM: contexts -> forward -> windows of rows -> shuffled batches.

How the stream is laid out (a pure function of the seed, the text, the model, the hooks, the context size,
``buffer_tokens`` and the run's number of batches; nothing about it is stored but the number of batches
consumed):

- *Rows.* A rank's rows are the trained positions of its training contexts (``contexts.py``), in order.
- *Windows.* Rows ``[w * S, (w + 1) * S)`` form window ``w`` (``S = activations.buffer_tokens`` rounded
  down to whole batches). A window is computed from its own contexts only, in forward chunks of
  ``data.lm_batch_size`` contexts starting at its first context (a context split between two windows is
  run twice), so the same window always comes from the same computation, on a resume too. The run's last
  window holds only the rows it still trains on: a budget that ends inside a window does not pay the LM
  for the rest of it.
- *Shuffle.* Window ``w`` is served in the order of a permutation drawn from ``(seed, rank, w)``: rows mix
  with the ``S`` rows around them, as in a shuffle buffer.
- *Resume.* Batch ``k`` is batch ``k mod S/B`` of window ``k B // S``. A restored stream skips the rows
  before its window by tokenizing only (no LM), recomputes that window and starts at the batch.
- *Reuse.* A fresh run's first sample of rows (norm scale, decoder-bias start) runs the LM over the first
  training contexts in the same forward chunks; the first window computed takes those chunks (``known``)
  instead of running them again, so its rows are the same computation's.
- *Overlap.* With ``prefetch`` a background thread computes window ``w + 1`` while window ``w`` is served
  (on a CUDA device, on a side stream). At most two windows exist at a time, the one being served and the
  one being filled: ``2 x S x d x 4`` bytes per hook (``S x d x 4`` without prefetch).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable, Iterator
from queue import Queue
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from sae_lightning import heap
from sae_lightning.checks import ConfigError
from sae_lightning.live.contexts import Context

Forward = Callable[[torch.Tensor], list[torch.Tensor]]   # tokens [n, ctx] -> per hook [n, ctx, d]


class BufferGauge:
    """Bytes held by live window buffers right now and at most, followed through the tensors' lifetimes
    (a window counts until its last reference is gone), for the memory bound and its test."""

    def __init__(self) -> None:
        self.bytes = self.peak = 0
        self._lock = threading.Lock()

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            self.bytes += size
            self.peak = max(self.peak, self.bytes)
        weakref.finalize(tensor, self._free, size)
        return tensor

    def _free(self, size: int) -> None:
        with self._lock:
            self.bytes -= size


class _Stopped(Exception):
    """The window being computed was given up (the stream was closed)."""


Chunk = tuple[int, ...]   # the text-wide indices of the contexts of one forward chunk


class Windows:
    """Cuts a rank's contexts into windows of ``size`` rows and computes them with ``forward``.

    ``record``: a dict that receives each computed forward chunk's rows (per hook, ``[kept rows, d]``)
    under its contexts' indices. ``known``: chunks recorded that way earlier (the run's first sample of
    rows, ``LiveDataModule``); the first window computed takes a chunk from there instead of running the
    LM when it forms the same chunk (the same contexts, so the same forward), then drops the rest.
    """

    def __init__(self, contexts: Iterator[Context], forward: Forward, dims: list[int], size: int,
                 lm_batch: int, device: torch.device, gauge: BufferGauge | None = None, *,
                 record: dict[Chunk, list[torch.Tensor]] | None = None,
                 known: dict[Chunk, list[torch.Tensor]] | None = None) -> None:
        self.contexts, self.forward, self.dims = contexts, forward, dims
        self.size, self.lm_batch, self.device, self.gauge = size, lm_batch, device, gauge
        self.record, self.known = record, known or {}
        self.stop: threading.Event | None = None   # set: give up the window being computed
        self._pending: Context | None = None   # the context holding the next row
        self._used = 0                         # rows of it that belong to earlier windows

    def _next_context(self) -> Context | None:
        if self._pending is not None:
            ctx, self._pending = self._pending, None
            return ctx
        return next(self.contexts, None)

    def skip(self, rows: int) -> None:
        """Move past ``rows`` rows without running the LM."""
        while rows > 0:
            ctx = self._next_context()
            if ctx is None:
                return
            left = ctx.rows - self._used
            if left > rows:
                self._pending, self._used = ctx, self._used + rows
                return
            rows, self._used = rows - left, 0

    def next(self, limit: int | None = None) -> list[torch.Tensor] | None:
        """The next window, one ``[rows, d]`` float32 tensor per hook (``rows < size`` only at the end of
        the text, or when ``limit`` asks for fewer rows: the run's last window); ``None`` when no row is
        left."""
        size = self.size if limit is None else min(self.size, limit)
        first_used, chunk, gathered = self._used, [], 0
        while gathered < size:
            ctx = self._next_context()
            if ctx is None:
                break
            chunk.append(ctx)
            gathered += ctx.rows - (self._used if len(chunk) == 1 else 0)
        self._used = 0
        if gathered > size:   # the last context goes on in the next window
            last = chunk[-1]
            self._pending, self._used = last, last.rows - (gathered - size)
        rows = min(gathered, size)
        if rows == 0:
            return None
        out = self._compute(chunk, first_used, rows)
        self.known = {}   # only the first window computed can start with the recorded chunks
        return out

    def _fill(self, part: list[Context], out: list[torch.Tensor], at: int, skip: int, take: int) -> None:
        """Per hook, rows ``[skip, skip + take)`` of the kept rows of the contexts ``part`` (one forward
        chunk, context order) into ``out[h][at:at + take]``: known, or computed by one forward (recorded in
        full). Unrecorded rows go straight from the LM's output into the window: an intermediate
        ``[kept rows, d]`` tensor per hook, of a size that changes from chunk to chunk, would leave the
        heap in fragments (heap.py)."""
        key = tuple(c.index for c in part)
        rows = self.known.pop(key, None)
        if rows is None:
            tokens = torch.from_numpy(np.stack([c.tokens for c in part]))
            flat = torch.from_numpy(np.flatnonzero(np.stack([c.kept for c in part])))
            acts = [a.reshape(-1, a.shape[-1]) for a in self.forward(tokens)]
            if self.record is None:
                picked = flat[skip:skip + take].to(self.device)
                for buf, a in zip(out, acts, strict=True):
                    dest = buf[at:at + take]
                    if a.dtype == dest.dtype:
                        torch.index_select(a, 0, picked, out=dest)
                    else:   # a low-precision LM: rows widened to float32 on the copy
                        dest.copy_(a.index_select(0, picked))
                return
            rows = self.record[key] = [a[flat.to(a.device)] for a in acts]
        for buf, a in zip(out, rows, strict=True):
            buf[at:at + take].copy_(a[skip:skip + take])

    def _compute(self, chunk: list[Context], skip: int, rows: int) -> list[torch.Tensor]:
        out = [torch.empty(rows, d, dtype=torch.float32, device=self.device) for d in self.dims]
        if self.gauge is not None:
            out = [self.gauge.track(t) for t in out]
        at = 0
        for i in range(0, len(chunk), self.lm_batch):
            if self.stop is not None and self.stop.is_set():
                raise _Stopped
            part = chunk[i:i + self.lm_batch]
            n = sum(c.rows for c in part)
            take = max(0, min(n - skip, rows - at))
            self._fill(part, out, at, skip, take)
            heap.release(self.device)
            at += take
            skip = max(0, skip - n)
            if at >= rows:
                break
        return out


class LiveStream(IterableDataset):
    """Training batches ``[batch_size, d]`` (pairs ``(x, y)`` with a transcoder target) of one rank.

    ``make_windows()`` gives a fresh :class:`Windows` at the start of the rank's rows; ``start_batch`` is how
    many batches this rank has already consumed (resume); ``needed`` is how many the run trains on, so a
    text that ends earlier is an error instead of a silently short epoch.
    """

    def __init__(self, make_windows: Callable[[], Windows], batch_size: int, window: int, seed: int,
                 rank: int, start_batch: int, needed: int, prefetch: bool) -> None:
        if window % batch_size:
            raise ValueError(f"window {window} is not a multiple of batch_size {batch_size}")
        self.make_windows, self.batch_size, self.window = make_windows, batch_size, window
        self.seed, self.rank, self.start_batch, self.needed = seed, rank, start_batch, needed
        self.prefetch = prefetch
        self._sources: weakref.WeakSet = weakref.WeakSet()

    def close(self) -> None:
        """Stop the background computation of every iterator of this stream (the end of ``fit``)."""
        for source in list(self._sources):
            source.close()

    def permutation(self, w: int, rows: int, device: torch.device) -> torch.Tensor:
        """Serving order of window ``w``'s rows."""
        return torch.from_numpy(np.random.default_rng([self.seed, self.rank, w]).permutation(rows)).to(device)

    def __iter__(self) -> Iterator[Any]:
        per_window = self.window // self.batch_size
        w0, first = divmod(self.start_batch, per_window)
        windows = self.make_windows()
        windows.skip(w0 * self.window)
        served = self.start_batch
        last = max(w0, (self.needed - 1) // per_window)   # no window is computed past the run's end
        last_rows = self.needed * self.batch_size - last * self.window   # the rows the run trains on
        limits = {last: last_rows} if last_rows > 0 else {}
        source = (_Prefetched if self.prefetch else _Inline)(windows, w0, last, limits)
        self._sources.add(source)
        try:
            while (item := source.next()) is not None:
                w, bufs = item
                del item
                n = bufs[0].shape[0] // self.batch_size
                order = self.permutation(w, bufs[0].shape[0], bufs[0].device)
                for b in range(first, n):
                    idx = order[b * self.batch_size:(b + 1) * self.batch_size]
                    rows = [buf[idx] for buf in bufs]
                    yield rows[0] if len(rows) == 1 else tuple(rows)
                    served += 1
                first = 0
                del bufs   # before done(): the next window may be allocated now
                source.done()
                if n < per_window:
                    break
        finally:
            source.close()
        if served < self.needed:
            raise ConfigError(
                f"the text ran out after {served} training batches of rank {self.rank}, before the "
                f"{self.needed} this run trains on (train_tokens): lower train_tokens, give more text "
                "(data.path / data.name), or set activations.repeat_text=true to read it again")


Window = tuple[int, list[torch.Tensor]]


class _Inline:
    """Windows computed when the consumer asks for them (no overlap): one exists at a time."""

    def __init__(self, windows: Windows, first: int, last: int, limits: dict[int, int]) -> None:
        self.windows, self.w, self.last, self.limits = windows, first, last, limits

    def next(self) -> Window | None:
        bufs = self.windows.next(self.limits.get(self.w)) if self.w <= self.last else None
        self.w += 1
        return None if bufs is None else (self.w - 1, bufs)

    def done(self) -> None:
        pass

    def close(self) -> None:
        pass


_END = object()
_RUNNING: weakref.WeakSet[_Prefetched] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stop every producer thread before the interpreter tears torch down under it (which aborts the
    process: a thread inside a torch op at exit)."""
    for producer in list(_RUNNING):
        producer.close()


class _Prefetched:
    """Windows computed by a background thread one ahead of the consumer: at most two exist at once (the
    one served and the one filled; the consumer calls ``done()`` once it holds no reference to a window)."""

    def __init__(self, windows: Windows, first: int, last: int, limits: dict[int, int]) -> None:
        self.windows, self.first, self.last, self.limits = windows, first, last, limits
        self.slots = threading.Semaphore(2)
        self.queue: Queue = Queue()
        self.stop = threading.Event()
        windows.stop = self.stop   # checked between forward chunks, so close() returns within one chunk
        self.thread = threading.Thread(target=self._run, name="live-activations", daemon=True)
        self.thread.start()
        _RUNNING.add(self)

    def _run(self) -> None:
        device = self.windows.device
        side = torch.cuda.Stream(device) if device.type == "cuda" else None
        try:
            for w in range(self.first, self.last + 2):   # the one past the last puts the end
                while not self.slots.acquire(timeout=0.1):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                if w > self.last:
                    bufs = None
                elif side is None:
                    bufs = self.windows.next(self.limits.get(w))
                else:
                    with torch.cuda.stream(side):
                        bufs = self.windows.next(self.limits.get(w))
                    side.synchronize()
                if bufs is None:
                    self.queue.put(_END)
                    return
                self.queue.put((w, bufs))
                del bufs
        except _Stopped:
            return
        except BaseException as err:  # handed to the consumer, which raises it
            self.queue.put(err)

    def next(self) -> Window | None:
        item = self.queue.get()
        if item is _END:
            self.queue.put(_END)   # for a later call
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def done(self) -> None:
        self.slots.release()

    def close(self) -> None:
        self.stop.set()
        self.slots.release()
        self.thread.join(timeout=60)
