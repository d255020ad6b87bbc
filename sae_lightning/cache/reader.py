"""Reading activations: a finished cache directory, or an array users bring (``activations=file``).

Both are ``RowSource``s: a list of shards, each a block of rows read by index. The datamodule only
talks to this interface, so it streams a cache and an imported array the same way.

Checks, and when they run (cheap first, thorough once):
- opening a cache reads ``meta.json``: format version, key (against the directory's hash and, when
  given, the config's key) and that every shard file exists with the recorded size;
- the first time a process maps a shard it hashes the file and compares with ``meta.json`` (plain
  reads at ~1.4 GB/s, so a cold pass over the cache costs about one extra read of each shard);
- ``python -m sae_lightning.cache verify`` hashes every shard of every cache up front.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..checks import UserError
from ..io import sha256_file
from .key import FORMAT_VERSION, CacheKey
from .shardfile import ShardError, memmap_shard, read_header

META = "meta.json"
NORM_SAMPLE_ROWS = 32_768
_VERIFIED: set[tuple[str, int, int]] = set()   # (path, size, mtime_ns) hashed by this process


class CacheError(UserError, RuntimeError):
    """A cache or array on disk cannot be used; the message names the file and the fix."""


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Convert stored rows (bf16 travels as uint16 bits) to float32."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(raw)).view(torch.bfloat16).float().numpy()
    return np.asarray(raw, dtype=np.float32)


def sample_rows(source: RowSource, shards: list[int], n: int, seed: int) -> np.ndarray:
    """``n`` rows (float32, raw) drawn uniformly without replacement from ``shards``, one shard at a time."""
    sizes = np.asarray([source.shard_sizes[i] for i in shards])
    ends = np.cumsum(sizes)
    total = int(ends[-1])
    rows = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    which = np.searchsorted(ends, rows, side="right")
    out = []
    for j in np.unique(which):
        out.append(source.read_rows(shards[j], rows[which == j] - (ends[j] - sizes[j])))
        source.release(shards[j])
    return np.concatenate(out)


def estimate_norm_scale(source: RowSource, n: int = NORM_SAMPLE_ROWS, seed: int = 0) -> tuple[float, float]:
    """Return (scale, mean_norm) with scale = sqrt(d) / E||x|| over ``n`` rows drawn uniformly.

    Multiplying rows by ``scale`` makes their mean L2 norm sqrt(d), so hyperparameters transfer across
    models and layers (Anthropic's and SAELens's convention).
    """
    x = sample_rows(source, list(range(source.n_shards)), n, seed)
    mean = float(np.linalg.norm(x.astype(np.float64), axis=1).mean())
    if not math.isfinite(mean) or mean <= 0:
        raise CacheError(f"{source.path}: activations have mean norm {mean}; cannot normalize. "
                         "Inspect the data or set activations.normalize=false")
    return math.sqrt(source.d) / mean, mean


def virtual_shards(n: int, shard_rows: int, min_shards: int) -> tuple[list[int], list[int]]:
    """(first row, rows) of each shard when ``n`` rows are cut into at least ``min_shards`` shards of at
    most ``shard_rows`` rows, so a validation split by shard stays close to its fraction."""
    rows = max(1, min(shard_rows, math.ceil(n / min_shards)))
    starts = list(range(0, n, rows))
    return starts, [min(rows, n - s) for s in starts]


class RowSource:
    """Rows in shards. Subclasses fill ``path``, ``d``, ``dtype``, ``shard_sizes``, ``norm_scale``."""

    path: Path
    d: int
    dtype: str
    shard_sizes: list[int]
    norm_scale: float

    def __init__(self) -> None:
        self._maps: dict[int, dict[str, np.ndarray]] = {}

    @property
    def n_shards(self) -> int:
        return len(self.shard_sizes)

    @property
    def n_rows(self) -> int:
        return sum(self.shard_sizes)

    def __getstate__(self) -> dict:
        """Pickle without the open maps (dataloader workers map their own shards)."""
        return {**self.__dict__, "_maps": {}}

    def _map(self, i: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def shard(self, i: int) -> dict[str, np.ndarray]:
        """Arrays of shard ``i``, memory-mapped, kept mapped until ``release(i)``."""
        if i not in self._maps:
            if not 0 <= i < self.n_shards:
                raise IndexError(f"{self.path}: shard {i} out of range (0..{self.n_shards - 1})")
            self._maps[i] = self._map(i)
        return self._maps[i]

    def release(self, i: int) -> None:
        """Unmap shard ``i`` so its pages leave this process's memory."""
        self._maps.pop(i, None)

    def release_except(self, keep: set[int]) -> None:
        """Unmap every mapped shard not in ``keep``."""
        for i in [i for i in self._maps if i not in keep]:
            self.release(i)

    @property
    def mapped_shards(self) -> set[int]:
        """Shards currently mapped by this process."""
        return set(self._maps)

    def read_rows(self, i: int, idx: np.ndarray) -> np.ndarray:
        """float32 rows ``idx`` (sorted for locality by the caller) of shard ``i``, raw (not normalized)."""
        return to_float32(self.shard(i)["acts"][idx], self.dtype)

    def read_where(self, i: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token, doc, pos) of rows ``idx`` of shard ``i``; -1 where the source does not know them."""
        s = self.shard(i)
        if "tokens" not in s:
            minus = np.full(len(idx), -1, np.int64)
            return minus, minus, minus
        return (np.asarray(s["tokens"][idx], np.int64), np.asarray(s["doc"][idx], np.int64),
                np.asarray(s["pos"][idx], np.int64))


class ActivationCache(RowSource):
    """A finished cache directory (``meta.json`` + ``shard_*.safetensors``)."""

    def __init__(self, path: str | Path, expected_key: CacheKey | None = None):
        super().__init__()
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise CacheError(f"{self.path} is not a finished activation cache (no {META}). Build it with "
                             "`python -m sae_lightning.cache build <overrides>` or point at another path")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise CacheError(f"{meta_path} is not valid JSON ({err}): delete {self.path} and rebuild") \
                from None
        self._check_meta(meta_path, expected_key)
        self.key = CacheKey.from_dict(self.meta["key"])
        self.d, self.dtype = int(self.meta["d"]), self.meta["dtype"]
        self.shard_sizes = [s["rows"] for s in self.meta["shards"]]
        self.norm_scale = float(self.meta["norm_scale"])
        self._check_sizes()

    def _check_meta(self, meta_path: Path, expected: CacheKey | None) -> None:
        version = self.meta.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(f"{meta_path} has cache format version {version}; this sae-lightning reads "
                             f"version {FORMAT_VERSION}. Delete {self.path} and rebuild it "
                             "(`python -m sae_lightning.cache build <same overrides>`)")
        key = CacheKey.from_dict(self.meta["key"])
        if not self.path.name.endswith(key.hash):
            raise CacheError(f"{meta_path} describes key {key.name}, which does not match its directory "
                             f"name {self.path.name} (renamed or copied over?). "
                             f"Delete {self.path} and rebuild")
        if expected is not None and key != expected:
            diff = ", ".join(f"{k}: cache={a!r} config={b!r}"
                             for k, (a, b) in key.differences(expected).items())
            raise CacheError(f"cache {self.path} was built for another config ({diff}). Point "
                             "activations.cache_dir elsewhere or delete it and rebuild")

    def _check_sizes(self) -> None:
        for entry in self.meta["shards"]:
            f = self.path / entry["file"]
            size = f.stat().st_size if f.exists() else None
            if size != entry["bytes"]:
                raise CacheError(f"shard {f} is missing or truncated ({size} bytes, {META} says "
                                 f"{entry['bytes']}). Delete {self.path} and rebuild it")

    def _map(self, i: int) -> dict[str, np.ndarray]:
        entry = self.meta["shards"][i]
        f = self.path / entry["file"]
        st = f.stat()
        if (str(f), st.st_size, st.st_mtime_ns) not in _VERIFIED:
            self._verify_shard(i)
            _VERIFIED.add((str(f), st.st_size, st.st_mtime_ns))
        return memmap_shard(f)

    def _verify_shard(self, i: int) -> None:
        entry = self.meta["shards"][i]
        f = self.path / entry["file"]
        try:
            read_header(f)
        except (ShardError, OSError, ValueError) as err:
            raise CacheError(f"{err}. Delete {self.path} and rebuild it") from None
        if sha256_file(f) != entry["sha256"]:
            raise CacheError(f"shard {f} fails its SHA-256 checksum (corrupted on disk or edited). "
                             f"Delete {self.path} and rebuild it")

    def verify(self) -> None:
        """Hash every shard now (what ``python -m sae_lightning.cache verify`` runs)."""
        self._check_sizes()
        for i in range(self.n_shards):
            self._verify_shard(i)

    def context(self, doc: int) -> np.ndarray:
        """Token ids [context_size] of context row ``doc`` (the text around any cached activation)."""
        for i, entry in enumerate(self.meta["shards"]):
            if entry["doc_first"] <= doc <= entry["doc_last"]:
                return np.asarray(self.shard(i)["contexts"][doc - entry["doc_first"]])
        raise KeyError(f"context row {doc} is not in cache {self.path} (it has rows 0.."
                       f"{self.meta['shards'][-1]['doc_last']}, minus any made only of special tokens)")

    @property
    def size_bytes(self) -> int:
        return sum(s["bytes"] for s in self.meta["shards"])


class ArraySource(RowSource):
    """A user's [N, d] array in a ``.npy`` or ``.safetensors`` file, memory-mapped and cut into virtual
    shards (at least ``min_shards`` of them, so a validation split by shard stays close to its fraction).
    """

    def __init__(self, path: str | Path, shard_rows: int = 65_536, min_shards: int = 64,
                 normalize: bool = True):
        super().__init__()
        self.path = Path(path)
        array, self.dtype = self._open(self.path)
        (n, self.d), self._np_dtype, self._offset = array.shape, array.dtype, array.offset
        del array  # each shard maps its own range, so release() really unmaps it
        self.starts, self.shard_sizes = virtual_shards(n, shard_rows, min_shards)
        self.norm_scale = estimate_norm_scale(self)[0] if normalize else 1.0

    @staticmethod
    def _open(path: Path) -> tuple[np.ndarray, str]:
        if not path.is_file():
            raise CacheError(f"activations.path={path} does not exist: "
                             "give an [N, d] .npy or .safetensors file")
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
            dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(arr.dtype)
        elif path.suffix == ".safetensors":
            arr, dtype = ArraySource._open_safetensors(path)
        else:
            raise CacheError(f"activations.path={path}: unknown suffix {path.suffix!r}; "
                             "use .npy or .safetensors")
        if dtype is None or arr.ndim != 2 or arr.shape[0] == 0 or not arr.flags.c_contiguous:
            raise CacheError(f"{path}: need a non-empty C-ordered 2-D float32/float16/bfloat16 array [N, d], "
                             f"found shape {tuple(arr.shape)} dtype {arr.dtype}. "
                             "Save it as such (np.save(path, np.ascontiguousarray(x, np.float32)))")
        return arr, dtype

    @staticmethod
    def _open_safetensors(path: Path) -> tuple[np.ndarray, str | None]:
        try:
            arrays, tags = memmap_shard(path), {k: v["dtype"] for k, v in read_header(path)[0].items()}
        except (ShardError, ValueError, KeyError) as err:
            raise CacheError(f"{path} is not a readable safetensors file ({err})") from None
        names = [n for n in ("acts", "activations") if n in arrays] or list(arrays)
        if len(names) != 1:
            raise CacheError(f"{path} holds tensors {sorted(arrays)}: "
                             "name the activations 'acts' or keep only one tensor")
        tag = tags[names[0]]
        return arrays[names[0]], {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(tag)

    def _map(self, i: int) -> dict[str, np.ndarray]:
        offset = self._offset + self.starts[i] * self.d * self._np_dtype.itemsize
        return {"acts": np.memmap(self.path, self._np_dtype, "r", offset, (self.shard_sizes[i], self.d))}


def open_source(path: str | Path, expected_key: CacheKey | None = None, **array_kw) -> RowSource:
    """A cache directory or an array file, by what ``path`` is."""
    p = Path(path)
    return ActivationCache(p, expected_key) if p.is_dir() else ArraySource(p, **array_kw)
