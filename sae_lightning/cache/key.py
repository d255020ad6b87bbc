"""Cache keys: everything that changes the activations, as a readable name plus a hash.

Two runs whose keys are equal read the same directory; any field that changes the numbers stored
(model weights, hook, text and its processing, context length, token count, storage dtype, special
token policy, on-disk format) is part of the key. Fields that only change the layout (shard size) or
the machine (device) are not: a cache built with another shard size is still the same data.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace

FORMAT_VERSION = 1


def hook_id(layer: int, name: str) -> str:
    """The string naming a hook point in keys, directory names and ``compute`` outputs: ``L6.mlp_post``."""
    return f"L{layer}.{name}"


def _slug(text: str, limit: int) -> str:
    """Filesystem-safe short form of ``text`` (the hash, not the slug, makes names unique)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text).strip("_.")[:limit] or "x"


def _human(n: int) -> str:
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size and n % (size // 10) == 0:
            return f"{n / size:g}{unit}"
    return str(n)


_DTYPE_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


@dataclass(frozen=True)
class CacheKey:
    """Identity of a build. ``hooks`` may list several hook points (one forward pass, one cache each).

    ``model`` and ``data`` are fingerprints (hub id + revision or a file hash; the text source with
    its split and processing) produced by the LM and text sides; the cache only compares them.
    ``model_label`` / ``data_label`` are short human names for the directory (e.g. ``gpt2``,
    ``TinyStories_train``): they are not hashed and not compared, since the fingerprints decide identity.
    """

    model: str
    data: str
    hooks: tuple[str, ...]
    context_size: int
    n_tokens: int
    dtype: str = "float32"
    model_dtype: str = "float32"
    prepend_bos: bool = True
    exclude_special: bool = True
    format_version: int = FORMAT_VERSION
    model_label: str = field(default="", compare=False)
    data_label: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.hooks:
            raise ValueError("CacheKey.hooks is empty: name at least one hook point, e.g. ('L6.mlp_post',)")
        if self.dtype not in _DTYPE_SHORT:
            raise ValueError(f"CacheKey.dtype={self.dtype!r}: choose one of {', '.join(_DTYPE_SHORT)}")
        object.__setattr__(self, "hooks", tuple(self.hooks))

    def for_hook(self, hook: str) -> CacheKey:
        """The key of the single cache holding ``hook``."""
        if hook not in self.hooks:
            raise KeyError(f"hook {hook!r} is not in this key's hooks {self.hooks}")
        return replace(self, hooks=(hook,))

    def split(self) -> list[CacheKey]:
        """One single-hook key per hook point, in order."""
        return [self.for_hook(h) for h in self.hooks]

    def to_dict(self) -> dict:
        """Every field, labels included (what meta.json stores)."""
        return {**asdict(self), "hooks": list(self.hooks)}

    def identity(self) -> dict:
        """The fields that decide identity: everything but the labels."""
        d = self.to_dict()
        del d["model_label"], d["data_label"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CacheKey:
        return cls(**{**d, "hooks": tuple(d["hooks"])})

    @property
    def hash(self) -> str:
        """12 hex digits of the SHA-256 of the canonical JSON of every field."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """Directory name: ``<model>-<hooks>-<data>-ctx<T>-<tokens>-<dtype>-<hash12>``."""
        hooks = "+".join(self.hooks)
        parts = [_slug(self.model_label or self.model, 32), hooks, _slug(self.data_label or self.data, 32),
                 f"ctx{self.context_size}", _human(self.n_tokens), _DTYPE_SHORT[self.dtype]]
        return "-".join(parts) + f"-{self.hash}"

    def differences(self, other: CacheKey) -> dict[str, tuple]:
        """Fields whose values differ: ``{field: (self_value, other_value)}``."""
        mine, theirs = self.identity(), other.identity()
        return {k: (mine[k], theirs.get(k)) for k in mine if mine[k] != theirs.get(k)}
