"""Shard files: the safetensors layout, written by us in one streaming pass and read back memory-mapped.

Why safetensors and not raw ``.npy`` files: one file per shard holds all of a shard's arrays (acts,
tokens, doc, pos, contexts) so a shard is complete or absent with a single rename; it names dtypes
numpy lacks (bf16); and any tool (``safetensors.safe_open``, SAELens, Rust) can read it. Its header
gives each array's byte offsets, so we ``np.memmap`` the data in place: reading a batch of rows
touches only their pages, and nothing is parsed or copied up front. The SHA-256 of the whole file is
computed while writing, so checksumming costs no second pass at build time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from ..checks import UserError

# safetensors dtype tag -> numpy dtype that holds the raw bytes (bf16 travels as uint16 bits)
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16}
_TAGS = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64",
         np.dtype(np.int32): "I32", np.dtype(np.int16): "I16"}
_CHUNK = 16 << 20


class ShardError(UserError, RuntimeError):
    """A shard file is unreadable, truncated or fails its checksum; the message names file and fix."""


def write_shard(path: Path, arrays: dict[str, np.ndarray], bf16: frozenset[str] = frozenset()) -> str:
    """Write ``arrays`` to ``path`` in safetensors layout, fsync it, and return its SHA-256.

    Arrays named in ``bf16`` are uint16 arrays holding bfloat16 bits.
    """
    header, offset = {}, 0
    for name, arr in arrays.items():
        tag = "BF16" if name in bf16 else _TAGS[arr.dtype]
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for piece in (struct.pack("<Q", len(blob)), blob):
            f.write(piece)
            digest.update(piece)
        for arr in arrays.values():
            data = memoryview(np.ascontiguousarray(arr)).cast("B")
            for start in range(0, len(data), _CHUNK):
                f.write(data[start:start + _CHUNK])
                digest.update(data[start:start + _CHUNK])
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def read_header(path: Path) -> tuple[dict, int]:
    """Parse the header; returns (header, data_start). Raises ShardError when the file is truncated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ShardError(f"{path}: truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ShardError(f"{path}: truncated (header says {n} bytes, file has {size})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    end = 8 + n + max((v["data_offsets"][1] for v in header.values()), default=0)
    if size != end:
        raise ShardError(f"{path}: truncated or padded ({size} bytes, header describes {end})")
    return header, 8 + n


def memmap_shard(path: Path) -> dict[str, np.ndarray]:
    """Map every array of a shard read-only. BF16 arrays come back as uint16 bit patterns."""
    header, start = read_header(path)
    out = {}
    for name, v in header.items():
        dtype = np.dtype(_NP_DTYPES[v["dtype"]])
        shape = tuple(v["shape"])
        if 0 in shape:
            out[name] = np.zeros(shape, dtype)
            continue
        out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + v["data_offsets"][0], shape=shape)
    return out

