"""The memory guard of a group: what N SAEs trained from one activation stream need, before any work.

A group holds one activation stream (its buffers, and the LM itself for a live run) and, per SAE, its
weights, their gradients, Adam's two moments and the training step's working set. :func:`check_fits`
refuses a group that does not fit the memory available on the device the SAEs train on, naming how many
of its SAEs (in order) fit; :func:`split_to_fit` cuts a group into consecutive groups that each fit (what
the grouped launcher does with a group that is too big).

Every figure is an upper bound in bytes:

- :func:`sae_training_bytes`: the SAE is built on the meta device (no memory), so its parameters and
  buffers are counted exactly for any architecture; float32 weights + gradients + Adam's two moments are 4x
  the parameters' bytes; ``LatentStats`` adds 16 bytes per latent. The step's working set (pre-activations,
  activations, their gradients, the reconstruction, the kernels' and AuxK's temporaries) is
  ``4 x batch_size x (a x d_sae + c x (d_in + d_out))`` bytes, with ``(a, c)`` per architecture in
  ``WORKING_SET``: ``benchmarks/group_memory.py`` measures the peak-RSS growth of ``step.train_step`` (what
  the trainer runs) in a fresh process per architecture at ``d_in`` 1536, ``d_sae`` 3072 and 12288, batch
  4096, from a fresh start and with every latent dead (AuxK and the pre-activation loss at their largest);
  the largest of these over two runs (the same case varies by up to a third between runs: the allocator),
  minus the counted state and ``CPU_ALLOCATOR_SLACK``, is fitted through both sizes and raised by 10 %
  (the figures: ``docs/decisions.md``). An architecture missing from the table gets
  the largest coefficients. Once per process come the first step's code and buffers (``FIRST_STEP_BYTES``)
  and, on the CPU, the freed heap glibc keeps instead of returning it (``CPU_ALLOCATOR_SLACK``: up to its
  largest trim threshold, 2 x 32 MiB), which dominate at small sizes. Each member counts its own working
  set although a group steps its SAEs one after another: SAEs stepped in turn without releasing the freed
  heap keep several working sets resident (``benchmarks/group_memory.py --group``). The group's module
  releases it after every step (``heap.py``), so this sum is a bound, not what a group holds. On CUDA the
  same coefficients apply (not measured there) plus one copy of the parameters (:func:`sae_parts`).
- :func:`stream_bytes`: the stream's buffers as ``datamodule.py`` and ``live/`` hold them (function
  docstring).
- :func:`model_bytes`: the LM's parameters and buffers (a live run holds it; a cache run does not).
- :func:`clt_parts` / :func:`estimate_clt`: a cross-layer transcoder (``clt=true``), whose decoders grow
  with the square of its number of layers; what a ``clt=true`` run checks before any work.

:func:`available_bytes` reads the free memory of a device; ``SAE_LIGHTNING_MEMORY_LIMIT`` (bytes, or with a
K/M/G/T suffix) overrides it, for tests and for users who share a machine.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sae_lightning.checks import ConfigError, UserError
from sae_lightning.saes import build_sae

LIMIT_ENV = "SAE_LIGHTNING_MEMORY_LIMIT"
FLOAT32 = 4
STATS_BYTES_PER_LATENT = 8 + 8   # LatentStats: tokens_since_fired (int64) + window_fire_counts (float64)
DATA_INIT_ROWS = 32_768          # rows a live stream keeps as its sample (step's, and NORM_SAMPLE_ROWS)
FIRST_STEP_BYTES = 144 * 2**20   # a process's first training step: code and per-thread buffers, paid once
CPU_ALLOCATOR_SLACK = 64 * 2**20  # freed heap glibc keeps per process (its largest trim threshold)
PREFETCH_FACTOR = 2              # batches each DataLoader worker holds ready (torch's default)
# float32 words per batch row of the step's working set: (per latent, per input + output dimension)
WORKING_SET: dict[str, tuple[float, float]] = {
    "relu": (2.19, 2.73),
    "relu_dn": (1.47, 4.57),
    "gated": (6.48, 6.4),
    "jumprelu": (4.9, 3.14),
    "topk": (1.24, 10.62),
    "batchtopk": (2.55, 8.75),
    "matryoshka": (1.7, 12.65),
}
_LARGEST = (max(a for a, _ in WORKING_SET.values()), max(c for _, c in WORKING_SET.values()))
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class GroupMemoryError(UserError, MemoryError):
    """A group (or one of its SAEs alone) needs more memory than its device has free; the message says how
    much, how many of the SAEs fit and what to change."""


@dataclass
class MemoryEstimate:
    """A group's memory needs in bytes on one device: each SAE's (``members``, in the group's order) and
    the part they share (the stream's buffers, the LM for a live run), against what is ``available``."""

    members: list[int]
    shared: int
    available: int
    device: str

    @property
    def total(self) -> int:
        return self.shared + sum(self.members)

    def fitting(self) -> int:
        """How many of the members, taken in order, fit next to the shared part."""
        used, n = self.shared, 0
        for need in self.members:
            used += need
            if used > self.available:
                break
            n += 1
        return n


def human(n: int) -> str:
    """Bytes as MiB below a GiB, else GiB (one decimal)."""
    return f"{n / 2**30:.1f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def parse_bytes(text: str) -> int:
    """``"8G"``, ``"512M"``, ``"1.5GiB"``, ``"123"`` -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if m is None:
        raise ConfigError(f"{LIMIT_ENV}={text!r} is not a size: give bytes, or a number with K, M, G or T")
    return int(float(m[1]) * 1024 ** "_kmgt".index(m[2].lower() or "_"))


def _meta_sae(cfg: Any, d_in: int, d_out: int | None) -> nn.Module:
    with torch.device("meta"):
        return build_sae(cfg, d_in, d_out)


def tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sae_state_bytes(sae_cfg: Any, d_in: int, d_out: int | None = None) -> int:
    """Bytes an SAE keeps across steps: weights, gradients and Adam's two moments (4x the parameters),
    its buffers and ``LatentStats``, counted on the SAE built on the meta device."""
    sae = _meta_sae(sae_cfg, d_in, d_out)
    return (4 * tensor_bytes(sae.parameters()) + tensor_bytes(sae.buffers())
            + STATS_BYTES_PER_LATENT * sae.d_sae)


def working_set_bytes(architecture: str, batch_size: int, d_in: int, d_sae: int,
                      d_out: int | None = None) -> int:
    """Upper bound of one training step's temporaries for ``batch_size`` rows (``WORKING_SET``)."""
    a, c = WORKING_SET.get(architecture, _LARGEST)
    return math.ceil(FLOAT32 * batch_size * (a * d_sae + c * (d_in + (d_in if d_out is None else d_out))))


def sae_parts(cfg: Any, d_in: int, d_out: int | None = None, device: torch.device | str = "cpu",
              ) -> tuple[int, int]:
    """(state, working set) in bytes of one SAE of the ``TrainConfig`` ``cfg`` training on ``d_in``-wide
    rows (a transcoder to ``d_out``) on ``device``: :func:`sae_state_bytes` and :func:`working_set_bytes`
    for ``cfg.batch_size`` rows; on CUDA the working set holds one more copy of the parameters, the square
    root of Adam's second moments that its multi-tensor step (torch's default there) makes at once."""
    d_sae = cfg.sae.resolve_d_sae(d_in)
    work = working_set_bytes(cfg.sae.architecture, cfg.batch_size, d_in, d_sae, d_out)
    if torch.device(device).type == "cuda":
        work += tensor_bytes(_meta_sae(cfg.sae, d_in, d_out).parameters())
    return sae_state_bytes(cfg.sae, d_in, d_out), work


def sae_training_bytes(cfg: Any, d_in: int, d_out: int | None = None,
                       device: torch.device | str = "cpu") -> int:
    """Bytes one SAE of the ``TrainConfig`` ``cfg`` needs while it trains on ``d_in``-wide rows (a
    transcoder to ``d_out``) on ``device``: its state and its step's working set (:func:`sae_parts`)."""
    return sum(sae_parts(cfg, d_in, d_out, device))


def stream_bytes(cfg: Any, dims: list[int]) -> int:
    """Bytes of the activation stream's buffers for the hook widths ``dims`` (one per hook read).

    Live (``activations.source=live``, ``live/``): ``2`` windows (``1`` without ``activations.prefetch``) of
    ``buffer_tokens`` rows rounded down to whole batches, the validation rows kept (at most
    ``trainer.limit_val_batches`` batches, at most the validation contexts' tokens), the sample of training
    rows kept for initialisation, one forward chunk (``data.lm_batch_size`` contexts, the hook output and its
    selected rows) and the batch served. Cache, imported array (``datamodule.py``): each consumer process
    (the main one, or each of ``activations.num_workers`` workers) maps the shuffle window's rows in the
    stored dtype (the whole training split when ``shuffle_buffer=0``) with its int64 permutation, and holds
    batches: the one training, ``PREFETCH_FACTOR`` per worker, a pinned copy when CUDA is present.
    Synthetic rows are generated once per shard and kept: all ``synthetic.n_rows`` per consumer.
    """
    acts, batch, width = cfg.activations, cfg.batch_size, sum(dims)
    if acts.source == "live":
        window = max(1, acts.buffer_tokens // batch) * batch
        ctx = cfg.data.context_size
        val_contexts = math.ceil(acts.val_fraction * math.ceil(cfg.data.n_tokens / ctx))
        val_rows = min(cfg.trainer.limit_val_batches, val_contexts * ctx // batch) * batch
        rows = ((2 if acts.prefetch else 1) * window + val_rows + min(DATA_INIT_ROWS, window)
                + 2 * cfg.data.lm_batch_size * ctx + batch)
        return rows * width * FLOAT32
    consumers = max(1, acts.num_workers)
    batches = 1 + PREFETCH_FACTOR * acts.num_workers + int(torch.cuda.is_available())
    if acts.source == "synthetic":
        held = acts.synthetic.n_rows * width * FLOAT32
    else:
        window = max(1, acts.shuffle_buffer // batch) * batch if acts.shuffle_buffer else cfg.data.n_tokens
        held = window * (width * _DTYPE_BYTES[acts.dtype if acts.source == "lm" else "float32"] + 8)
    return consumers * held + batches * batch * width * FLOAT32


def weight_bytes(precision: str) -> int:
    """Bytes per weight, gradient and Adam moment under Lightning's ``trainer.precision``: 2 when the
    module itself is cast (``bf16-true``, ``16-true``), else 4 (mixed precision keeps float32 weights)."""
    return 2 if str(precision) in ("bf16-true", "16-true") else FLOAT32


def clt_parts(cfg: Any, d_in: int, d_out: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """(state, working set) in bytes of the cross-layer transcoder of the ``TrainConfig`` ``cfg``
    (``clt=true``) over ``n = len(cfg.layers)`` layers, each ``d_in``-wide in and ``d_out``-wide out.

    State: the CLT built on the meta device (``P`` parameters: ``n (d_in d_sae + 2 d_sae + d_out)`` and
    ``d_sae d_out n (n + 1) / 2`` for the decoders, more with a skip), times 4 (weights, gradients, Adam's two
    moments) at :func:`weight_bytes` each, its buffers and 16 bytes of ``LatentStats`` per latent
    (``n d_sae``). Working set, per ``batch_size`` rows: each source layer's step temporaries with the
    architecture's ``WORKING_SET`` coefficients (as one SAE of ``d_sae`` latents), plus the stacked batch,
    its normalized copy, the reconstruction of every layer and their gradients (``6 n (d_in + d_out)``
    words per row); on CUDA one more copy of the parameters (Adam's multi-tensor step). An estimate built
    from the SAEs' measured coefficients, not fitted on CLT runs."""
    from sae_lightning.circuits.clt import CrossLayerTranscoder

    with torch.device("meta"):
        clt = CrossLayerTranscoder(cfg.sae, list(cfg.layers), d_in, d_out)
    w, n, batch = weight_bytes(cfg.trainer.precision), clt.n_layers, cfg.batch_size
    params = sum(p.numel() for p in clt.parameters())
    state = 4 * w * params + tensor_bytes(clt.buffers()) + STATS_BYTES_PER_LATENT * clt.n_latents
    a, c = WORKING_SET.get(cfg.sae.architecture, _LARGEST)
    words = n * (a * clt.d_sae + c * (d_in + d_out)) + 6 * n * (d_in + d_out)
    work = math.ceil(w * batch * words)
    if torch.device(device).type == "cuda":
        work += w * params
    return state, work


def estimate_clt(cfg: Any, d_in: int, d_out: int, dims: list[int], device: torch.device | str,
                 model: nn.Module | None = None) -> MemoryEstimate:
    """:func:`estimate_group`'s estimate for one cross-layer transcoder (:func:`clt_parts`) as its only
    member, on the stream of hook widths ``dims``."""
    device = torch.device(device)
    base = estimate_group([], [], dims, device, model, cfg=cfg)
    return MemoryEstimate([sum(clt_parts(cfg, d_in, d_out, device))], base.shared, base.available,
                          base.device)


def model_bytes(model: nn.Module | None) -> int:
    """Bytes of an LM's parameters and buffers (0 for ``None``: a run from the cache holds no LM)."""
    if model is None:
        return 0
    return tensor_bytes(model.parameters()) + tensor_bytes(model.buffers())


def estimate_group(cfgs: list[Any], widths: list[tuple[int, int | None]], dims: list[int],
                   device: torch.device | str, model: nn.Module | None = None,
                   cfg: Any = None) -> MemoryEstimate:
    """The estimate of a group whose SAEs (``TrainConfig`` ``cfgs[i]`` on rows ``widths[i] = (d_in,
    d_out)``) train on ``device`` from one stream reading hooks of widths ``dims`` (``model``: a live run's
    LM, its torch module ``HookedLM.model``). Shared: the process's one-off cost of its first training step
    (``FIRST_STEP_BYTES``), on the CPU the freed memory its allocator keeps (``CPU_ALLOCATOR_SLACK``), plus
    what of the stream lives on ``device``: a live stream's windows and the LM where the LM runs, a cache
    stream's buffers in host memory (on an accelerator, the batch moved to it). ``cfg``: the config of the
    stream, by default ``cfgs[0]``."""
    device = torch.device(device)
    cfg = cfgs[0] if cfg is None else cfg
    members = [sae_training_bytes(c, d_in, d_out, device)
               for c, (d_in, d_out) in zip(cfgs, widths, strict=True)]
    if cfg.activations.source == "live":
        lm_device = _device_of(model) if model is not None else device
        here = lm_device.type == device.type and (lm_device.index or 0) == (device.index or 0)
        stream = stream_bytes(cfg, dims) + model_bytes(model) if here else 0
    elif device.type == "cpu":
        stream = stream_bytes(cfg, dims)
    else:
        stream = cfg.batch_size * sum(dims) * FLOAT32
    slack = CPU_ALLOCATOR_SLACK if device.type == "cpu" else 0
    return MemoryEstimate(members, FIRST_STEP_BYTES + slack + stream, available_bytes(device), str(device))


def _device_of(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def cgroup_free(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes this process's memory cgroup may still use (limit - usage + inactive file pages, which the
    kernel reclaims before it kills), or None without a limit. cgroup v2 (``proc``'s ``0::`` path under
    ``root``, then ``root``), then v1 (``root/memory``)."""
    rel = next((line.split(":", 2)[2].strip() for line in _read(proc).splitlines()
                if line.startswith("0::")), "/")
    for folder, limit, usage, inactive in (
            (root / rel.lstrip("/"), "memory.max", "memory.current", "inactive_file"),
            (root, "memory.max", "memory.current", "inactive_file"),
            (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        cap, used = _read(folder / limit).strip(), _read(folder / usage).strip()
        if cap == "max":
            return None
        if not cap.isdigit() or not used.isdigit():
            continue
        if int(cap) >= 2**60:   # v1's page-rounded "unlimited"
            return None
        stat = dict(line.split() for line in _read(folder / "memory.stat").splitlines() if " " in line)
        return int(cap) - int(used) + int(stat.get(inactive, 0))
    return None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def available_bytes(device: torch.device | str) -> int:
    """Free bytes on ``device``: ``SAE_LIGHTNING_MEMORY_LIMIT`` when set; else for CUDA
    ``torch.cuda.mem_get_info``, for the CPU the system's available memory capped by a cgroup's limit."""
    if os.environ.get(LIMIT_ENV):
        return parse_bytes(os.environ[LIMIT_ENV])
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    free = int(psutil.virtual_memory().available)
    cgroup = cgroup_free()
    return free if cgroup is None else min(free, cgroup)


def check_fits(estimate: MemoryEstimate, names: list[str]) -> None:
    """Raise ``GroupMemoryError`` when the group needs more than is available (``names``: its SAEs, in the
    order of ``estimate.members``): the message names the totals, the device, the biggest members and how
    many of them fit. Does nothing when the group fits."""
    if estimate.total <= estimate.available:
        return
    n, fit = len(estimate.members), estimate.fitting()
    biggest = sorted(range(n), key=lambda i: -estimate.members[i])[:3]
    listed = ", ".join(f"{names[i]} {human(estimate.members[i])}" for i in biggest)
    raise GroupMemoryError(
        f"the group of {n} SAEs needs {human(estimate.total)} on {estimate.device} but "
        f"{human(estimate.available)} is available: {human(estimate.shared)} shared (the activation stream's "
        f"buffers, the LM in a live run) plus the SAEs (the biggest: {listed}). Only the first {fit} of {n} "
        "fit: split the group, e.g. run the sweep with hydra/launcher=grouped which splits it, or lower "
        f"batch_size / activations.buffer_tokens (set {LIMIT_ENV}=<bytes> if the available memory is "
        "misread)")


def split_to_fit(members: list[int], shared: int, available: int,
                 names: list[str] | None = None) -> list[list[int]]:
    """Indices of ``members`` cut, in order, into consecutive groups that each fit next to ``shared`` in
    ``available`` bytes; ``GroupMemoryError`` naming a member (by ``names``, else its index) that does not
    fit even alone."""
    groups: list[list[int]] = []
    used = available + 1   # no group open yet
    for i, need in enumerate(members):
        if shared + need > available:
            raise GroupMemoryError(
                f"SAE {names[i] if names else i} of the group needs {human(need)}, and the activation stream "
                f"{human(shared)}: more than the {human(available)} available even alone. Lower batch_size, "
                "the SAE's size (sae.d_sae / sae.dict_mult) or activations.buffer_tokens / shuffle_buffer")
        if used + need > available:
            groups.append([])
            used = shared
        groups[-1].append(i)
        used += need
    return groups
