"""Streaming activations to Lightning: shuffled, sharded across ranks and workers, resumable.

How the stream is laid out (every piece is a pure function of the seed, so nothing is stored):

- *Consumers.* Each (DDP rank, dataloader worker) pair is one consumer, ``c = rank * workers + worker``
  of ``C = world_size * workers``. Lightning does not shard an ``IterableDataset``, so we do: consumer
  ``c`` owns rows ``[c*n//C, (c+1)*n//C)`` of every shard (n = the shard's rows). Row sets are disjoint
  and every consumer reads every shard, so it works for any number of shards.
- *Epochs.* Epoch ``e`` visits the training shards in a permutation drawn from ``(seed, e)``; a
  consumer's epoch is the concatenation of its chunks in that order.
- *Shuffle window.* The epoch is cut into windows of ``shuffle_buffer`` rows (rounded down to whole
  batches) and each window is permuted with an RNG seeded by ``(seed, e, c, window)``. Rows thus mix
  with the ``shuffle_buffer`` rows around them, like a shuffle buffer, but the row at any position is
  computable directly.
- *Equal batch counts.* Every consumer yields ``min_c floor(rows_c / batch_size)`` batches per epoch
  (the few rows left over differ between epochs, since the shard order does). Training repeats epochs
  forever; validation is one fixed, unshuffled epoch of the validation shards.
- *Resume.* ``state_dict()`` stores the number of training batches this rank has consumed (Lightning's
  own counter of batches fetched for training, which excludes its one-batch prefetch). A restored
  stream maps that count to (epoch, batch) for each worker, as the DataLoader hands out batches
  round-robin, and starts there: no replay, no buffer to save.
- *Memory.* A consumer maps only the shards of its current window and gathers ``batch_size`` rows at
  a time, so memory depends on ``shuffle_buffer`` and ``batch_size``, never on the cache size.
- *Aligned hooks.* With more sources (other hooks' caches from the same LM pass: same shards, same rows
  in the same order: a transcoder's ``target``, or the hooks of a group of SAEs, ``group/``) every batch
  is a tuple of their rows read at the same (shard, row) positions; the positions, and so the order,
  resume state and sharding, are those of the first source alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ActivationsConfig
from .reader import ActivationCache, ArraySource, CacheError, RowSource, open_source, sample_rows

log = logging.getLogger(__name__)
STATE_VERSION = 1


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes a stream (picklable, so dataloader workers receive it whole)."""

    shards: tuple[int, ...]
    shard_sizes: tuple[int, ...]   # rows of each entry of ``shards``
    batch_size: int
    seed: int
    window: int                     # rows permuted together; 0 = no row shuffling
    shuffle_shards: bool
    world_size: int = 1
    rank: int = 0

    def chunks(self, consumer: int, n_consumers: int) -> list[tuple[int, int, int]]:
        """(shard, start, stop) rows owned by ``consumer`` in each shard, in ``shards`` order."""
        return [(s, n * consumer // n_consumers, n * (consumer + 1) // n_consumers)
                for s, n in zip(self.shards, self.shard_sizes, strict=True)]

    def batches_per_epoch(self, workers: int) -> int:
        """Batches every consumer yields per epoch: set by the consumer with the fewest rows."""
        n_consumers = self.world_size * workers
        rows = min(sum(b - a for _, a, b in self.chunks(c, n_consumers)) for c in range(n_consumers))
        return rows // self.batch_size


class _EpochPlan:
    """One consumer's epoch: its chunks in epoch order, and the row behind any stream position."""

    def __init__(self, spec: StreamSpec, consumer: int, n_consumers: int, epoch: int):
        chunks = spec.chunks(consumer, n_consumers)
        if spec.shuffle_shards:
            order = np.random.default_rng([spec.seed, epoch]).permutation(len(chunks))
            chunks = [chunks[i] for i in order]
        self.spec, self.key = spec, (spec.seed, epoch, consumer)
        self.shard = np.array([s for s, _, _ in chunks], np.int64)
        self.start = np.array([a for _, a, _ in chunks], np.int64)
        self.offset = np.cumsum([0] + [b - a for _, a, b in chunks])
        self.n_rows = int(self.offset[-1])
        self._window: tuple[int, np.ndarray] | None = None

    def _permuted(self, w: int) -> np.ndarray:
        """Stream positions of window ``w`` in shuffled order (cached: consecutive batches share it)."""
        if self._window is None or self._window[0] != w:
            size = self.spec.window or self.n_rows
            lo, hi = w * size, min((w + 1) * size, self.n_rows)
            perm = np.arange(lo, hi)
            if self.spec.window:
                perm = lo + np.random.default_rng([*self.key, w]).permutation(hi - lo)
            self._window = (w, perm)
        return self._window[1]

    def positions(self, k: int) -> np.ndarray:
        """Unshuffled stream positions making up batch ``k``."""
        size = self.spec.window or self.n_rows
        lo, hi = k * self.spec.batch_size, (k + 1) * self.spec.batch_size
        parts = [self._permuted(w)[max(lo, w * size) - w * size: hi - w * size]
                 for w in range(lo // size, (hi - 1) // size + 1)]
        return np.concatenate(parts)

    def window_shards(self, k: int) -> set[int]:
        """Shards the window holding batch ``k`` touches (the others can be unmapped)."""
        size = self.spec.window or self.n_rows
        w = (k + 1) * self.spec.batch_size // size
        lo, hi = w * size, min((w + 1) * size, self.n_rows)
        first, last = np.searchsorted(self.offset, [lo, max(lo, hi - 1)], side="right") - 1
        return set(self.shard[first:last + 1].tolist())

    def locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, row) of stream positions."""
        j = np.searchsorted(self.offset, pos, side="right") - 1
        return self.shard[j], self.start[j] + pos - self.offset[j]


def gather(source: RowSource, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Rows (float32, raw) at (shard, row) pairs, read shard by shard in row order for locality."""
    out = np.empty((len(row), source.d), np.float32)
    for s in np.unique(shard):
        sel = np.flatnonzero(shard == s)
        order = np.argsort(row[sel], kind="stable")
        out[sel[order]] = source.read_rows(int(s), row[sel][order])
    return out


class ActivationStream(IterableDataset):
    """Batches ``[batch_size, d]`` float32, raw (the SAE normalizes), for this rank and dataloader worker;
    tuples of aligned rows, one per source, when ``sources`` holds more than one.

    ``start_batch`` is how many batches this rank has already consumed (resume). ``epochs=None`` is
    endless (training); ``epochs=1`` is one finite pass (validation).
    """

    def __init__(self, sources: list[RowSource], spec: StreamSpec, epochs: int | None, start_batch: int = 0):
        self.sources, self.spec = sources, spec
        self.epochs, self.start_batch = epochs, start_batch

    def _consumer(self) -> tuple[int, int]:
        """(logical worker, workers) of the calling process.

        The DataLoader takes batch ``j`` from worker ``j % workers``, always starting at worker 0. A
        resumed stream whose next batch is logical worker ``start_batch % workers``'s therefore rotates
        the roles, so worker 0 plays that one and the round-robin order is the uninterrupted one.
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return (worker + self.start_batch) % workers, workers

    def __iter__(self) -> Iterator[torch.Tensor]:
        worker, workers = self._consumer()
        consumer, n_consumers = self.spec.rank * workers + worker, self.spec.world_size * workers
        per_epoch = self.spec.batches_per_epoch(workers)
        if per_epoch == 0:
            return
        done = len(range(worker, self.start_batch, workers))   # this worker's share of the batches so far
        epoch, first = divmod(done, per_epoch)
        while self.epochs is None or epoch < self.epochs:
            plan = _EpochPlan(self.spec, consumer, n_consumers, epoch)
            for k in range(first, per_epoch):
                yield self._batch(plan, k)
                self._release_except(plan.window_shards(k))
            self._release_except(set())     # the next epoch visits shards in another order
            epoch, first = epoch + 1, 0

    def _release_except(self, keep: set[int]) -> None:
        for source in self.sources:
            source.release_except(keep)

    def _batch(self, plan: _EpochPlan, k: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        where = plan.locate(plan.positions(k))
        rows = [torch.from_numpy(gather(source, *where)) for source in self.sources]
        return rows[0] if len(rows) == 1 else tuple(rows)


@dataclass
class EvalRows:
    """Held-out rows with where they came from (token id, context row, position); -1 when unknown."""

    acts: torch.Tensor     # [n, d] float32, raw
    tokens: torch.Tensor   # [n] int64
    doc: torch.Tensor      # [n] int64
    pos: torch.Tensor      # [n] int64
    target: torch.Tensor | None = None   # [n, d_out] a transcoder's target rows (same positions)


class ActivationDataModule(LightningDataModule):
    """Streams a cache (or an imported [N, d] array) as training and validation batches.

    ``source``: an ``ActivationCache``/``ArraySource``, or a path to a cache directory or an array
    file. ``d_in`` and ``norm_scale`` (the scale that makes ``E||x|| = sqrt(d)``; the SAE applies it, the
    stream does not) are known right after construction (read from metadata), so the SAE can be built
    before ``fit``. Rank and world size come from ``self.trainer`` in ``setup()``.

    ``target``: a transcoder's target cache, aligned row for row with ``source`` (module docstring);
    batches are then ``(x, y)`` pairs, ``d_out``/``target_norm_scale`` describe ``y`` (else None).
    ``extra``: more aligned caches (a group's other hooks), appended to every batch's tuple. ``slot_dims``,
    ``slot_norm_scales`` and :meth:`sample_slots` describe every member of the tuple in order.
    """

    def __init__(self, source: RowSource | str | Path, cfg: ActivationsConfig, batch_size: int, seed: int,
                 target: ActivationCache | None = None, extra: list[ActivationCache] | None = None):
        super().__init__()
        self.source = source if isinstance(source, RowSource) else open_source(
            source, shard_rows=cfg.shard_rows, normalize=cfg.normalize)
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.target = target
        self.sources = [self.source, *([] if target is None else [target]), *(extra or [])]
        for other in self.sources[1:]:
            check_aligned(self.source, other)
        self.slot_dims = [s.d for s in self.sources]
        self.slot_norm_scales = [float(s.norm_scale) if cfg.normalize else 1.0 for s in self.sources]
        self.d_in, self.norm_scale = self.slot_dims[0], self.slot_norm_scales[0]
        self.d_out = None if target is None else target.d
        self.target_norm_scale = None if target is None else self.slot_norm_scales[1]
        self.train_shards, self.val_shards, self.eval_shards = split_shards(self.source, cfg.val_fraction,
                                                                             cfg.eval_fraction)
        self.rank, self.world_size = 0, 1
        self._resume_batches = 0

    @classmethod
    def from_config(cls, cfg: Any) -> ActivationDataModule:
        """Build from a ``TrainConfig``: the imported array, synthetic rows, or the cache (built first when
        missing)."""
        acts: ActivationsConfig = cfg.activations
        if acts.source == "file":
            source: RowSource = ArraySource(acts.path, shard_rows=acts.shard_rows, normalize=acts.normalize)
        elif acts.source == "synthetic":
            from .synthetic import SyntheticSource
            source = SyntheticSource(acts.synthetic, shard_rows=acts.shard_rows, normalize=acts.normalize)
        if acts.source != "lm":
            return cls(source, acts, cfg.batch_size, cfg.seed)
        from .ensure import ensure_cache, hook_points
        caches = ensure_cache(cfg)
        target = None if cfg.target_hook is None else caches[hook_points(cfg).index(cfg.target_hook)]
        return cls(caches[0], acts, cfg.batch_size, cfg.seed, target=target)

    def setup(self, stage: str | None = None) -> None:
        trainer = self._trainer
        if trainer is not None:
            self.rank, self.world_size = trainer.global_rank, trainer.world_size

    def _spec(self, shards: list[int], train: bool) -> StreamSpec:
        return StreamSpec(shards=tuple(shards), shard_sizes=tuple(self.source.shard_sizes[s] for s in shards),
                          batch_size=self.batch_size, seed=self.seed,
                          window=_window(self.cfg.shuffle_buffer, self.batch_size) if train else 0,
                          shuffle_shards=train, world_size=self.world_size, rank=self.rank)

    def _loader(self, spec: StreamSpec, epochs: int | None, start: int, what: str) -> DataLoader:
        workers = max(1, self.cfg.num_workers)
        if spec.batches_per_epoch(workers) == 0:
            rows = sum(spec.shard_sizes)
            raise CacheError(
                f"{self.source.path}: the {what} split has {rows} rows, fewer than "
                f"batch_size={self.batch_size} for each of {spec.world_size * workers} process(es)/workers. "
                "Build more tokens (data.n_tokens), lower batch_size or activations.num_workers"
                + (", or raise activations.val_fraction" if what == "validation" else ""))
        stream = ActivationStream(self.sources, spec, epochs, start)
        return DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                          persistent_workers=self.cfg.num_workers > 0 and epochs is None,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        """Endless stream of ``[batch_size, d_in]`` float32 batches (``(x, y)`` pairs for a transcoder),
        resumed at the stored position."""
        return self._loader(self._spec(self.train_shards, True), None, self._resume_batches, "training")

    def val_dataloader(self) -> DataLoader | list:
        """The same finite, unshuffled pass over the validation shards each time (empty without a split)."""
        if not self.val_shards:
            return []
        return self._loader(self._spec(self.val_shards, False), 1, 0, "validation")

    @property
    def has_validation(self) -> bool:
        return bool(self.val_shards)

    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """``min(n, training rows)`` raw training rows drawn uniformly without replacement (decoder-bias
        init, resampling)."""
        seed = self.seed if seed is None else seed
        return torch.from_numpy(sample_rows(self.source, self.train_shards, n, seed))

    @property
    def eval_split(self) -> str:
        """Which rows ``eval_rows`` reads: its own split, else (``eval_fraction=0``) the validation rows."""
        return "eval" if self.eval_shards else "validation"

    def sample_targets(self, n: int, seed: int | None = None) -> torch.Tensor:
        """The transcoder target's rows at the positions :meth:`sample` draws (a transcoder's b_dec init)."""
        if self.target is None:
            raise ValueError("sample_targets needs a transcoder target cache")
        seed = self.seed if seed is None else seed
        return torch.from_numpy(sample_rows(self.target, self.train_shards, n, seed))

    def sample_slots(self, n: int, seed: int | None = None) -> list[torch.Tensor]:
        """Every source's rows at the positions :meth:`sample` draws, in batch-tuple order."""
        seed = self.seed if seed is None else seed
        return [torch.from_numpy(sample_rows(s, self.train_shards, n, seed)) for s in self.sources]

    def eval_rows(self, max_tokens: int, batch_size: int | None = None) -> Iterator[EvalRows]:
        """Evaluation rows in order, with (token, doc, pos), at most ``max_tokens`` of them: the evaluation
        split, which neither training nor validation (run selection) has seen."""
        shards = self.eval_shards or self.val_shards
        if not shards:
            raise CacheError(f"{self.source.path}: no held-out shards (activations.eval_fraction=0 and "
                             "val_fraction=0); set activations.eval_fraction > 0 to evaluate on unseen rows")
        step, left = batch_size or self.batch_size, max_tokens
        for s in shards:
            for lo in range(0, self.source.shard_sizes[s], step):
                if left <= 0:
                    return
                idx = np.arange(lo, min(lo + step, self.source.shard_sizes[s], lo + left))
                tok, doc, pos = self.source.read_where(s, idx)
                target = None if self.target is None else torch.from_numpy(self.target.read_rows(s, idx))
                yield EvalRows(torch.from_numpy(self.source.read_rows(s, idx)), torch.from_numpy(tok),
                               torch.from_numpy(doc), torch.from_numpy(pos), target)
                left -= len(idx)
            self.source.release(s)
            if self.target is not None:
                self.target.release(s)

    def context(self, doc: int) -> np.ndarray:
        """Token ids of context row ``doc`` (caches only; imported arrays carry no text)."""
        if not isinstance(self.source, ActivationCache):
            raise CacheError(f"{self.source.path} is an imported array: it has no token contexts")
        return self.source.context(doc)

    def _batches_trained(self) -> int:
        """Training batches this rank has consumed: Lightning's count of batches made ready for training."""
        trainer = self._trainer
        if trainer is None:
            return self._resume_batches
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)

    @property
    def _trainer(self) -> Any:
        return getattr(self, "trainer", None)

    def state_dict(self) -> dict[str, Any]:
        """The stream position: batches consumed per rank, plus what must match to reuse it exactly."""
        return {"version": STATE_VERSION, "batches": self._batches_trained(), "seed": self.seed,
                "batch_size": self.batch_size, "world_size": self.world_size,
                "num_workers": self.cfg.num_workers, "shuffle_buffer": self.cfg.shuffle_buffer,
                "n_rows": self.source.n_rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the training stream after the stored number of batches."""
        self._resume_batches = int(state["batches"])
        mine = self.state_dict()
        fields = ("seed", "batch_size", "world_size", "num_workers", "shuffle_buffer", "n_rows")
        changed = {k: (state.get(k), mine[k]) for k in fields if state.get(k) != mine[k]}
        if changed:
            log.warning("resuming the activation stream with changed %s (checkpoint, now): batch %d of "
                        "the new stream is not the exact continuation of the old one",
                        changed, self._resume_batches)


def datamodule_from_config(cfg: Any) -> LightningDataModule:
    """The datamodule a ``TrainConfig`` asks for: the LM running live (``activations=live``), or the rows of
    a cache, an imported array or synthetic data."""
    if cfg.activations.source == "live":
        from ..live import LiveDataModule
        return LiveDataModule.from_config(cfg)
    return ActivationDataModule.from_config(cfg)


def _window(shuffle_buffer: int, batch_size: int) -> int:
    """Shuffle window in rows: ``shuffle_buffer`` rounded down to whole batches (at least one), so no
    batch straddles two windows and at most one window's shards are mapped at a time."""
    return max(1, shuffle_buffer // batch_size) * batch_size if shuffle_buffer else 0


def check_aligned(source: RowSource, target: RowSource) -> None:
    """Refuse a target that is not the same rows as ``source``: both must be caches of one build (same
    model, text and processing, only the hook differs) with the same shard sizes."""
    same_key = (isinstance(source, ActivationCache) and isinstance(target, ActivationCache)
                and {**source.key.to_dict(), "hooks": None} == {**target.key.to_dict(), "hooks": None})
    if not same_key or source.shard_sizes != target.shard_sizes:
        raise CacheError(f"cache {target.path} (a transcoder target or a group's hook) is not row-aligned "
                         f"with the input cache "
                         f"{source.path} (both must come from one LM pass over the same text, with the same "
                         "activations.shard_rows): delete the target cache and rebuild it")


def split_shards(source: RowSource, val_fraction: float,
                 eval_fraction: float = 0.0) -> tuple[list[int], list[int], list[int]]:
    """(train, val, eval) shard indices. From the end: the fewest last shards holding at least
    ``eval_fraction`` of the rows are the evaluation split (evaluate.py's), the fewest shards before them
    holding at least ``val_fraction`` the validation split (training's validation, the sweep objective);
    each at least one shard when its fraction is > 0. Counting rows, not shards, matters because the last
    shard is usually partial: holding out "one shard in twenty" could leave a handful of rows.

    The last shards hold the last texts, so no context is split between splits except the one straddling
    a boundary shard.
    """
    n, total = source.n_shards, sum(source.shard_sizes)
    end, held_out = n, []
    for fraction in (eval_fraction, val_fraction):
        start, held = end, 0
        while fraction > 0 and start > 0 and (start == end or held < fraction * total):
            start -= 1
            held += source.shard_sizes[start]
        held_out.append(list(range(start, end)))
        end = start
    if end == 0:
        raise CacheError(f"{source.path} has {n} shard(s): too few to hold out activations.val_fraction="
                         f"{val_fraction} and activations.eval_fraction={eval_fraction} by shard and keep "
                         "some to train on. Use a smaller activations.shard_rows when building, more tokens, "
                         "or smaller fractions")
    return list(range(end)), held_out[1], held_out[0]
