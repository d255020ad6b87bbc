"""``activations=live``: the LM runs inside training; the same interface as the cache's datamodule.

Downstream code (the Lightning module, callbacks, ``evaluate.py``) sees what ``ActivationDataModule``
gives: ``d_in``/``norm_scale`` before ``fit``, an endless resumable training stream, a fixed validation
set, ``sample``/``sample_targets``, ``eval_rows`` with token, context and position, ``context(doc)``.
What changes is where rows come from: contexts of the text (``contexts.py``) through a truncated forward
of the model (``HookedLM.activations``, the code the cache builder runs) into windows (``stream.py``).

Memory, per process: the model, ``2 x buffer_tokens x d x 4`` bytes per hook for the training windows
(one served, one being filled; half without ``activations.prefetch``), the validation rows
(``trainer.limit_val_batches x batch_size x d x 4`` per hook, capped at one buffer), one forward chunk, and
the SAE with its optimizer. Nothing is written to disk.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from sae_lightning.cache.datamodule import EvalRows
from sae_lightning.cache.reader import NORM_SAMPLE_ROWS
from sae_lightning.checks import ConfigError
from sae_lightning.config import ModelConfig, TrainConfig
from sae_lightning.live.contexts import Context, Split, TextContexts, survey, training_contexts
from sae_lightning.live.stream import BufferGauge, Chunk, LiveStream, Windows

log = logging.getLogger(__name__)
STATE_VERSION = 1
SAMPLE_SPREAD = 1.25   # a sample of n rows is drawn from the first 1.25 n training rows


def lm_device(cfg: ModelConfig) -> torch.device:
    """``model.device``, checked to exist; ``auto``: this process's GPU (``LOCAL_RANK`` under DDP), else
    the CPU."""
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"model.device={cfg.device!r} is not a device name: use auto, cpu, cuda or "
                          "cuda:<index>") from None
    if device.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index is not None and device.index >= n) or n == 0:
            raise ConfigError(f"model.device={cfg.device!r} does not exist: this machine has {n} CUDA "
                              "device(s). Use model.device=auto, cpu or cuda:<index below the count>")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"model.device={cfg.device!r} does not exist here: use model.device=auto or cpu")
    return device


class LiveDataModule(LightningDataModule):
    """Activations computed by the LM as training runs (``activations.source=live``).

    ``lm``: an already loaded ``HookedLM`` (tests, evaluation); by default the config's model is loaded on
    ``model.device``. The model and hooks are checked, and the text is read once (tokenizer only) to find
    the held-out contexts and to check it holds the run's training tokens, before the LM's first batch.
    ``hooks``: (layer, name) of every hook read by one forward, a batch being the tuple of their rows (a
    group of SAEs, ``group/``); by default the config's hook and a transcoder's target. ``slot_dims``,
    ``slot_norm_scales`` and :meth:`sample_slots` describe every member of the tuple in order.
    """

    def __init__(self, cfg: TrainConfig, lm: Any = None, hooks: list[tuple[int, str]] | None = None) -> None:
        super().__init__()
        from sae_lightning.lm import HookPoint, load_lm

        self.cfg, self.acts = cfg, cfg.activations
        self.batch_size, self.seed = cfg.batch_size, cfg.seed
        if hooks is None:
            hooks = [(cfg.layer, cfg.hook.name), *([] if cfg.target_hook is None else [cfg.target_hook])]
        self.hooks = [HookPoint(*h) for h in hooks]
        device = lm_device(cfg.model)
        if lm is None:
            log.info("loading %s on %s for live activations", cfg.model.name, device)
            lm = load_lm(cfg.model, device=str(device))
        self.lm = lm
        lm.check_context_size(cfg.data.context_size)
        lm.check_hooks(self.hooks)
        self.slot_dims = [lm.hook_dim(h) for h in self.hooks]
        self.d_in = self.slot_dims[0]
        self.d_out = self.slot_dims[1] if cfg.target_hook is not None and len(self.hooks) > 1 else None
        self.text = TextContexts(cfg.data, lm.tokenizer)
        self.split = Split.of(cfg.data, self.acts.val_fraction, self.acts.eval_fraction)
        self.window = max(1, self.acts.buffer_tokens // self.batch_size) * self.batch_size
        self.rank, self.world_size = 0, 1
        self._resume_batches = 0
        self._samples: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._first_chunks: dict[Chunk, list[torch.Tensor]] | None = None   # None: no sample drawn yet
        self._val: list[torch.Tensor] | None = None
        self._stream: LiveStream | None = None
        self.gauge = BufferGauge()
        self._lm_lock = threading.Lock()
        self.held_out = self._survey(world_size=1).held_out

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LiveDataModule:
        return cls(cfg)

    def __getstate__(self) -> dict[str, Any]:
        """For ``ddp_spawn``: the model and the split travel, locks and computed rows do not."""
        state = dict(self.__dict__)
        state.update(_lm_lock=None, gauge=None, _samples={}, _first_chunks=None, _val=None, _stream=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lm_lock, self.gauge = threading.Lock(), BufferGauge()

    # ----- the text ------------------------------------------------------------------------------------
    @property
    def countable(self) -> bool:
        """Whether the text can be read ahead to count its rows (local files; a hub stream cannot)."""
        return self.cfg.data.source == "files"

    def _survey(self, world_size: int) -> Any:
        """Read the text (tokenizer only): the held-out contexts, and the check that every rank has the rows
        ``train_tokens`` needs (``ConfigError`` otherwise, unless ``activations.repeat_text``)."""
        need = self.cfg.max_steps * self.batch_size
        found = survey(self.text, self.split, world_size, need if self.countable else None)
        if found.train_contexts == 0 or len(found.held_out) < len(self.split.val) + len(self.split.eval):
            raise ConfigError(
                f"{self._describe()} holds {found.train_contexts} training contexts and "
                f"{len(found.held_out)} held-out contexts of {self.cfg.data.context_size} tokens; the "
                "held-out slices alone need "
                f"{self.split.eval.stop} contexts (data.n_tokens={self.cfg.data.n_tokens}). Lower "
                "data.n_tokens or give more text")
        if found.exhausted and self.countable and min(found.train_rows) < need and not self.acts.repeat_text:
            raise ConfigError(
                f"{self._describe()} holds {sum(found.train_rows)} training tokens ({found.train_contexts} "
                f"contexts, {min(found.train_rows)} on the smallest of {world_size} rank(s)), fewer than "
                f"train_tokens={self.cfg.train_tokens} ({need} per rank). Lower train_tokens, give more "
                "text, or set activations.repeat_text=true to train over it more than once")
        return found

    def _describe(self) -> str:
        d = self.cfg.data
        return f"data.path={d.path!r}" if d.source == "files" else f"dataset {d.name!r}"

    def _forward(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Activations ``[n, ctx, d]`` per hook. One forward at a time: the model's hooks are shared, and the
        prefetch thread and the main thread (validation, samples) both run it."""
        with self._lm_lock:
            acts = self.lm.activations(tokens.to(self.lm.device), self.hooks)
        return [acts[h] for h in self.hooks]

    def _rows(self, contexts: list[Context], limit: int | None = None,
              record: dict[Chunk, list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """The trained rows of ``contexts`` (float32, on the LM's device), at most ``limit``; ``record``
        receives each forward chunk's rows (``Windows``)."""
        rows = sum(c.rows for c in contexts) if limit is None else limit
        windows = Windows(iter(contexts), self._forward, self.slot_dims, rows, self.cfg.data.lm_batch_size,
                          self.lm.device, record=record)
        return windows.next() or [torch.empty(0, d) for d in self.slot_dims]

    # ----- scale and samples -----------------------------------------------------------------------------
    def _sample(self, n: int, seed: int) -> list[torch.Tensor]:
        """``min(n, buffer)`` rows per hook drawn uniformly from the trained positions of the first
        ``SAMPLE_SPREAD x n`` rows of training contexts (the same on every rank), kept for the next call with
        the same ``(n, seed)``. The first sample's forward chunks are kept too, until the training stream's
        first window takes them (``Windows``: a fresh single-process run's first window starts with the
        same contexts, so the LM does not run over them twice)."""
        n = min(n, self.window)   # a sample is at most one buffer
        key = (n, seed)
        if key not in self._samples:
            contexts, total = [], 0
            for c in training_contexts(self.text, self.split, 0, 1, repeat=False):
                if total >= SAMPLE_SPREAD * n:
                    break
                contexts.append(c)
                total += c.rows
            chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
            record: dict[Chunk, list[torch.Tensor]] | None = {} if self._first_chunks is None else None
            rows = self._rows(contexts, record=record)
            if record is not None:
                self._first_chunks = record
            self._samples = {key: [r[torch.from_numpy(chosen).to(r.device)].cpu() for r in rows]}
        return self._samples[key]

    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """``n`` raw training rows (decoder-bias init, resampling), float32 on the CPU."""
        return self._sample(n, self.seed if seed is None else seed)[0]

    def sample_targets(self, n: int, seed: int | None = None) -> torch.Tensor:
        """The transcoder target's rows at the positions :meth:`sample` draws."""
        if self.d_out is None:
            raise ValueError("sample_targets needs a transcoder target (target.name)")
        return self._sample(n, self.seed if seed is None else seed)[1]

    def sample_slots(self, n: int, seed: int | None = None) -> list[torch.Tensor]:
        """Every hook's rows at the positions :meth:`sample` draws, in batch-tuple order."""
        return self._sample(n, self.seed if seed is None else seed)

    def _scale(self, rows: torch.Tensor, hook: Any) -> float:
        mean = float(rows.double().norm(dim=1).mean())
        if not math.isfinite(mean) or mean <= 0:
            raise ConfigError(f"{self.cfg.model.name} layer {hook.layer} {hook.name}: activations have mean "
                              f"norm {mean}; check model.dtype (float16 overflows) or set "
                              "activations.normalize=false")
        return math.sqrt(rows.shape[1]) / mean

    @property
    def slot_norm_scales(self) -> list[float]:
        """Per hook, the scale that makes ``E||x|| = sqrt(d)``, from a first sample of training rows. It is
        the run's own sample (its ``seed``): the decoder-bias start then reuses it instead of running the
        model over the first rows again."""
        if not self.acts.normalize:
            return [1.0] * len(self.hooks)
        rows = self._sample(NORM_SAMPLE_ROWS, self.seed)
        return [self._scale(r, h) for r, h in zip(rows, self.hooks, strict=True)]

    @property
    def norm_scale(self) -> float:
        return self.slot_norm_scales[0]

    @property
    def target_norm_scale(self) -> float | None:
        return None if self.d_out is None else self.slot_norm_scales[1]

    # ----- Lightning -----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size != self.world_size:
            self.rank, self.world_size = trainer.global_rank, trainer.world_size
            if self.countable:
                self._survey(self.world_size)   # every rank must hold train_tokens' share
            self._val = None

    def _windows(self) -> Windows:
        """The training stream's windows; the first sample's chunks go to the first of them, once (a single
        process's: under DDP no rank's first contexts are the sample's)."""
        contexts = training_contexts(self.text, self.split, self.rank, self.world_size, self.acts.repeat_text)
        known = self._first_chunks if self._first_chunks and self.world_size == 1 else {}
        self._first_chunks = {}
        return Windows(contexts, self._forward, self.slot_dims, self.window, self.cfg.data.lm_batch_size,
                       self.lm.device, self.gauge, known=known)

    def train_dataloader(self) -> DataLoader:
        """Endless (``max_steps`` batches) shuffled stream of this rank, resumed at the stored position."""
        self._stream = LiveStream(self._windows, self.batch_size, self.window, self.seed, self.rank,
                                  self._resume_batches, self.cfg.max_steps, self.acts.prefetch)
        return DataLoader(self._stream, batch_size=None, num_workers=0)

    def teardown(self, stage: str | None = None) -> None:
        """Stop the window thread when ``fit`` ends (Lightning may leave the stream's iterator open)."""
        if stage == "fit" and self._stream is not None:
            self._stream.close()

    @property
    def has_validation(self) -> bool:
        return len(self.split.val) > 0

    def val_batches(self) -> list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """This rank's validation batches: the validation contexts dealt out like the training ones, in
        order, the same number on every rank (at most ``trainer.limit_val_batches``), computed once."""
        if self._val is None:
            held = self.held_out
            contexts = [Context(i, held[i], self.text.kept(held[i])) for i in self.split.val]
            mine = contexts[self.rank::self.world_size]
            per_rank = min(sum(c.rows for c in contexts[r::self.world_size]) for r in range(self.world_size))
            n = min(per_rank // self.batch_size, self.cfg.trainer.limit_val_batches)
            if n * self.batch_size > self.window:   # the validation rows kept are at most one buffer
                log.info("validating on %d batches (one activations.buffer_tokens of rows) instead of %d "
                         "(trainer.limit_val_batches)", self.window // self.batch_size, n)
                n = self.window // self.batch_size
            if n == 0:
                raise ConfigError(f"the validation contexts hold {per_rank} rows per rank, fewer than "
                                  f"batch_size={self.batch_size}: raise activations.val_fraction or "
                                  "data.n_tokens, or lower batch_size")
            self._val = self._rows(mine, n * self.batch_size)
        return [b[0] if len(b) == 1 else tuple(b)
                for b in zip(*(r.split(self.batch_size) for r in self._val), strict=True)]

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_validation:
            return []
        return DataLoader(self.val_batches(), batch_size=None, num_workers=0)

    # ----- evaluation ----------------------------------------------------------------------------------
    @property
    def eval_split(self) -> str:
        return "eval" if len(self.split.eval) else "validation"

    def eval_rows(self, max_tokens: int, batch_size: int | None = None) -> Iterator[EvalRows]:
        """Held-out rows in context order, with (token, context, position), at most ``max_tokens``: the
        evaluation contexts (the validation ones when ``eval_fraction=0``)."""
        step, left = batch_size or self.batch_size, max_tokens
        held = self.split.eval if len(self.split.eval) else self.split.val
        if not len(held):
            raise ConfigError("no held-out contexts (activations.eval_fraction=0 and val_fraction=0); set "
                              "activations.eval_fraction > 0 to evaluate on unseen text")
        lm_batch = self.cfg.data.lm_batch_size
        for lo in range(0, len(held), lm_batch):
            if left <= 0:
                return
            index = list(held[lo:lo + lm_batch])
            tokens = torch.from_numpy(np.stack([self.held_out[i] for i in index]))
            kept = torch.from_numpy(self.text.kept(tokens.numpy()))
            acts = [a[kept.to(a.device)].float().cpu() for a in self._forward(tokens)]
            doc, pos = kept.nonzero(as_tuple=True)
            tok = tokens[doc, pos]
            doc = torch.tensor(index)[doc]
            for a in range(0, min(len(tok), left), step):
                b = min(a + step, len(tok), left)
                yield EvalRows(acts[0][a:b], tok[a:b], doc[a:b], pos[a:b],
                               acts[1][a:b] if self.d_out is not None else None)
            left -= min(len(tok), left)

    def context(self, doc: int) -> np.ndarray:
        """Token ids of held-out context ``doc`` (evaluation reads only those)."""
        if doc not in self.held_out:
            raise KeyError(f"context {doc} is not held out: a live run keeps the tokens of its held-out "
                           "contexts only")
        return self.held_out[doc]

    # ----- resume --------------------------------------------------------------------------------------
    def _batches_trained(self) -> int:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return self._resume_batches
        return int(trainer.fit_loop.epoch_loop.batch_progress.total.ready)

    def state_dict(self) -> dict[str, Any]:
        """The stream position (batches this rank consumed) and what must match to continue it exactly."""
        return {"version": STATE_VERSION, "source": "live", "batches": self._batches_trained(),
                "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "window": self.window, "repeat_text": self.acts.repeat_text}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_batches = int(state["batches"])
        mine = self.state_dict()
        fields = ("source", "seed", "batch_size", "world_size", "window", "repeat_text")
        changed = {k: (state.get(k), mine[k]) for k in fields if state.get(k) != mine[k]}
        if changed:
            log.warning("resuming the live activation stream with changed %s (checkpoint, now): batch %d of "
                        "the new stream is not the exact continuation of the old one", changed,
                        self._resume_batches)
